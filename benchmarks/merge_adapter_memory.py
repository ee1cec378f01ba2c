"""Peak memory of a TIES merge whose input is a PEFT adapter (`BASE+ADAPTER`), against the same merge with that
adapter materialized into a dense model, SmolLM2-135M fp32.

    .venv/bin/python benchmarks/merge_adapter_memory.py [--cache cache/merge_bench] [--rank 16]

The base and a dense fine-tune (a perturbed copy) come from benchmarks/merge.py's cache.  The adapter is made by
peft itself on the base (rank R on q/k/v/o/gate/up/down, B factors random, peft starts them at zero); its
materialized twin is peft's merge_and_unload() of it, saved as an fp32 model.  Each merge runs as a user runs
it, `python -m paft_jax.launch merge --method ties ... --no-verify`, in a fresh process under the wrapper of
benchmarks/merge.py (wall time, peak RSS of the process).  If the adapter's delta were materialized for the
whole model, the adapter run's peak would exceed the dense one's by about a model's size; a per-tensor
product keeps it at or below.  The two outputs are compared tensor by tensor.  Output: a table on stdout and
benchmarks/results/merge_adapter_memory.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge import ROOT, compare, measure, prepare, quiet_check  # noqa: E402


def make_adapter(base: Path, out: Path, merged: Path, rank: int) -> None:
    """A peft adapter on `base` (random B) and its merge_and_unload() as a dense fp32 model; made once."""
    if (out / "adapter_config.json").exists() and (merged / "config.json").exists():
        return
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(str(out))
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    shutil.rmtree(merged, ignore_errors=True)
    model.merge_and_unload().save_pretrained(str(merged), safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (base / f).exists():
            shutil.copy(base / f, merged / f)


def size_mb(d: Path, pattern: str = "*.safetensors") -> float:
    return sum(p.stat().st_size for p in d.glob(pattern)) / 2 ** 20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default="cache/merge_bench")
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    cache = ROOT / args.cache
    base, dense = prepare(cache)[:2]
    adapter, materialized = cache / f"adapter_r{args.rank}", cache / f"adapter_r{args.rank}_merged"
    make_adapter(base, adapter, materialized, args.rank)
    work = cache / "adapter_runs"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {"XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    before = quiet_check()
    rows = {}
    for label, model in (("adapter (BASE+ADAPTER)", f"{base}+{adapter}"), ("materialized adapter (dense)",
                                                                          str(materialized))):
        out = work / ("adapter" if "+" in model else "dense")
        cmd = [sys.executable, "-m", "paft_jax.launch", "merge", "--method", "ties", "--base", str(base),
               "--model", model, "--model", str(dense), "--weight", "1", "--density", "0.5", "--out", str(out),
               "--no-verify"]
        rows[label] = {**measure(cmd, env), "out": str(out)}
    diff = compare(Path(rows["adapter (BASE+ADAPTER)"]["out"]), Path(rows["materialized adapter (dense)"]["out"]))
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "rank": args.rank, "model_mb": size_mb(base),
              "adapter_mb": size_mb(adapter), "runs": rows, "outputs_compared": diff, "machine_before": before,
              "machine_after": quiet_check()}
    print(f"TIES (density 0.5) of SmolLM2-135M fp32 base ({result['model_mb']:.0f} MB) with a dense fine-tune and "
          f"a rank-{args.rank} adapter ({result['adapter_mb']:.1f} MB), --no-verify")
    print(f"{'adapter input':32s} {'wall s':>7s} {'peak RSS MB':>12s}")
    for label, r in rows.items():
        print(f"{label:32s} {r['wall_s']:7.1f} {r['peak_rss_mb']:12.0f}")
    print(f"outputs: max |diff| {diff['max_abs_diff']:.3g}, elements differing {diff['fraction_elements_differing']:.3g}")
    path = ROOT / "benchmarks" / "results" / "merge_adapter_memory.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
