"""The jitted train step: grad accumulation exactness, sharded == single device, DPO at step 0,
L1 proximal zeros, LoRA deltas.  Batches are synthetic but follow the data contract (docs/data.md)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from paft_jax.config import MeshConfig
from paft_jax.mesh import build_mesh
from paft_jax.models.config import ModelConfig
from paft_jax.models.decoder import abstract_params, init_params
from paft_jax.mesh import tree_shardings
from paft_jax.train import delta as delta_lib
from paft_jax.train.objectives import ObjectiveConfig
from paft_jax.train.optim import OptimConfig, make_optimizer, schedule
from paft_jax.train.step_fn import build_steps, init_state, jit_steps, state_shardings

CFG = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  max_position_embeddings=128)


def _finish(ids, seg):
    """positions / targets / loss mask per the contract, given ids and segment ids."""
    b, t = ids.shape
    pos = np.zeros_like(ids)
    for r in range(b):
        for i in range(1, t):
            pos[r, i] = pos[r, i - 1] + 1 if seg[r, i] == seg[r, i - 1] and seg[r, i] > 0 else 0
    same_next = np.zeros_like(seg, dtype=bool)
    same_next[:, :-1] = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)
    targets = np.where(same_next, np.roll(ids, -1, axis=1), 0)
    return pos.astype(np.int32), targets.astype(np.int32), same_next


def sft_batch(b=8, t=24, seed=0):
    """Packed rows: 1-3 segments each, loss on the second half of each segment."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, CFG.vocab_size, (b, t)).astype(np.int32)
    seg = np.zeros((b, t), np.int32)
    for r in range(b):
        cuts = sorted(rng.choice(np.arange(4, t - 2), size=rng.integers(0, 3), replace=False))
        end = t - rng.integers(0, 4)
        bounds = [0, *cuts, end]
        for s in range(len(bounds) - 1):
            seg[r, bounds[s]:bounds[s + 1]] = s + 1
    pos, targets, same_next = _finish(ids, seg)
    half = pos >= 2
    mask = (same_next & half).astype(np.float32)
    return {"input_ids": ids, "segment_ids": seg, "positions": pos, "targets": targets, "loss_mask": mask}


