"""The PAFT merge on the run's devices, leaf by leaf: each parameter leaf (all layers of one projection)
of both branch deltas is restored sharded over one mesh (an Orbax partial restore of that leaf: never the
whole delta, never the Adam moments), each layer's tensor is merged into the sharded base by the same
per-tensor function as the streamed merge (`merge.engine.merge_array`), its sparsity statistics are counted
on the devices, and the result alone comes to the host to be written (`hf.export.export_hf`: verified,
then published atomically).

Device memory holds the base plus one leaf of each delta; host memory one tensor.  Tensors are written
leaf by leaf (all q_proj layers, then all k_proj, ...; an HF loader reads them by name).  The result
equals the streamed one-device merge of the same checkpoints bitwise (tests/test_pipeline.py).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from paft_jax.config import MeshConfig
from paft_jax.mesh import build_mesh
from paft_jax.pipeline.base import place, say
from paft_jax.train.config import TrainConfig
from paft_jax.train.base import Base, load_base


def merge_mesh(tc: TrainConfig, devices: list) -> tuple[Any, tuple]:
    """One mesh over all the run's devices: FSDP over all of them, the branch's tensor axis kept when it
    divides the device count (its logical rules too)."""
    tensor = tc.mesh.tensor if tc.mesh.tensor > 0 and len(devices) % tc.mesh.tensor == 0 else 1
    mc = MeshConfig(data=1, fsdp=-1, tensor=tensor, rules=dict(tc.mesh.rules))
    return build_mesh(mc, devices), mc.logical_rules()


def merge_and_export_on_mesh(*, spec, recipe_text: str, inputs: list[str], branches: dict[str, str],
                             tc: TrainConfig, bases: dict[str, Base], devices: list, sequential: bool,
                             out: str | Path, dtype: str | None, max_shard_size: str, verify: bool,
                             atol: float) -> dict:
    """Merge the branch checkpoints `inputs` (the recipe's models, in its order) into the base; export to
    `out`.  `branches`: {branch name: checkpoint}.  `sequential`: the base is base + the SFT delta (rounded
    to the base's dtype), the model the preference branch trained on.  Returns the merge's numbers, the
    export's verification and the branch deltas' sparsity (counted in the same pass)."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec
    from paft_jax.hf.export import Tensors, export_hf
    from paft_jax.hf.layout import entries, get_path, hf_shape, iter_hf_tensors
    from paft_jax.merge.engine import merge_array, verify_merged
    from paft_jax.merge.methods import to_host
    from paft_jax.merge.sparsity import SparsityStats, describe
    from paft_jax.merge.tree import to_hf_rows
    from paft_jax.models.config import to_dtype
    from paft_jax.train.restore import DeltaReader, merged_params

    t0 = time.time()
    mesh, rules = merge_mesh(tc, devices)
    # the base this process trained from, on a branch's sub-mesh; with several processes each holds only its
    # branch's copy, so every process reads its shards of the base again
    held = next(iter(bases.values()), None) if jax.process_count() == 1 else None
    base = place(held, mesh, rules) if held is not None else load_base(tc, mesh, rules)
    cfg = base.cfg
    readers = {p: DeltaReader(p, mesh, rules) for p in branches.values()}  # the recipe's inputs are among them
    say(f"merge: on {len(devices)} device(s), mesh {dict(mesh.shape)}; the {len(readers)} branch deltas restored "
        "leaf by leaf, sharded (the deltas only)")
    target = np.dtype(to_dtype(dtype) if dtype else cfg.jnp_param_dtype)
    leaf_index = {e.path: k for k, e in enumerate(entries(cfg))}
    order = sorted(iter_hf_tensors(cfg), key=lambda t: leaf_index[t[0].path])  # leaf by leaf, layers in order
    where = {name: (e, i) for e, i, name in order}
    specs = []
    for e, i, name in order:
        leaf = get_path(base.params, e.path)
        specs.append((name, hf_shape(e, tuple(leaf.shape[1:] if e.layered else leaf.shape)), target))
    shapes = {name: shape for name, shape, _ in specs}
    stats = SparsityStats()
    by_rows = NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names), None))  # HF rows over every device
    held_leaf: dict[str, Any] = {}

    def produce(name: str) -> np.ndarray:
        e, i = where[name]
        if held_leaf.get("path") != e.path:  # the next leaf: the previous one's deltas go first
            held_leaf.clear()
            deltas = {p: r.leaf(e.path) for p, r in readers.items()}
            b = get_path(base.params, e.path)
            into = merged_params(b, deltas[branches["sft"]]) if sequential else b
            held_leaf.update(path=e.path, base=b, into=into, deltas=deltas)
        pick = (lambda x: x) if i is None else (lambda x: x[i])
        deltas = held_leaf["deltas"]
        stats.add_device(name, pick(held_leaf["base"]), [pick(deltas[p]) for p in branches.values()])
        into = to_hf_rows(pick(held_leaf["into"]), e.n_in, by_rows)
        merged = merge_array(spec, name, shapes[name], into, [to_hf_rows(pick(deltas[p]), e.n_in, by_rows)
                                                             for p in inputs],
                             from_models=False, layers=cfg.num_layers)
        res = into if merged is None else merged
        return to_host(res.astype(target)).reshape(shapes[name])  # gathered from every process's shards

    built: dict[str, Any] = {}

    def check(tmp: Path) -> None:  # on the complete directory, before it is published
        built["merge_seconds"] = time.time() - t0
        held_leaf.clear()
        card = tmp / "README.md"
        card.write_text(card.read_text() + f"\n## Recipe\n\n```yaml\n{recipe_text.rstrip()}\n```\n")
        built["bytes"] = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
        if verify:
            built["verify"] = verify_merged(tmp, atol)

    how = f"paft_jax PAFT merge ({spec.method}) of {len(inputs)} branch delta(s) into the base, on the devices"
    try:
        export_hf(Tensors(specs, produce), cfg, out, tokenizer=base.tokenizer, hf_config=base.hf_config,
                  generation_config=base.generation_config, dtype=dtype, max_shard_size=max_shard_size,
                  base_model=base.source, how=how, overwrite=True, check=check)
    finally:
        held_leaf.clear()
        for r in readers.values():
            r.close()
    sparsity = stats.report(base.source, list(branches.values()),
                            [describe(readers[p].cfg) for p in branches.values()])
    sparsity.pop("tensors")
    return {"merge_seconds": built.get("merge_seconds", time.time() - t0), "tensors": len(specs),
            "bytes": built.get("bytes"), "verify": built.get("verify"), "sparsity": sparsity,
            "mesh": dict(mesh.shape)}
