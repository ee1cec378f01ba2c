"""l1_mode proximal_adam: the L1 proximal step in Adam's metric.

Checked against references written independently of the code: the threshold formula in float64 NumPy, the
closed-form solution of an L1-regularized separable quadratic, and the tiny config's real training loop.
"""
import numpy as np
import jax
import jax.numpy as jnp
import optax
import pytest

from paft_jax import losses
from paft_jax.train import optim
from paft_jax.train.objectives import ObjectiveConfig
from paft_jax.train.optim import OptimConfig, make_optimizer, schedule
from paft_jax.train.step_fn import l1_prox


def test_adam_l1_threshold_and_per_entry_soft_threshold_match_numpy():
    r = np.random.default_rng(0)
    nu = {"a": r.uniform(0, 1e-4, (3, 5)).astype(np.float32), "b": np.zeros((4,), np.float32)}
    nu["a"][0, 0] = 0.0
    b2, eps, t, scale = 0.99, 1e-8, 7, 3e-6
    got = losses.adam_l1_threshold(jax.tree_util.tree_map(jnp.asarray, nu), jnp.int32(t), scale, b2=b2, eps=eps)
    for v, g in zip(jax.tree_util.tree_leaves(nu), jax.tree_util.tree_leaves(got)):
        # b2 as the float32 AdamW holds it (1 - b2^t amplifies its rounding: 1e-5 relative at b2 = 0.999, t = 1)
        ref = scale / (np.sqrt(v.astype(np.float64) / (1 - float(np.float32(b2)) ** t)) + eps)
        np.testing.assert_allclose(np.asarray(g), ref, rtol=1e-6)
    x = {"a": r.normal(0, 1e-3, (3, 5)), "b": r.normal(0, 1.0, (4,))}
    out = losses.soft_threshold_tree(jax.tree_util.tree_map(jnp.asarray, x), got)
    for xv, tv, ov in zip(jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(out)):
        tv = np.asarray(tv, np.float64)
        ref = np.where(np.abs(xv) <= tv, 0.0, xv - tv * np.sign(xv))
        np.testing.assert_allclose(np.asarray(ov), ref, rtol=1e-6, atol=1e-12)
    assert np.all(np.asarray(out["b"]) == 0)  # no gradient ever (nu = 0): threshold scale / eps


def test_threshold_uses_the_denominator_adamw_divided_by():
    """After a few AdamW updates, update = -lr * m_hat / D: the D our threshold divides by is Adam's own."""
    cfg = OptimConfig(learning_rate=1e-2, schedule="constant", b1=0.8, b2=0.95, eps=1e-6, max_grad_norm=0)
    opt = make_optimizer(cfg, 10)
    r = np.random.default_rng(1)
    x = {"w": jnp.asarray(r.normal(0, 1, (50,)), jnp.float32)}
    state = opt.init(x)
    for _ in range(4):
        g = {"w": jnp.asarray(r.normal(0, 1e-3, (50,)), jnp.float32)}
        u, state = opt.update(g, state, x)
    adam = optim.adam_state(state)
    inv_d = losses.adam_l1_threshold(adam.nu, adam.count, 1.0, b2=cfg.b2, eps=cfg.eps)["w"]  # 1 / D
    m_hat = adam.mu["w"] / (1 - cfg.b1 ** int(adam.count))
    np.testing.assert_allclose(np.asarray(u["w"]), np.asarray(-cfg.learning_rate * m_hat * inv_d), rtol=1e-5)


def _separable_quadratic(seed=0, n=64):
    """f(x) = 1/2 sum a_i (x_i - c_i)^2; argmin f + lam |x|_1 is soft_threshold(c_i, lam / a_i) (closed form)."""
    r = np.random.default_rng(seed)
    return r.uniform(0.5, 4, n), r.normal(0, 1, n), r.normal(0, 2, n)


