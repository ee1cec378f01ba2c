"""The PAFT merge stage at growing model sizes, before and after a change: streamed on one device
(`merge.on_mesh=false`) and on the mesh (`merge.on_mesh=true`, pipeline/mesh_merge.py), 8 simulated CPU devices.

    .venv/bin/python benchmarks/merge_scaling.py [--sizes 512x4,1024x8,2048x16] [--before REV] [--cap-gb 19]

`--before REV`: the same merges also run with the code of git revision REV (a worktree under --work), one
after the other in the same run (`--after REV`: the second code from a revision too, not this tree).  A merge whose RSS passes --cap-gb is stopped there and recorded as such
(the machine has 23 GiB; on CPU the mesh's "device" memory is host memory).

Per size (hidden x layers of a random Llama-shaped model: intermediate 4 x hidden, heads of 128, vocab
32000, bf16 base), made once in --work: the base exported as an HF directory, and two branch checkpoints
(dense fp32 deltas with Gaussian entries, Adam moments with bf16 mu, as a branch saves them).  Each merge
(TIES, density 0.5 per branch, verification off, with the deltas' sparsity report the pipeline makes) then
runs in its own fresh process, each code and path one after the other; a sampler thread records the process's RSS and the bytes of live JAX arrays every 0.2 s.  On
CPU the devices' memory is host memory, so the RSS of the mesh path includes what a TPU keeps in HBM
(the base, both deltas, the result); the "host beyond arrays" column is RSS minus live array bytes.
All outputs of a size are compared tensor by tensor, by name (they must be equal).  Output: a table on stdout and
benchmarks/results/merge_scaling.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# PJRT_NPROC: 16 pool threads per simulated device (paft_jax/cpu_devices.py: with the CPU client's default
# 8, the on-mesh merge's per-tensor programs in flight filled the pool with blocked ranks and XLA aborted)
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
           PYTHONPATH=str(ROOT), PJRT_NPROC="128")

PREP = r"""
import dataclasses, json, sys
import jax, jax.numpy as jnp
from paft_jax.checkpoint import BranchCheckpointer
from paft_jax.config import MeshConfig, load_config, to_dict
from paft_jax.hf.export import export_hf
from paft_jax.mesh import build_mesh
from paft_jax.train import delta as delta_lib
from paft_jax.train.config import TrainConfig
from paft_jax.train.base import load_base
from paft_jax.train.optim import make_optimizer
from paft_jax.train.step_fn import TrainState, state_shardings
work, hidden, layers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
mc = {"hidden_size": hidden, "intermediate_size": 4 * hidden, "num_layers": layers, "num_heads": hidden // 128,
      "num_kv_heads": max(1, hidden // 512), "vocab_size": 32000, "max_position_embeddings": 4096}
over = [f"model_config={json.dumps(mc)}", "param_dtype=bfloat16", "optim.mu_dtype=bfloat16"]
tc = load_config(TrainConfig, "configs/tiny_sft.yaml", over)
mcfg_mesh = MeshConfig(data=1, fsdp=-1, tensor=1)
mesh, rules = build_mesh(mcfg_mesh), mcfg_mesh.logical_rules()
base = load_base(tc, mesh, rules)
export_hf(base.params, base.cfg, f"{work}/base", tokenizer=base.tokenizer, overwrite=True)
n = base.cfg.num_params()
del base
tc = dataclasses.replace(tc, model=f"{work}/base")
base = load_base(tc, mesh, rules)
mcfg = base.cfg.replace(remat="none")
d_abs, _ = delta_lib.delta_abstract(mcfg, tc.delta)
d_sh = delta_lib.delta_shardings(mcfg, tc.delta, mesh, rules)
opt = make_optimizer(tc.optim, tc.steps)
for i, name in enumerate(("sft", "preference")):
    keys = jax.random.split(jax.random.key(i), len(jax.tree_util.tree_leaves(d_abs)))
    leaves, treedef = jax.tree_util.tree_flatten(d_abs)
    delta = jax.jit(lambda ks: jax.tree_util.tree_unflatten(treedef, [
        (1e-3 * (i + 1)) * jax.random.normal(k, l.shape, jnp.float32) for k, l in zip(ks, leaves)]),
        out_shardings=d_sh)(keys)
    state = TrainState(step=jnp.int32(1), delta=delta, opt_state=jax.jit(opt.init)(delta))
    cfg = dataclasses.replace(tc, output_dir=f"{work}/{name}")
    meta = {"config": to_dict(cfg), "base": tc.model, "model_config": dataclasses.asdict(mcfg), "step": 1}
    ck = BranchCheckpointer(cfg.checkpoint, f"{work}/{name}/checkpoints")
    ck.save(1, state, {}, meta, wait=True)
    ck.close()
    del delta, state
import resource
print("@@" + json.dumps({"params": n, "prep_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""

MERGE = r"""
import json, resource, sys, threading, time
t0 = time.perf_counter()
import jax
work, mode, cap = sys.argv[1], sys.argv[2], float(sys.argv[3]) * 2**30
peak = {"rss": 0, "arrays": 0, "host": 0}
def sample():
    page = __import__("os").sysconf("SC_PAGE_SIZE")
    while True:
        rss = int(open("/proc/self/statm").read().split()[1]) * page
        if rss > cap:  # stopped before the machine runs out of memory
            print("@@" + json.dumps({"wall_s": time.perf_counter() - t0, "stopped_at_gb": rss / 2**30}), flush=True)
            __import__("os")._exit(3)
        try:
            arrays = sum(a.nbytes for a in jax.live_arrays())
        except Exception:
            arrays = 0
        peak["rss"], peak["arrays"] = max(peak["rss"], rss), max(peak["arrays"], arrays)
        peak["host"] = max(peak["host"], rss - arrays)
        time.sleep(0.2)
threading.Thread(target=sample, daemon=True).start()
from paft_jax.merge.recipe import load_recipe
recipe = load_recipe({"merge_method": "ties", "base_model": f"{work}/base",
                      "models": [{"model": f"{work}/{n}", "parameters": {"weight": 1.0, "density": 0.5}}
                                 for n in ("sft", "preference")]})
out = f"{work}/out_{mode}"
if mode == "stream":
    from paft_jax.merge import merge_to_hf
    from paft_jax.merge.sources import HFDirSource
    from paft_jax.merge import sparsity
    from paft_jax.train.restore import CheckpointSource
    base, ckpts = HFDirSource(f"{work}/base"), [CheckpointSource(m) for m in recipe.models]
    if hasattr(sparsity, "SparsityStats"):  # counted as the merge reads the tensors
        merge_to_hf(recipe.spec, base, ckpts, out, overwrite=True, verify=False, stats=sparsity.SparsityStats())
    else:  # a pass of its own after the merge (the pipeline's stream path before)
        merge_to_hf(recipe.spec, base, ckpts, out, overwrite=True, verify=False)
        sparsity.analyze(base, ckpts)
else:
    import dataclasses
    from paft_jax.config import load_config
    from paft_jax.pipeline.mesh_merge import merge_and_export_on_mesh
    from paft_jax.train.config import TrainConfig
    tc = load_config(TrainConfig, "configs/tiny_sft.yaml", [f"model={work}/base"])
    merge_and_export_on_mesh(spec=recipe.spec, recipe_text=recipe.text, inputs=recipe.models,
                             branches={"sft": recipe.models[0], "preference": recipe.models[1]}, tc=tc, bases={},
                             devices=jax.devices(), sequential=False, out=out, dtype=None, max_shard_size="2GB",
                             verify=False, atol=1e-3)
wall = time.perf_counter() - t0
print("@@" + json.dumps({"wall_s": wall, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                         "sampled_rss_gb": peak["rss"] / 2**30, "peak_live_arrays_gb": peak["arrays"] / 2**30,
                         "peak_host_beyond_arrays_gb": peak["host"] / 2**30}), flush=True)
# no interpreter shutdown: the sampler (a daemon thread inside jax.live_arrays) would be unwound there, and
# XLA's C++ aborts on that ("FATAL: exception not rethrown")
__import__("os")._exit(0)
"""

SAME = r"""
import sys, numpy as np
from paft_jax.merge.sources import HFDirSource
a, b = HFDirSource(sys.argv[1]), HFDirSource(sys.argv[2])
assert a.names() == b.names()
bad = [n for n in a.names() if not np.array_equal(a.get(n), b.get(n))]
print("@@" + str(len(bad)) + " " + ",".join(bad[:3]))
"""


def child(code: str, *args: str, tree: Path = ROOT) -> str:
    """`code` in a fresh process with paft_jax from `tree` (a merge stopped at the memory cap returns 3)."""
    env = dict(ENV, PYTHONPATH=str(tree))
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode not in (0, 3):
        raise SystemExit(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return next(line[2:] for line in proc.stdout.splitlines() if line.startswith("@@"))


def worktree(rev: str, work: Path) -> Path:
    """The code of git revision `rev`, checked out once under `work`."""
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()
    path = work / f"code_{sha}"
    if not path.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(path), sha], cwd=ROOT, check=True,
                       capture_output=True)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="512x4,1024x8,2048x16")
    ap.add_argument("--work", default="/tmp/merge_scaling")
    ap.add_argument("--before", default=None, help="a git revision whose code runs the same merges first")
    ap.add_argument("--after", default=None, help="a git revision for the second code (default: this tree)")
    ap.add_argument("--cap-gb", type=float, default=19.0, help="stop a merge whose RSS passes this (GiB)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/merge_scaling.json"))
    args = ap.parse_args()
    codes = [(f"after ({args.after})", worktree(args.after, Path(args.work))) if args.after else ("after", ROOT)]
    if args.before:
        codes.insert(0, (f"before ({args.before})", worktree(args.before, Path(args.work))))
    rows = []
    for size in args.sizes.split(","):
        hidden, layers = map(int, size.split("x"))
        work = Path(args.work) / size
        marker = work / "prepared.json"
        if not marker.exists():
            work.mkdir(parents=True, exist_ok=True)
            t = time.perf_counter()
            prep = json.loads(child(PREP, str(work), str(hidden), str(layers)))
            prep["prep_s"] = time.perf_counter() - t
            marker.write_text(json.dumps(prep))
        params = json.loads(marker.read_text())["params"]
        outs = []
        for code, tree in codes:
            for mode in ("stream", "mesh"):
                out = work / f"out_{mode}"
                r = json.loads(child(MERGE, str(work), mode, str(args.cap_gb), tree=tree))
                rows.append({"size": size, "params": params, "code": code, "mode": mode, **r})
                print(json.dumps(rows[-1]), flush=True)
                if "stopped_at_gb" not in r:
                    kept = work / f"out_{mode}_{len(outs)}"
                    shutil.rmtree(kept, ignore_errors=True)
                    out.rename(kept)
                    outs.append(kept)
        for other in outs[1:]:
            bad = child(SAME, str(outs[0]), str(other))
            if not bad.startswith("0 "):
                raise SystemExit(f"{size}: {outs[0].name} and {other.name} differ in {bad}")
        for kept in outs:
            shutil.rmtree(kept)
    print(f"\n{'size':>9} {'params':>14} {'code':>18} {'path':>7} {'wall s':>8} {'peak RSS GB':>12} "
          f"{'live arrays GB':>15} {'host beyond arrays GB':>22}")
    for r in rows:
        if "stopped_at_gb" in r:
            print(f"{r['size']:>9} {r['params']:>14,} {r['code']:>18} {r['mode']:>7} "
                  f"stopped at {r['stopped_at_gb']:.1f} GB RSS after {r['wall_s']:.0f} s (the cap)")
            continue
        print(f"{r['size']:>9} {r['params']:>14,} {r['code']:>18} {r['mode']:>7} {r['wall_s']:>8.1f} "
              f"{r['peak_rss_gb']:>12.2f} {r['peak_live_arrays_gb']:>15.2f} {r['peak_host_beyond_arrays_gb']:>22.2f}")
    print("the outputs of every finished merge of a size are equal tensor by tensor")
    Path(args.out).write_text(json.dumps({"machine": os.uname().nodename, "cores": os.cpu_count(),
                                          "date": time.strftime("%Y-%m-%d %H:%M"), "cap_gb": args.cap_gb,
                                          "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
