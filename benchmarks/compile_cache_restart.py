"""Time to the first train step with a cold and a warm persistent compilation cache (`compile_cache`), the tiny
SFT and DPO configs on 8 simulated CPU devices.

    .venv/bin/python benchmarks/compile_cache_restart.py [--repeat 3]

Each run is a fresh process (`python -m paft_jax.launch sft|dpo --config configs/tiny_*.yaml steps=2`) writing to
a new output_dir, as a restarted job on a new VM would; cold runs get an empty cache directory, warm runs the
directory a previous run of the same config filled.  The time to the first step is measured from just before the
process starts to the first step's `time_start` in its metrics.jsonl (imports, base, data, compiles, the DPO
reference pass); the process wall time is reported beside it.  Cold and warm runs alternate, so both see the same
machine.  Output: a table on stdout and benchmarks/results/compile_cache_restart.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(kind: str, config: str, out: Path, cache: Path) -> dict:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "paft_jax.launch", kind, "--config", config, "steps=2", "eval_data=null",
                        f"output_dir={out}", f"compile_cache={cache}", "--no-progress"], capture_output=True, text=True,
                       cwd=ROOT, env=env)
    wall = time.time() - t0
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-3000:])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    first = min(r["time_start"] for r in rows if "time_start" in r)
    line = [x for x in p.stderr.splitlines() if "compilation cache:" in x and "programs loaded" in x][-1]
    return {"first_step_s": first - t0, "wall_s": wall, "cache": line.split("compilation cache: ")[1]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cc_bench_"))
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "loadavg_before": os.getloadavg(), "configs": {}}
    try:
        for kind, config in (("sft", "configs/tiny_sft.yaml"), ("dpo", "configs/tiny_dpo.yaml")):
            runs: dict[str, list] = {"cold": [], "warm": []}
            for i in range(args.repeat):
                cold = work / f"{kind}_cache_{i}"
                runs["cold"].append(run(kind, config, work / f"{kind}_cold_{i}", cold))
                runs["warm"].append(run(kind, config, work / f"{kind}_warm_{i}", cold))
            result["configs"][config] = runs
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["loadavg_after"] = os.getloadavg()
    print(f"{'config':24s} {'cache':5s} {'first step s (median)':>22s} {'wall s (median)':>16s}  programs")
    for config, runs in result["configs"].items():
        for which, rs in runs.items():
            print(f"{config:24s} {which:5s} {statistics.median(r['first_step_s'] for r in rs):22.2f} "
                  f"{statistics.median(r['wall_s'] for r in rs):16.2f}  {rs[-1]['cache']}")
    path = ROOT / "benchmarks" / "results" / "compile_cache_restart.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
