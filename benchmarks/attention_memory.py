"""Per-chip memory of the Llama-3-8B train steps with each attention implementation, at 4096 and 8192 tokens,
compiled for a TPU v4-32 slice on this CPU machine (deviceless AOT through `launch compile`, libtpu needed).

    python benchmarks/attention_memory.py [--topology v4-32] [--lengths 4096,8192] [--attention naive,chunked,splash]

Runs one `launch compile --programs train_step` per (config, length, attention) and prints one table; raw
JSON of every compile and the table go to benchmarks/results/compile/attention_8b.{json,md}.  About 5-8
minutes a compile on 2 cores.  A compile the TPU compiler refuses (out of memory) is a row saying so.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2 ** 30
CONFIGS = {"sft": "configs/llama3_8b_sft.yaml", "dpo": "configs/llama3_8b_dpo.yaml"}


def compile_one(config: str, topology: str, length: int, attention: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "t.json"
        cmd = [sys.executable, "-m", "paft_jax.launch", "compile", "--config", config, "--topology", topology,
               "--model-shape", "llama3-8b", "--programs", "train_step", "--no-progress", "--json", str(out),
               f"attention={attention}", f"data.seq_len={length}", f"eval_data.seq_len={length}"]
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "TPU_SKIP_MDS_QUERY": "1"}
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if not out.exists():
            tail = (p.stdout + p.stderr).strip().splitlines()
            raise RuntimeError(f"{' '.join(cmd)} failed:\n" + "\n".join(tail[-20:]))
        res = json.loads(out.read_text())
        res["command"] = "python -m paft_jax.launch " + " ".join(cmd[3:cmd.index("--json")] + cmd[cmd.index("--json") + 2:])
        return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--topology", default="v4-32")
    ap.add_argument("--lengths", default="4096,8192")
    ap.add_argument("--attention", default="naive,chunked,splash")
    ap.add_argument("--branches", default="sft,dpo")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/compile/attention_8b"))
    args = ap.parse_args()
    runs = []
    for branch in args.branches.split(","):
        for length in map(int, args.lengths.split(",")):
            for attention in args.attention.split(","):
                r = compile_one(CONFIGS[branch], args.topology, length, attention)
                runs.append({**r, "branch": branch, "tokens": length, "attention": attention})
                print(f"{branch} {length} {attention}: done", file=sys.stderr, flush=True)
    head = ("| branch | tokens per row | attention | args GiB | temp GiB | peak GiB per chip | HBM usable / nominal "
            "| fits | Pallas kernels | compile s |")
    lines = [f"Llama-3-8B train_step on {args.topology} (configs/llama3_8b_{{sft,dpo}}.yaml, remat full, bf16, "
             "one row per chip per micro-batch), per chip:", "", head, "|---" * (head.count("|") - 1) + "|"]
    for r in runs:
        if r["programs"]:
            p = r["programs"][0]
            lines.append(f"| {r['branch']} | {r['tokens']} | {r['attention']} | {p['argument'] / GIB:.2f} | "
                         f"{p['temp'] / GIB:.2f} | {p['peak'] / GIB:.2f} | {p['usable_hbm'] / GIB:.2f} / {p['hbm'] / GIB:.0f} | "
                         f"{'yes' if p['headroom'] >= 0 else 'NO'} | {p['kernels']} | {p['compile_s']:.0f} |")
        else:
            lines.append(f"| {r['branch']} | {r['tokens']} | {r['attention']} | | | refused: "
                         f"{r['refused'][0][:120]} | | NO | | |")
    table = "\n".join(lines)
    print(table)
    Path(args.out + ".json").write_text(json.dumps(runs, indent=2) + "\n")
    Path(args.out + ".md").write_text(table + "\n\nCommands:\n\n" + "\n".join(f"    {r['command']}" for r in runs) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
