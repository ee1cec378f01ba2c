"""Sharded forward == single-device forward; packed segments == separate sequences; mesh building."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paft_jax.config import MeshConfig
from paft_jax.mesh import build_mesh, resolve_axis_sizes, split_mesh
from paft_jax.models import Decoder, ModelConfig, init_params

CFG = ModelConfig(family="qwen2", vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=2, attention_bias=True)


def test_sharded_forward_matches_single_device():
    assert jax.device_count() == 8
    params = init_params(CFG, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (4, 16), 0, CFG.vocab_size)
    seg = jnp.ones((4, 16), jnp.int32).at[1, 10:].set(0)
    single = Decoder(CFG).apply({"params": params}, ids, segment_ids=seg)[0]

    mcfg = MeshConfig(data=2, fsdp=2, tensor=2)
    mesh, rules = build_mesh(mcfg), mcfg.logical_rules()
    sharded_params = init_params(CFG, jax.random.key(0), mesh, rules)
    spec = sharded_params["layers"]["self_attn"]["q_proj"]["kernel"].sharding.spec
    assert tuple(spec) == (None, "fsdp", "tensor", None)  # (layers, embed, heads, head_dim)
    model = Decoder(CFG, mesh=mesh, rules=rules)
    out = jax.jit(lambda p, i, s: model.apply({"params": p}, i, segment_ids=s)[0])(sharded_params, ids, seg)
    assert len(out.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(out), np.asarray(single), atol=1e-5, rtol=0)


def test_packed_segments_equal_separate_runs():
    params = init_params(CFG, jax.random.key(0))
    a = jax.random.randint(jax.random.key(2), (1, 7), 0, CFG.vocab_size)
    b = jax.random.randint(jax.random.key(3), (1, 9), 0, CFG.vocab_size)
    packed = jnp.concatenate([a, b, jnp.zeros((1, 4), a.dtype)], 1)
    seg = jnp.array([[1] * 7 + [2] * 9 + [0] * 4])
    model = Decoder(CFG)
    out = model.apply({"params": params}, packed, segment_ids=seg)[0]
    alone_a = model.apply({"params": params}, a)[0]
    alone_b = model.apply({"params": params}, b)[0]
    np.testing.assert_allclose(out[:, :7], alone_a, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out[:, 7:16], alone_b, atol=1e-5, rtol=0)
    # without segment ids the second sequence would see the first: the test can fail
    leaky = model.apply({"params": params}, packed)[0]
    assert np.abs(np.asarray(leaky[:, 7:16] - alone_b)).max() > 1e-3


def test_kv_cache_decode_matches_full_forward():
    from paft_jax.models.decoder import init_cache
    params = init_params(CFG, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(4), (2, 12), 0, CFG.vocab_size)
    model = Decoder(CFG)
    full = model.apply({"params": params}, ids)[0]
    cache = init_cache(CFG, 2, 16)
    logits, cache = model.apply({"params": params}, ids[:, :8], cache=cache, cache_index=0)
    steps = [logits]
    for t in range(8, 12):
        logits, cache = model.apply({"params": params}, ids[:, t:t + 1], cache=cache, cache_index=t)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, 1), full, atol=1e-5, rtol=0)


def test_mesh_axis_resolution_and_refusals():
    assert resolve_axis_sizes({"data": 2, "fsdp": -1, "tensor": 2}, 8) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="at most one axis"):
        resolve_axis_sizes({"data": -1, "fsdp": -1, "tensor": 1}, 8)
    with pytest.raises(ValueError, match="not divisible"):
        resolve_axis_sizes({"data": 3, "fsdp": -1, "tensor": 1}, 8)
    with pytest.raises(ValueError, match="use 4 devices"):
        resolve_axis_sizes({"data": 2, "fsdp": 2, "tensor": 1}, 8)
    with pytest.raises(ValueError, match="unknown logical axes"):
        MeshConfig(rules={"nope": "fsdp"}).logical_rules()


def test_split_mesh_gives_disjoint_submeshes_that_run():
    meshes = split_mesh(jax.devices(), [4, 4], [MeshConfig(fsdp=2, tensor=2), MeshConfig(data=2, fsdp=-1)])
    ids0 = {d.id for d in meshes[0].devices.flat}
    ids1 = {d.id for d in meshes[1].devices.flat}
    assert len(ids0) == len(ids1) == 4 and not ids0 & ids1
    assert dict(meshes[0].shape) == {"data": 1, "fsdp": 2, "tensor": 2}
    halves = split_mesh(build_mesh(), [0.75, 0.25])
    assert [m.devices.size for m in halves] == [6, 2]
    for m in meshes:
        rules = MeshConfig().logical_rules()
        p = init_params(CFG, jax.random.key(0), m, rules)
        assert {d.id for d in p["embed_tokens"]["embedding"].sharding.device_set} == {d.id for d in m.devices.flat}
    with pytest.raises(ValueError):
        split_mesh(jax.devices(), [5, 4])


def test_rules_table_switches_fsdp_to_tensor_parallel_without_model_edits():
    mcfg = MeshConfig(data=1, fsdp=1, tensor=8, rules={"embed": None})
    mesh = build_mesh(mcfg)
    cfg = CFG.replace(num_heads=8, num_kv_heads=8, hidden_size=64)
    p = init_params(cfg, jax.random.key(0), mesh, mcfg.logical_rules())
    assert tuple(p["layers"]["mlp"]["up_proj"]["kernel"].sharding.spec) == (None, None, "tensor")
    # 4 KV heads cannot split 8 ways -> that dimension is replicated rather than failing
    cfg2 = cfg.replace(num_kv_heads=4)
    p2 = init_params(cfg2, jax.random.key(0), mesh, mcfg.logical_rules())
    assert tuple(p2["layers"]["self_attn"]["k_proj"]["kernel"].sharding.spec) == (None, None, None, None)


@pytest.mark.parametrize("policy", ["full", "dots_no_batch"])
def test_remat_changes_memory_not_results(policy):
    """Same gradients; the compiled backward keeps fewer activations (XLA's temporary bytes, measured:
    12.4 MB without remat, 3.3 MB full, 4.7 MB dots_no_batch for 4 layers x 2 x 128 tokens)."""
    cfg = CFG.replace(num_layers=4)
    params = init_params(cfg, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(5), (2, 128), 0, cfg.vocab_size)

    def grad_fn(c):
        return jax.jit(jax.grad(lambda p: Decoder(c).apply({"params": p}, ids)[0].mean()))

    plain, remat = grad_fn(cfg), grad_fn(cfg.replace(remat=policy))
    for a, b in zip(jax.tree_util.tree_leaves(plain(params)), jax.tree_util.tree_leaves(remat(params))):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    temp = [f.lower(params).compile().memory_analysis().temp_size_in_bytes for f in (plain, remat)]
    assert temp[1] < 0.5 * temp[0], temp


@pytest.mark.parametrize("unroll", [2, 4, 9])
def test_scan_unroll_changes_the_loop_not_results(unroll):
    """Unrolling the layer scan (all 4 layers, 2 per trip, more than there are) gives the same logits and
    gradients as one layer per trip, and the compiled loop makes fewer trips (none when fully unrolled)."""
    cfg = CFG.replace(num_layers=4, scan_unroll=1)
    params = init_params(cfg, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(5), (2, 64), 0, cfg.vocab_size)

    def grad_fn(c):
        return jax.jit(jax.value_and_grad(lambda p: Decoder(c).apply({"params": p}, ids)[0].mean()))

    plain, unrolled = grad_fn(cfg), grad_fn(cfg.replace(scan_unroll=unroll))
    (la, ga), (lb, gb) = plain(params), unrolled(params)
    np.testing.assert_allclose(la, lb, atol=1e-6, rtol=0)
    for a, b in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    loops = [f.lower(params).as_text().count("stablehlo.while") for f in (plain, unrolled)]
    assert loops[0] >= 2 and (loops[1] == 0 if unroll >= 4 else loops[1] == loops[0]), loops


def test_loop_settings_resolve_by_platform():
    """auto: the whole layer stack and full logits on CPU, one layer per trip and 8192-column chunks on
    TPU/GPU; on a CPU mesh of several devices every loop is unrolled, an explicit scan_unroll included."""
    from paft_jax.models import loops
    cpu8 = build_mesh(MeshConfig(data=1, fsdp=8, tensor=1))
    cpu1 = build_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    assert [loops.layer_unroll("auto", 30, m) for m in (cpu8, cpu1, None)] == [30, 30, 30]
    assert [loops.layer_unroll(2, 30, m) for m in (cpu8, cpu1)] == [30, 2]
    assert [loops.layer_unroll("auto", 30, m, remat=True) for m in (cpu8, cpu1)] == [30, 1]
    assert [loops.logits_chunk("auto", cpu8), loops.logits_chunk(128, cpu8)] == [0, 128]
    assert [loops.unroll_loops(m) for m in (cpu8, cpu1, None)] == [True, False, False]

    class Tpu:  # a mesh of TPU devices, as `launch compile --topology` builds one
        devices = np.array([type("D", (), {"platform": "tpu"})()] * 4)
    assert (loops.layer_unroll("auto", 30, Tpu), loops.logits_chunk("auto", Tpu), loops.unroll_loops(Tpu)) == \
        (1, loops.ACCELERATOR_LOGITS_CHUNK, False)
    for bad in ("all", 0, 2.5, True):
        assert loops.check("scan_unroll", bad, 1) is not None
    with pytest.raises(ValueError, match="scan_unroll"):
        CFG.replace(scan_unroll="all")