def _minimize(mode, lam, a, c, x0, *, steps=2000, **optim_kw):
    cfg = OptimConfig(learning_rate=0.05, schedule="cosine", **optim_kw)
    opt, lr = make_optimizer(cfg, steps), schedule(cfg, steps)
    ocfg = ObjectiveConfig(l1_lambda=lam, l1_mode=mode)
    a32, c32 = jnp.asarray(a, jnp.float32), jnp.asarray(c, jnp.float32)

    @jax.jit
    def step(x, state, t):
        g = jax.grad(lambda p: 0.5 * jnp.sum(a32 * (p["w"] - c32) ** 2))(x)
        u, state = opt.update(g, state, x)
        return l1_prox(ocfg, opt, optax.apply_updates(x, u), state, g, lr(t)), state

    x = {"w": jnp.asarray(x0, jnp.float32)}
    state = opt.init(x)
    for t in range(steps):
        x, state = step(x, state, t)
    return np.asarray(x["w"])


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_proximal_adam_converges_to_the_l1_solution(clip):
    """From a dense start: exact zeros exactly where |a_i c_i| <= lam (the gradient at 0 is below lambda),
    the other entries at the closed form.  clip 0.5 clips every step (the gradient norm at the solution is
    about lam * sqrt(40) = 6): lambda stays in the loss's units."""
    a, c, x0 = _separable_quadratic()
    lam = 1.0
    ref = np.sign(c) * np.maximum(np.abs(c) - lam / a, 0)
    assert 10 < (ref == 0).sum() < 54 and np.all(x0 != 0)
    w = _minimize("proximal_adam", lam, a, c, x0, max_grad_norm=clip)
    np.testing.assert_array_equal(w == 0, ref == 0)
    np.testing.assert_allclose(w, ref, atol=1e-5)
    # the Euclidean prox (threshold lr * lambda) stops elsewhere under Adam: it does not solve this problem
    assert not np.array_equal(_minimize("proximal", lam, a, c, x0, max_grad_norm=clip) == 0, ref == 0)


def test_weight_decay_keeps_the_zero_set_and_shrinks_the_rest():
    """Decoupled decay adds wd * D * x to the stationarity condition of a nonzero entry and nothing at x = 0."""
    a, c, x0 = _separable_quadratic(seed=3)
    lam = 0.7
    ref = np.sign(c) * np.maximum(np.abs(c) - lam / a, 0)
    w = _minimize("proximal_adam", lam, a, c, x0, max_grad_norm=0, weight_decay=0.1)
    np.testing.assert_array_equal(w == 0, ref == 0)
    nz = ref != 0
    assert np.all(np.sign(w[nz]) == np.sign(ref[nz])) and np.all(np.abs(w[nz]) < np.abs(ref[nz]))


def test_tiny_config_trains_to_over_90_percent_exact_zeros(tmp_path):
    from paft_jax.train.config import load_train_config
    from paft_jax.train.loop import train
    common = ["steps=10", "eval_data=null", "checkpoint.enabled=false", f"output_dir={tmp_path}"]
    res = train(load_train_config("configs/tiny_sft.yaml", common + [
        "objective.l1_lambda=1e-2", "objective.l1_mode=proximal_adam"]), progress=False)
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(res.state.delta)]
    zeros = sum((x == 0).sum() for x in leaves) / sum(x.size for x in leaves)
    losses_ = [r["loss"] for r in res.history if "loss" in r]
    assert zeros > 0.9
    assert all(np.isfinite(x).all() for x in leaves)
    assert losses_[-1] < losses_[0] - 0.3  # still learns (dense: 6.04 -> 4.33 in these 10 steps)


def test_proximal_adam_refusals(tmp_path):
    from paft_jax.train.config import load_train_config
    with pytest.raises(ValueError, match="needs delta.kind=dense"):
        load_train_config("configs/tiny_sft.yaml", ["delta.kind=lora", "objective.l1_lambda=1e-3",
                                                    "objective.l1_mode=proximal_adam"]).validate()
    with pytest.raises(ValueError, match="l1_mode='proximal_ada'"):
        ObjectiveConfig(l1_lambda=1.0, l1_mode="proximal_ada").validate()
    with pytest.raises(ValueError, match="optim.eps=0.0 must be > 0"):
        OptimConfig(eps=0.0).validate(10)
    x = {"w": jnp.ones(3)}
    plain = optax.adamw(1e-3)
    with pytest.raises(ValueError, match="make_optimizer"):
        l1_prox(ObjectiveConfig(l1_lambda=1.0, l1_mode="proximal_adam"), plain, x, plain.init(x), x, 1e-3)
