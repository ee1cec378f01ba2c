"""Every loss against a float64 NumPy reference written from its paper's definition (rtol 1e-6)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paft_jax import losses

RTOL = 1e-6


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def np_log_softmax(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_log_sigmoid(x):
    return -np.log1p(np.exp(-x))


def rng_logps(seed, n=64):
    r = np.random.default_rng(seed)
    pc, pr, rc, rr = (r.normal(-40, 15, n) for _ in range(4))
    pc[:4] = rc[:4] = pr[:4] = rr[:4] = -12.5  # ties: h = 0 exactly
    return pc, pr, rc, rr


def test_token_logps_and_sequence_logps():
    r = np.random.default_rng(0)
    logits = r.normal(0, 3, (3, 7, 11))
    targets = r.integers(0, 11, (3, 7))
    mask = (r.random((3, 7)) > 0.4).astype(np.float64)
    ref_tok = np.take_along_axis(np_log_softmax(logits), targets[..., None], -1)[..., 0]
    got = np.asarray(losses.token_logps(jnp.asarray(logits), jnp.asarray(targets)))
    np.testing.assert_allclose(got, ref_tok, rtol=RTOL)
    ref_seq = (ref_tok * mask).sum(-1)
    np.testing.assert_allclose(losses.sequence_logps(jnp.asarray(logits), targets, mask), ref_seq, rtol=RTOL)
    np.testing.assert_allclose(losses.sequence_logps(jnp.asarray(logits), targets, mask, average=True),
                               ref_seq / np.maximum(mask.sum(-1), 1), rtol=RTOL)


@pytest.mark.parametrize("chunk", [4, 7, 32])
def test_chunked_logps_match_full_values_and_gradients(chunk):
    r = np.random.default_rng(1)
    hidden = jnp.asarray(r.normal(0, 1, (2, 5, 6)))
    kernel = jnp.asarray(r.normal(0, 1, (6, 29)))  # 29: chunks never divide the vocab evenly
    targets = jnp.asarray(r.integers(0, 29, (2, 5)))
    targets = targets.at[0, 0].set(28).at[0, 1].set(0)  # first and last vocab entries

    def full(h, w):
        return losses.token_logps(jnp.einsum("bte,ev->btv", h, w), targets)

    def chunked(h, w):
        return losses.token_logps_chunked(h, w, targets, chunk_size=chunk)

    def chunked_vocab_major(h, w):  # a tied embedding [V, E]
        return losses.token_logps_chunked(h, w.T, targets, chunk_size=chunk, vocab_major=True)

    g_full = jax.grad(lambda h, w: full(h, w).sum(), argnums=(0, 1))(hidden, kernel)
    for fn in (chunked, chunked_vocab_major):
        np.testing.assert_allclose(fn(hidden, kernel), full(hidden, kernel), rtol=1e-12, atol=1e-12)
        g_chunk = jax.grad(lambda h, w: fn(h, w).sum(), argnums=(0, 1))(hidden, kernel)
        for a, b in zip(g_chunk, g_full):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_pair_logps_from_packed_segments():
    r = np.random.default_rng(2)
    seg = np.array([[1, 1, 1, 2, 2, 3, 3, 3, 4, 4, 0, 0],
                    [1, 1, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0]])
    tok = r.normal(-2, 1, seg.shape)
    mask = (r.random(seg.shape) > 0.3) & (seg > 0)
    out = losses.pair_logps(jnp.asarray(tok), jnp.asarray(mask), jnp.asarray(seg), pairs_per_row=2)
    for b in range(2):
        for k in range(2):
            for name, s in (("chosen", 2 * k + 1), ("rejected", 2 * k + 2)):
                sel = (seg[b] == s) & mask[b]
                assert out[name][b, k] == pytest.approx(tok[b][sel].sum(), rel=RTOL, abs=1e-12)
                assert out[name + "_tokens"][b, k] == sel.sum()


def test_sft_loss_token_mean():
    r = np.random.default_rng(3)
    tok = r.normal(-3, 1, (4, 9))
    mask = r.random((4, 9)) > 0.5
    assert float(losses.sft_loss(jnp.asarray(tok), jnp.asarray(mask))) == pytest.approx(
        -(tok * mask).sum() / mask.sum(), rel=RTOL)


def ref_dpo(pc, pr, rc, rr, beta, loss_type, ls):
    h = (pc - rc) - (pr - rr)  # Rafailov et al.: difference of implicit rewards / beta
    if loss_type == "sigmoid":  # DPO; cDPO mixes in the flipped label with weight ls
        return (1 - ls) * -np_log_sigmoid(beta * h) + ls * -np_log_sigmoid(-beta * h)
    if loss_type == "robust":  # Chowdhury et al. 2024, unbiased estimator under label noise ls
        return ((1 - ls) * -np_log_sigmoid(beta * h) - ls * -np_log_sigmoid(-beta * h)) / (1 - 2 * ls)
    if loss_type == "hinge":  # SLiC-HF hinge on the log-ratio margin
        return np.maximum(0.0, 1 - beta * h)
    if loss_type == "ipo":  # Azar et al.: regress h to 1/(2 tau), tau = beta
        return (h - 1 / (2 * beta)) ** 2
    raise AssertionError(loss_type)


@pytest.mark.parametrize("loss_type,ls", [(t, 0.0) for t in losses.DPO_LOSS_TYPES]
                         + [("sigmoid", 0.2), ("robust", 0.2)])  # label smoothing: sigmoid (cDPO), robust
def test_dpo_losses_match_reference(loss_type, ls):
    pc, pr, rc, rr = rng_logps(4)
    beta = 0.1
    got, cr, rj = losses.dpo_loss(*map(jnp.asarray, (pc, pr, rc, rr)), beta=beta, loss_type=loss_type,
                                  label_smoothing=ls)
    np.testing.assert_allclose(got, ref_dpo(pc, pr, rc, rr, beta, loss_type, ls), rtol=RTOL)
    np.testing.assert_allclose(cr, beta * (pc - rc), rtol=RTOL)
    np.testing.assert_allclose(rj, beta * (pr - rr), rtol=RTOL)


def test_sigmoid_dpo_at_zero_delta_is_log2():
    pc, pr, _, _ = rng_logps(5)
    got, cr, rj = losses.dpo_loss(jnp.asarray(pc), jnp.asarray(pr), jnp.asarray(pc), jnp.asarray(pr), beta=0.1)
    assert np.all(np.asarray(got) == np.float64(math.log(2)))
    assert np.all(np.asarray(cr) == 0) and np.all(np.asarray(rj) == 0)
    with jax.enable_x64(False):  # in float32 too
        got32, _, _ = losses.dpo_loss(*(jnp.asarray(x, jnp.float32) for x in (pc, pr, pc, pr)), beta=0.1)
        assert np.all(np.asarray(got32) == np.float32(math.log(2)))


def test_orpo_odds_ratio_matches_reference():
    r = np.random.default_rng(6)
    pc, pr = r.uniform(-4, -1e-3, 50), r.uniform(-4, -1e-3, 50)
    pr[:3] = pc[:3]
    beta = 0.25
    odds = lambda logp: np.exp(logp) / (1 - np.exp(logp))  # Hong et al.: odds(y|x) = p / (1 - p)
    log_or = np.log(odds(pc) / odds(pr))
    got, cr, rj, lo = losses.orpo_odds_ratio(jnp.asarray(pc), jnp.asarray(pr), beta=beta)
    np.testing.assert_allclose(lo, log_or, rtol=RTOL, atol=1e-12)
    np.testing.assert_allclose(got, -beta * np_log_sigmoid(log_or), rtol=RTOL)
    np.testing.assert_allclose(cr, beta * pc, rtol=RTOL)


@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_simpo_matches_reference(ls):
    r = np.random.default_rng(7)
    pc, pr = r.uniform(-4, -0.1, 50), r.uniform(-4, -0.1, 50)
    beta, gamma = 2.0, 0.5
    z = beta * pc - beta * pr - gamma  # Meng et al.: margin of length-normalized rewards minus gamma
    ref = (1 - ls) * -np_log_sigmoid(z) + ls * -np_log_sigmoid(-z)
    got, cr, rj = losses.simpo_loss(jnp.asarray(pc), jnp.asarray(pr), beta=beta, gamma=gamma, label_smoothing=ls)
    np.testing.assert_allclose(got, ref, rtol=RTOL)
    np.testing.assert_allclose(rj, beta * pr, rtol=RTOL)


def test_l1_penalty_and_soft_threshold():
    r = np.random.default_rng(8)
    tree = {"a": r.normal(0, 1, (3, 4)), "b": {"c": r.normal(0, 1, (5,))}}
    n = 17
    ref = 0.3 * (np.abs(tree["a"]).sum() + np.abs(tree["b"]["c"]).sum()) / n
    assert float(losses.l1_penalty(jax.tree_util.tree_map(jnp.asarray, tree), 0.3)) == pytest.approx(ref, rel=RTOL)
    out = losses.soft_threshold(jax.tree_util.tree_map(jnp.asarray, tree), 0.5)
    for x, y in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(out)):
        ref = np.where(np.abs(x) <= 0.5, 0.0, x - 0.5 * np.sign(x))  # prox of 0.5*|.|
        np.testing.assert_allclose(y, ref, rtol=RTOL)
        assert np.all((np.asarray(y) == 0) == (np.abs(x) <= 0.5))


def test_unknown_dpo_loss_type_refused():
    with pytest.raises(ValueError, match="kto"):
        losses.dpo_loss(jnp.zeros(2), jnp.zeros(2), jnp.zeros(2), jnp.zeros(2), beta=0.1, loss_type="kto")
