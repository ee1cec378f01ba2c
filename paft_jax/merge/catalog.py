"""The merge methods: how each one sparsifies, elects signs and rescales (no JAX: a recipe is checked
before anything heavy is imported).  The kernels that apply them are in `merge.methods`."""
from __future__ import annotations

from dataclasses import dataclass

SPARSIFIERS = (None, "magnitude", "random", "outliers", "della")
RESCALES = ("none", "inverse", "l1")


@dataclass(frozen=True)
class Method:
    name: str
    sparsify: str | None  # one of SPARSIFIERS
    consensus: bool  # TIES sign election (mergekit's consensus_method: sum)
    normalize: bool  # default of the `normalize` parameter
    rescale: str  # default rescaling of kept values (RESCALES)
    kind: str = "delta"  # "delta" (task arithmetic family), "linear", "slerp"


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("linear", None, False, True, "none", kind="linear"),
    Method("task_arithmetic", None, False, False, "none"),
    Method("ties", "magnitude", True, True, "none"),
    Method("magnitude_prune", "magnitude", False, False, "none"),
    Method("dare_linear", "random", False, False, "inverse"),
    Method("dare_ties", "random", True, False, "inverse"),
    Method("breadcrumbs", "outliers", False, False, "none"),
    Method("breadcrumbs_ties", "outliers", True, False, "none"),
    Method("della", "della", True, True, "inverse"),
    Method("della_linear", "della", False, False, "inverse"),
    Method("slerp", None, False, False, "none", kind="slerp"),
]}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown merge method {name!r}; supported: {', '.join(METHODS)}")
    return METHODS[name]
