"""The PAFT merge on the run's devices: both branch deltas restored sharded over one mesh (the delta only,
never the Adam moments), merged into the sharded base by the jitted pytree merge (`merge.tree`), and
exported tensor by tensor (`hf.export.export_hf`: verified, then published atomically).

Host memory holds one tensor at a time; device memory holds the base, the two deltas and the result,
spread over every device of the run.  The result equals the streamed one-device merge of the same
checkpoints bitwise (tests/test_pipeline.py): both apply `merge.engine.merge_array` to the same flat
HF-layout tensors.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from paft_jax.config import MeshConfig
from paft_jax.mesh import build_mesh
from paft_jax.pipeline.base import place, say
from paft_jax.train.config import TrainConfig
from paft_jax.train.loop import Base, load_base


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
    export's verification and the branch deltas' sparsity (from the deltas restored here: no second restore)."""
    import jax
    from paft_jax.hf.export import export_hf
    from paft_jax.hf.layout import iter_hf_tensors
    from paft_jax.merge.engine import verify_merged
    from paft_jax.merge.params_source import ParamsSource
    from paft_jax.merge.sparsity import analyze
    from paft_jax.merge.tree import merge_deltas
    from paft_jax.train.restore import merged_params, restore_delta

    t0 = time.time()
    mesh, rules = merge_mesh(tc, devices)
    held = next(iter(bases.values()), None)  # the base this process trained from (on a branch's sub-mesh)
    base = place(held, mesh, rules) if held is not None else load_base(tc, mesh, rules)
    deltas = {p: restore_delta(p, mesh, rules)[3] for p in branches.values()}  # the recipe's inputs are among them
    say(f"merge: on {len(devices)} device(s), mesh {dict(mesh.shape)}; {len(deltas)} branch deltas restored "
        "sharded (the deltas only)")
    into = merged_params(base.params, deltas[branches["sft"]]) if sequential else base.params
    merged = jax.block_until_ready(merge_deltas(into, [deltas[p] for p in inputs], spec, cfg=base.cfg))
    merge_s = time.time() - t0
    built: dict[str, Any] = {}

    def check(tmp: Path) -> None:  # on the complete directory, before it is published
        card = tmp / "README.md"
        card.write_text(card.read_text() + f"\n## Recipe\n\n```yaml\n{recipe_text.rstrip()}\n```\n")
        built["bytes"] = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
        if verify:
            built["verify"] = verify_merged(tmp, atol)

    how = f"paft_jax PAFT merge ({spec.method}) of {len(inputs)} branch delta(s) into the base, on the devices"
    export_hf(merged, base.cfg, out, tokenizer=base.tokenizer, hf_config=base.hf_config,
              generation_config=base.generation_config, dtype=dtype, max_shard_size=max_shard_size,
              base_model=base.source, how=how, overwrite=True, check=check)
    del merged, into
    sparsity = analyze(ParamsSource(base.params, base.cfg, base.source),
                       [ParamsSource(deltas[p], base.cfg, p, is_delta=True) for p in branches.values()])
    sparsity.pop("tensors")
    return {"merge_seconds": merge_s, "tensors": len(list(iter_hf_tensors(base.cfg))), "bytes": built.get("bytes"),
            "verify": built.get("verify"), "sparsity": sparsity, "mesh": dict(mesh.shape)}