def pref_batch(b=8, t=48, pairs=2, seed=0):
    """Each row: `pairs` pairs (prompt 5 tokens + completion 3-6 tokens each side); last pair slot may be empty."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((b, t), np.int32)
    seg = np.zeros((b, t), np.int32)
    comp = np.zeros((b, t), bool)
    valid = np.zeros((b, pairs), np.float32)
    index = -np.ones((b, pairs), np.int64)
    for r in range(b):
        at = 0
        n_pairs = pairs if r % 3 else 1
        for k in range(n_pairs):
            prompt = rng.integers(3, CFG.vocab_size, 5)
            for side in range(2):
                c = rng.integers(3, CFG.vocab_size, rng.integers(3, 7))
                seq = np.concatenate([prompt, c])
                ids[r, at:at + len(seq)] = seq
                seg[r, at:at + len(seq)] = 2 * k + 1 + side
                comp[r, at + len(prompt) - 1:at + len(seq) - 1] = True  # targets that are completion tokens
                at += len(seq)
            valid[r, k] = 1
            index[r, k] = r * pairs + k
    pos, targets, same_next = _finish(ids, seg)
    return {"input_ids": ids, "segment_ids": seg, "positions": pos, "targets": targets,
            "loss_mask": (comp & same_next).astype(np.float32), "pair_valid": valid, "example_index": index}


def _setup(ocfg, *, mesh_cfg=None, dcfg=None, opt=None, accum=1, steps=10, seed=0):
    dcfg = dcfg or delta_lib.DeltaConfig()
    mesh = build_mesh(mesh_cfg or MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1]) \
        if mesh_cfg is None else build_mesh(mesh_cfg)
    rules = (mesh_cfg or MeshConfig()).logical_rules()
    base = init_params(CFG, jax.random.key(seed), mesh, rules)
    shapes, axes = abstract_params(CFG)
    base_sh = tree_shardings(axes, shapes, mesh, rules)
    ocfg.validate()
    ocfg_opt = OptimConfig(learning_rate=1e-3, warmup_steps=2)
    lr = schedule(ocfg_opt, steps)
    opt = opt or make_optimizer(ocfg_opt, steps)
    train, evals = build_steps(CFG, dcfg, ocfg, opt, lr, grad_accum=accum, mesh=mesh, rules=rules)
    d_abs, _ = delta_lib.delta_abstract(CFG, dcfg)
    d_sh = delta_lib.delta_shardings(CFG, dcfg, mesh, rules)
    st_sh = state_shardings(opt, d_abs, d_sh, mesh)
    train, evals = jit_steps(train, evals, st_sh, base_sh, mesh, rules)
    state = init_state(delta_lib.init_delta(CFG, dcfg, jax.random.key(1), mesh, rules), opt, st_sh)
    return train, evals, state, base


def _host(tree):
    return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), tree)


def _max_rel(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    scale = max(float(np.abs(y).max()) for y in lb)
    return max(float(np.abs(x - y).max()) for x, y in zip(la, lb)) / scale


@pytest.mark.parametrize("kind,make", [("sft", sft_batch), ("dpo", pref_batch)])
def test_grad_accumulation_equals_one_big_batch(kind, make):
    """k micro-batches of size b give the gradient of one batch of k*b (SGD lr 1: delta = -grad)."""
    batch = make(b=8)
    ocfg = ObjectiveConfig(kind=kind)
    sgd = optax.sgd(1.0)
    deltas = []
    for accum in (1, 4):
        train, _, state, base = _setup(ocfg, opt=sgd, accum=accum)
        state, metrics = train(state, base, batch)
        deltas.append(_host(state.delta))
    assert _max_rel(deltas[1], deltas[0]) <= 1e-5
    assert max(float(np.abs(x).max()) for x in jax.tree_util.tree_leaves(deltas[0])) > 0


def _norm_rel(a, b):
    return max(float(np.linalg.norm(x - y) / np.linalg.norm(y))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


@pytest.mark.parametrize("kind, mesh_cfg", [("sft", MeshConfig(data=1, fsdp=4, tensor=2)),
                                            ("dpo", MeshConfig(data=1, fsdp=4, tensor=2)),
                                            ("sft", MeshConfig(data=8, fsdp=1, tensor=1))],
                         ids=["sft-fsdp4_tp2", "dpo-fsdp4_tp2", "sft-data8"])
def test_sharded_step_equals_single_device(kind, mesh_cfg):
    """3 steps on 8 devices vs 1 device.  SGD (delta = -sum of gradients): every delta entry within 1e-5
    of the largest, so the sharded step computes the same gradients.  AdamW: the metrics agree within 1e-5;
    the deltas only in norm (<= 1e-3): Adam divides by sqrt(v), so entries whose gradients are near zero
    turn reduction-order noise into update noise (measured 2e-4 norm-relative for DPO, 7.5e-6 for SFT)."""
    make = sft_batch if kind == "sft" else pref_batch
    ocfg = ObjectiveConfig(kind=kind)
    for opt, measure, bound in ((optax.sgd(1.0), _max_rel, 1e-5), (None, _norm_rel, 1e-3)):
        results = []
        for mc in (None, mesh_cfg):
            train, _, state, base = _setup(ocfg, mesh_cfg=mc, accum=2, opt=opt)
            history = []
            for i in range(3):
                state, metrics = train(state, base, make(b=8, seed=i))
                history.append({k: float(v) for k, v in metrics.items()})
            results.append((_host(state.delta), history))
        assert measure(results[1][0], results[0][0]) <= bound
        for got, ref in zip(results[1][1], results[0][1]):
            for k in ref.keys() - {"rewards/accuracies"}:  # a count of ties at step 0: flips on 1e-9 noise
                assert got[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-6), k


def test_dpo_step0_is_log2_and_learns():
    ocfg = ObjectiveConfig(kind="dpo", beta=0.1)
    train, evals, state, base = _setup(ocfg)
    batch = pref_batch()
    state, m = train(state, base, batch)
    assert float(m["loss"]) == pytest.approx(math.log(2), abs=1e-7)
    # the policy (base + zero delta, added inside each layer) and the reference (the base as stored) are two
    # compiled forwards: equal to fp32 rounding of summed log-probs, not bit for bit
    assert float(m["rewards/chosen"]) == pytest.approx(0, abs=1e-6)
    assert float(m["rewards/margins"]) == pytest.approx(0, abs=1e-6)
    for _ in range(15):
        state, m = train(state, base, batch)
    assert float(m["loss"]) < math.log(2) - 0.05
    assert float(m["rewards/accuracies"]) > 0.8
    sums = evals(state.delta, base, batch)
    assert float(sums["pairs"]) == float(batch["pair_valid"].sum())


@pytest.mark.parametrize("kind", ["orpo", "simpo"])
def test_reference_free_objectives_learn(kind):
    ocfg = ObjectiveConfig(kind=kind, beta=0.5 if kind == "simpo" else 0.1, nll_weight=0.0)
    train, _, state, base = _setup(ocfg)
    batch = pref_batch(seed=3)
    first = None
    for _ in range(12):
        state, m = train(state, base, batch)
        first = first if first is not None else float(m["loss"])
    assert float(m["loss"]) < first
    assert float(m["rewards/margins"]) > 0


def test_sft_learns_and_proximal_l1_gives_exact_zeros():
    batch = sft_batch()
    out = {}
    for lam in (0.0, 3.0):
        train, evals, state, base = _setup(ObjectiveConfig(kind="sft", l1_lambda=lam, l1_mode="proximal"))
        losses_seen = []
        for _ in range(10):
            state, m = train(state, base, batch)
            losses_seen.append(float(m["loss"]))
        leaves = jax.tree_util.tree_leaves(_host(state.delta))
        out[lam] = (losses_seen, sum((x == 0).sum() for x in leaves) / sum(x.size for x in leaves))
    assert out[0.0][1] < 0.05          # dense (zeros: embedding rows of tokens the batch never has)
    assert out[3.0][1] > 0.5           # proximal L1: many exact zeros
    first, last = out[0.0][0][0], out[0.0][0][-1]
    # it learned: from the untrained ln(96) = 4.56, down at every step (4.56 -> 4.30 measured)
    assert last < first - 0.2 and all(b < a for a, b in zip(out[0.0][0], out[0.0][0][1:])), out[0.0][0]


def test_l1_penalty_mode_reports_penalty():
    train, _, state, base = _setup(ObjectiveConfig(kind="sft", l1_lambda=1.0, l1_mode="penalty"))
    state, m = train(state, base, sft_batch())
    assert float(m["l1_penalty"]) == 0.0   # delta starts at zero
    state, m = train(state, base, sft_batch())
    assert float(m["l1_penalty"]) > 0


def test_lora_delta_starts_at_zero_and_trains():
    dcfg = delta_lib.DeltaConfig(kind="lora", lora_rank=4, lora_alpha=8, lora_targets=["q_proj", "o_proj", "down_proj"])
    train, _, state, base = _setup(ObjectiveConfig(kind="sft"), dcfg=dcfg)
    dense0 = delta_lib.materialize(state.delta, dcfg, base)
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree_util.tree_leaves(dense0))
    assert set(state.delta["layers"]["self_attn"]) == {"q_proj", "o_proj"}
    batch = sft_batch()
    for _ in range(5):
        state, m = train(state, base, batch)
    dense = delta_lib.materialize(state.delta, dcfg, base)
    assert float(jnp.abs(dense["layers"]["self_attn"]["o_proj"]["kernel"]).max()) > 0
    assert float(jnp.abs(dense["layers"]["mlp"]["up_proj"]["kernel"]).max()) == 0  # not targeted
    assert dense["layers"]["self_attn"]["o_proj"]["kernel"].shape == base["layers"]["self_attn"]["o_proj"]["kernel"].shape


def test_freeze_patterns_keep_leaves_at_base():
    dcfg = delta_lib.DeltaConfig(freeze=["embed_tokens"])
    base = init_params(CFG, jax.random.key(0))
    mask = delta_lib.freeze_mask(base, dcfg)
    opt = make_optimizer(OptimConfig(learning_rate=1e-2), 5, mask)
    train, _, state, base = _setup(ObjectiveConfig(kind="sft"), dcfg=dcfg, opt=opt)
    state, _ = train(state, base, sft_batch())
    assert float(jnp.abs(state.delta["embed_tokens"]["embedding"]).max()) == 0
    assert float(jnp.abs(state.delta["layers"]["mlp"]["up_proj"]["kernel"]).max()) > 0
    with pytest.raises(ValueError, match="match no parameter"):
        delta_lib.freeze_mask(base, delta_lib.DeltaConfig(freeze=["nonexistent_module"]))


def test_lora_targets_that_match_nothing_are_refused():
    with pytest.raises(ValueError, match="match no module"):
        delta_lib.DeltaConfig(kind="lora", lora_targets=["qproj"]).validate()


def test_full_logits_path_equals_chunked():
    """logits_chunk=0 (full logits, no recompute) and the chunked path give the same step."""
    out = []
    for chunk in (0, 40):  # 40 does not divide the vocab of 96
        train, _, state, base = _setup(ObjectiveConfig(kind="sft", logits_chunk=chunk), opt=optax.sgd(1.0))
        state, m = train(state, base, sft_batch())
        out.append((_host(state.delta), float(m["loss"]), float(m["mean_token_accuracy"])))
    assert _max_rel(out[0][0], out[1][0]) <= 1e-5
    assert out[0][1] == pytest.approx(out[1][1], rel=1e-6) and out[0][2] == out[1][2]


def test_proximal_adam_step_soft_thresholds_adams_update_per_entry():
    """Step 1 with proximal_adam = the plain AdamW step, then entry i shrunk by lr_1 * c * lambda / D_i
    (D_i = sqrt(v_hat_i) + eps from the updated state, c the clip factor), written out here in NumPy."""
    from paft_jax.train.optim import adam_state
    batch, lam = sft_batch(), 2e-3
    train, _, state, base = _setup(ObjectiveConfig(kind="sft"))
    state, m = train(state, base, batch)
    plain, adam = _host(state.delta), _host(adam_state(state.opt_state))
    train, _, state, base = _setup(ObjectiveConfig(kind="sft", l1_lambda=lam, l1_mode="proximal_adam"))
    state, m2 = train(state, base, batch)
    got = _host(state.delta)
    opt_cfg = OptimConfig(learning_rate=1e-3, warmup_steps=2)   # what _setup uses
    clip = min(1.0, opt_cfg.max_grad_norm / float(m["grad_norm"]))
    lr1 = float(m["learning_rate"])
    zeros = 0
    for x, nu, y in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(adam.nu),
                        jax.tree_util.tree_leaves(got)):
        # b2 as the float32 AdamW holds it: 1 - b2 at t = 1 amplifies its rounding to 1.3e-5 relative
        d = np.sqrt(nu.astype(np.float64) / (1 - float(np.float32(opt_cfg.b2)) ** int(adam.count))) + opt_cfg.eps
        thr = lr1 * clip * lam / d
        ref = np.where(np.abs(x) <= thr, 0.0, x - thr * np.sign(x))
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-9)
        zeros += int((y == 0).sum())
    total = sum(x.size for x in jax.tree_util.tree_leaves(got))
    assert 0.1 < zeros / total < 0.99 and float(m2["loss"]) == float(m["loss"])


def test_proximal_adam_keeps_frozen_leaves_at_zero():
    """Frozen leaves have nu = 0 (no gradient reaches Adam): threshold lr * lambda / eps, and they stay 0."""
    dcfg = delta_lib.DeltaConfig(freeze=["embed_tokens"])
    mask = delta_lib.freeze_mask(init_params(CFG, jax.random.key(0)), dcfg)
    opt = make_optimizer(OptimConfig(learning_rate=1e-2), 5, mask)
    train, _, state, base = _setup(ObjectiveConfig(kind="sft", l1_lambda=1e-2, l1_mode="proximal_adam"), dcfg=dcfg,
                                   opt=opt)
    for _ in range(3):
        state, m = train(state, base, sft_batch())
    leaves = jax.tree_util.tree_leaves(_host(state.delta))
    assert all(np.isfinite(x).all() for x in leaves) and np.isfinite(float(m["loss"]))
    assert float(jnp.abs(state.delta["embed_tokens"]["embedding"]).max()) == 0
    up = np.asarray(state.delta["layers"]["mlp"]["up_proj"]["kernel"])
    assert 0 < (up == 0).mean() < 1


def test_proximal_adam_refused_on_lora_and_with_a_foreign_optimizer():
    dcfg = delta_lib.DeltaConfig(kind="lora", lora_rank=4, lora_alpha=8)
    ocfg = ObjectiveConfig(kind="sft", l1_lambda=1e-3, l1_mode="proximal_adam")
    with pytest.raises(ValueError, match="needs delta.kind=dense"):
        build_steps(CFG, dcfg, ocfg, make_optimizer(OptimConfig(), 5), schedule(OptimConfig(), 5))
    with pytest.raises(ValueError, match="make_optimizer"):
        build_steps(CFG, delta_lib.DeltaConfig(), ocfg, optax.adamw(1e-3), schedule(OptimConfig(), 5))


def test_proximal_adam_sharded_equals_single_device():
    """The per-entry thresholds read moments sharded like the delta: 3 steps on fsdp=4 x tensor=2 vs 1 device
    (measured: 1e-6 norm-relative, identical zero sets; some leaves are all zero, so one global norm)."""
    ocfg = ObjectiveConfig(kind="sft", l1_lambda=2e-3, l1_mode="proximal_adam")
    flat = []
    for mc in (None, MeshConfig(data=1, fsdp=4, tensor=2)):
        train, _, state, base = _setup(ocfg, mesh_cfg=mc, accum=2)
        for i in range(3):
            state, _ = train(state, base, sft_batch(b=8, seed=i))
        flat.append(np.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(_host(state.delta))]))
    single, sharded = flat
    assert np.linalg.norm(sharded - single) <= 1e-4 * np.linalg.norm(single)
    zeros = single == 0
    assert zeros.mean() > 0.1 and ((sharded == 0) != zeros).sum() <= 1e-3 * zeros.sum()
