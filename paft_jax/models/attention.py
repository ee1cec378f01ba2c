"""Causal softmax attention over packed rows, one signature for every implementation.

q: [B, T, N, D], k / v: [B, S, K, D] (GQA: N a multiple of K), out: [B, T, N, D] in v's dtype.

naive    the fp32 scores [B, K, G, T, S] of a layer at once under an explicit mask: the reference, the
         CPU default, and the KV-cache (generation) path of every implementation.
chunked  the naive math one query block at a time, each block recomputed in the backward pass.
splash   TPU Pallas splash attention: block-sparse (blocks outside the causal band / sliding window are
         never computed), segment ids in the kernel, run per device under shard_map.  On CPU it runs the
         same kernel in Pallas interpret mode (parity checks, slow).
cudnn    jax.nn.dot_product_attention's cuDNN flash attention on GPU (bf16 / fp16).
auto     splash on TPU, cudnn on GPU, naive elsewhere.

The kernels see segment ids, not a mask: a query attends to keys of its own segment, at or before its
slot, inside the window.  Padding (segment 0) queries then attend to padding keys, where the naive mask
gives them no key at all; their outputs differ and are never read (padding is out of every loss).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

IMPLEMENTATIONS = ("auto", "naive", "chunked", "splash", "cudnn")
_NEG = -0.7 * float(np.finfo(np.float32).max)  # finite "minus infinity": fully masked rows stay NaN-free
_LANES = 128  # splash blocks are multiples of the TPU lane width


def resolve(impl: str, platform: str, *, seq_len: int, dtype, decoding: bool) -> str:
    """The implementation that runs for `impl` on `platform` ("cpu" | "gpu" | "tpu"); a kernel asked
    for by name that cannot run these shapes is refused with the reason."""
    if decoding:  # neither kernel serves a KV cache: generation keeps the masked einsum
        return "chunked" if impl == "chunked" else "naive"
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if impl == "auto":
        if platform == "tpu" and seq_len % _LANES == 0:
            return "splash"
        if platform == "gpu" and half:
            return "cudnn"
        return "naive"
    if impl == "splash":
        if platform == "gpu":
            raise ValueError("attention=splash is a TPU kernel; on GPU use attention=cudnn (or auto)")
        if seq_len % _LANES:
            raise ValueError(f"attention=splash needs rows of a multiple of {_LANES} tokens, got {seq_len} "
                             f"(set data.max_length to a multiple of {_LANES})")
    if impl == "cudnn":
        if platform != "gpu":
            raise ValueError(f"attention=cudnn is cuDNN flash attention (NVIDIA GPUs); this runs on {platform}: "
                             "use attention=auto")
        if not half:
            raise ValueError(f"attention=cudnn computes in bf16 or fp16, not {jnp.dtype(dtype).name}: set "
                             "model.dtype=bfloat16 or use attention=naive")
    return impl


def mask(q_seg, kv_seg, q_slot, kv_slot, window: int | None):
    """[B, T, S] bool: causal by slot, same segment, key not padding, within the sliding window."""
    m = (q_slot[:, :, None] >= kv_slot[:, None, :]) & (q_seg[:, :, None] == kv_seg[:, None, :])
    m &= kv_seg[:, None, :] != 0
    if window is not None:
        m &= (q_slot[:, :, None] - kv_slot[:, None, :]) < window
    return m


def _softmax_attend(qg, k, v, m, scale):
    """qg [b, t, k, g, d] over k / v [b, s, k, d] under m [b, t, s]: fp32 scores and softmax."""
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(m[:, None, None], logits, _NEG)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v)


def largest_block(t: int, block: int, multiple: int = 1) -> int:
    """The largest block <= `block` (a multiple of `multiple`) that divides t; t itself when t <= block."""
    if t <= block:
        return t
    return max((c for c in range(multiple, block + 1, multiple) if t % c == 0), default=t)


def naive(q, k, v, m, block: int | None = None, scale: float | None = None):
    """The reference; with `block`, query blocks one at a time, each recomputed in the backward pass
    (scores [b, k, g, block, s] at a time).  `scale` multiplies the scores (default head_dim ** -0.5)."""
    b, t, n, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, d)
    block = t if block is None else largest_block(t, block)
    if block == t:
        out = _softmax_attend(qg, k, v, m, scale)
    else:
        nb = t // block
        blocks = (qg.reshape(b, nb, block, *qg.shape[2:]).swapaxes(0, 1),
                  m.reshape(b, nb, block, m.shape[-1]).swapaxes(0, 1))
        attend = jax.checkpoint(lambda qm: _softmax_attend(qm[0], k, v, qm[1], scale), prevent_cse=False)
        out = jax.lax.map(attend, blocks).swapaxes(0, 1)
    return out.reshape(b, t, n, d)


def _splash_kernel(heads: int, t: int, window: int | None, block: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
    m = sm.CausalMask((t, t))
    if window is not None:
        m = sm.LogicalAnd(m, sm.LocalMask((t, t), (window - 1, 0), 0))
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, use_fused_bwd_kernel=True)
    kernel = sk.make_splash_mha(sm.MultiHeadMask([m] * heads), block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                interpret=interpret)
    return kernel, sk.SegmentIds


def splash(q, k, v, segment_ids, *, window: int | None, block: int, interpret: bool = False,
           mesh: Mesh | None = None, batch_axes=None, head_axes=None, scale: float | None = None):
    """Splash attention; under a mesh, per device (shard_map) over the batch axes and, when q and kv
    heads split alike, the head axes (rows are never split along the sequence here)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    block = largest_block(q.shape[1], block, _LANES)

    def local(q, k, v, seg):
        kernel, segments = _splash_kernel(q.shape[2], q.shape[1], window, block, interpret)
        qt = (q * jnp.asarray(scale, q.dtype)).transpose(0, 2, 1, 3)
        kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        out = jax.vmap(lambda a, b, c, s: kernel(a, b, c, segment_ids=segments(s, s)))(qt, kt, vt, seg)
        return out.transpose(0, 2, 1, 3).astype(v.dtype)

    if mesh is None:
        return local(q, k, v, segment_ids)
    spec = P(batch_axes, None, head_axes, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, P(batch_axes, None)), out_specs=spec,
                         check_vma=False)(q, k, v, segment_ids)


def cudnn(q, k, v, segment_ids, *, window: int | None, implementation: str | None = "cudnn",
          scale: float | None = None):
    """jax.nn.dot_product_attention: causal and the window as the kernel's own masks, segments as a
    [B, 1, T, S] boolean mask.  `implementation="xla"` runs the same call on any platform."""
    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return jax.nn.dot_product_attention(q, k, v, mask=same, scale=scale, is_causal=True,
                                        local_window_size=None if window is None else (window - 1, 0),
                                        implementation=implementation).astype(v.dtype)
