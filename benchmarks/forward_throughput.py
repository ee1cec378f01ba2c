"""Forward-pass throughput of the decoder at SmolLM2-135M shapes (random weights), per dtype.

  python benchmarks/forward_throughput.py [--batch 4] [--seq 128] [--iters 5] [--dtypes float32,bfloat16]

Prints tokens/s and achieved TFLOP/s (2 * params * tokens + attention) for each compute dtype, all in
one run so the ratios are side by side.  Runs on whatever backend JAX finds (CPU here, GPU/TPU there).
"""
from __future__ import annotations

import argparse
import time

import jax

from paft_jax.models import Decoder, init_params
from paft_jax.models.flops import forward_flops_per_token
from paft_jax.models.shapes import named_shape

SMOLLM2 = named_shape("smollm2-135m")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args()
    dev = jax.devices()[0]
    print(f"backend {jax.default_backend()} ({dev.device_kind}), batch {args.batch} x {args.seq}")
    print(f"{'dtype':<10} {'compile s':>9} {'step ms':>9} {'tokens/s':>11} {'TFLOP/s':>8}")
    tokens = args.batch * args.seq
    c = SMOLLM2
    flops = forward_flops_per_token(c, args.seq) * tokens  # the training loop's own counter
    for name in args.dtypes.split(","):
        cfg = SMOLLM2.replace(dtype=name, param_dtype=name)
        params = init_params(cfg, jax.random.key(0))
        ids = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, cfg.vocab_size)
        fwd = jax.jit(lambda p, i: Decoder(cfg).apply({"params": p}, i)[0].sum())
        t = time.perf_counter()
        jax.block_until_ready(fwd(params, ids))
        compile_s = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(args.iters):
            out = fwd(params, ids)
        jax.block_until_ready(out)
        step = (time.perf_counter() - t) / args.iters
        print(f"{name:<10} {compile_s:>9.1f} {step * 1e3:>9.1f} {tokens / step:>11.0f} {flops / step / 1e12:>8.2f}")
        del params
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
