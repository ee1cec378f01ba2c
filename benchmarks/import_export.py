"""Time import and export of SmolLM2-135M and report peak host memory (RSS).

Each stage runs in a fresh process so its peak RSS is its own:
  baseline  imports jax, transformers, torch and touches the devices (the floor every run pays)
  import    GGUF -> dequantize -> sharded params
  export    import + export to sharded safetensors (no verify)
  verify    import + reference logits + export + reload in transformers + compare (what the CLI does)
The bound checked: peak RSS < 2 x model bytes + 400 MB (the export never holds a second model copy).

  python benchmarks/import_export.py [--dtype float32] [--max-shard-size 2GB] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def _stage(stage: str, dtype: str, shard: str, out: str) -> dict:
    t0 = time.perf_counter()
    import jax  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from paft_jax.hf.export import export_hf
    from paft_jax.hf.load import load_model
    from paft_jax.hf.verify import flax_logits, probe_batch, verify_export
    jax.devices()
    res = {"stage": stage, "t_imports": time.perf_counter() - t0}
    if stage != "baseline":
        t = time.perf_counter()
        lm = load_model("smollm2", param_dtype=dtype)
        jax.block_until_ready(lm.params)
        res["t_import"] = time.perf_counter() - t
        res["model_bytes"] = sum(x.nbytes for x in jax.tree_util.tree_leaves(lm.params))
        if stage in ("export", "verify"):
            if stage == "verify":
                ids, mask = probe_batch(lm.cfg.vocab_size)
                ref = flax_logits(lm.params, lm.cfg, ids, mask)
            t = time.perf_counter()
            export_hf(lm.params, lm.cfg, out, tokenizer=lm.tokenizer, hf_config=lm.hf_config, max_shard_size=shard)
            res["t_export"] = time.perf_counter() - t
            if stage == "verify":
                lm.params = None
                t = time.perf_counter()
                rep = verify_export(out, ref, ids, mask)
                res["t_verify"] = time.perf_counter() - t
                res["max_abs_diff"] = rep.max_abs_diff
    res["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-shard-size", default="2GB")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    ap.add_argument("--_stage", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._stage:
        print("RESULT " + json.dumps(_stage(args._stage, args.dtype, args.max_shard_size, args._out)))
        return 0
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", ""), TOKENIZERS_PARALLELISM="false")
    rows = []
    for stage in ("baseline", "import", "export", "verify"):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, __file__, "--_stage", stage, "--_out", os.path.join(tmp, "hf"),
                   "--dtype", args.dtype, "--max-shard-size", args.max_shard_size]
            t = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"stage {stage} failed")
            line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
            row = json.loads(line[7:])
            row["wall"] = time.perf_counter() - t
            rows.append(row)
    base = rows[0]["peak_rss"]
    model = rows[1]["model_bytes"]
    bound = 2 * model + 400e6
    mb = 1e6
    print(f"\nSmolLM2-135M ({args.dtype}, {model / mb:.0f} MB of params), max shard {args.max_shard_size}; "
          f"bound = 2 x model + 400 MB = {bound / mb:.0f} MB")
    print(f"{'stage':<9} {'import s':>9} {'export s':>9} {'verify s':>9} {'peak RSS MB':>12} "
          f"{'over baseline MB':>17} {'< bound':>8}")
    for r in rows:
        print(f"{r['stage']:<9} {r.get('t_import', 0):>9.1f} {r.get('t_export', 0):>9.1f} {r.get('t_verify', 0):>9.1f} "
              f"{r['peak_rss'] / mb:>12.0f} {(r['peak_rss'] - base) / mb:>17.0f} {str(r['peak_rss'] < bound):>8}")
    if "max_abs_diff" in rows[-1]:
        print(f"verify max |logits diff| = {rows[-1]['max_abs_diff']:.3g}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dtype": args.dtype, "max_shard_size": args.max_shard_size, "bound_bytes": bound,
                       "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
