"""Merge engine: every method against a float64 NumPy reference written from its paper's definition,
DARE reproducibility, TIES(density 1, one model) == task arithmetic, streamed == in-memory on a mesh,
recipes, and bad input."""
import json

import jax
import numpy as np
import pytest

from paft_jax.merge import methods
from paft_jax.merge.engine import merge_array, merge_to_hf
from paft_jax.merge.recipe import MergeSpec, RecipeError, load_recipe
from paft_jax.merge.methods import tensor_key

NAME = "model.layers.1.mlp.up_proj.weight"
SHAPE = (6, 10)


# ---------------------------------------------------------------------------------------------------
# float64 references, from the papers' definitions (tie-breaks: the implementation's documented
# convention, rank ascending by (|x|, flat index))


def ranks(x):
    """Ascending rank of every element by (|x|, flat index)."""
    order = np.argsort(np.abs(x).reshape(-1), kind="stable")
    r = np.empty(order.size, np.int64)
    r[order] = np.arange(order.size)
    return r.reshape(x.shape)


def ref_topk(d, density):
    """TIES 'trim': keep the k = max(1, floor(density * n)) largest magnitudes."""
    if density >= 1:
        return d.copy()
    n = d.size
    k = max(1, int(density * n))
    return np.where(ranks(d) >= n - k, d, 0.0)


def ref_breadcrumbs(d, density, gamma):
    """Model Breadcrumbs: drop the int(gamma*n) largest and enough of the smallest to keep density*n."""
    if density >= 1:
        return d.copy()
    n = d.size
    keep = int(density * n)
    bot = max(0, n - keep - int(gamma * n))
    r = ranks(d)
    return np.where((r >= bot) & (r < bot + keep), d, 0.0)


def uniforms(seed, i, n, shape=None):
    """The implementation's documented mask randomness: per CHUNK, uniform(tensor_key(..., chunk))."""
    out = []
    step = methods.CHUNK if shape is None else max(1, methods.CHUNK // shape[1]) * shape[1]
    for c, start in enumerate(range(0, n, step)):
        u = np.asarray(jax.random.uniform(tensor_key(seed, NAME, i, c), (step,) if shape is None else
                                          (step // shape[1], shape[1])), np.float64).reshape(-1)
        out.append(u[: min(step, n - start)])
    return np.concatenate(out)


def ref_dare(d, density, u, rescale="inverse"):
    """DARE: drop each element with probability 1 - p, rescale the survivors by 1/p (or match L1)."""
    if density >= 1:
        return d.copy()
    kept = np.where(u.reshape(d.shape) < np.float32(density), d, 0.0)
    if rescale == "l1":
        a, b = np.abs(d).sum(), np.abs(kept).sum()
        return kept * (a / b) if a >= 1e-7 and b >= 1e-7 else kept
    return kept / np.float32(density)


def ref_della(d, density, eps, u):
    """DELLA MagPrune: keep probability p_i = density - eps + 2 eps * rank_i / (cols - 1) within each
    row (ranked by magnitude), survivors rescaled by 1 / p_i."""
    rows = d.reshape(d.shape[0], -1)
    r = np.stack([ranks(row) for row in rows]).astype(np.float64)
    p = (np.float32(density) - np.float32(eps)) + r / (rows.shape[1] - 1) * (2 * np.float32(eps))
    kept = u.reshape(rows.shape) < p
    return np.where(kept, rows / p, 0.0).reshape(d.shape)


def ref_ties_combine(taus, w, normalize=True):
    """TIES elect + disjoint merge: sign of the weighted mass, mean over the agreeing (non-zero) entries."""
    wt = [wi * t for wi, t in zip(w, taus)]
    elected = np.where(np.sum(wt, axis=0) >= 0, 1.0, -1.0)
    agree = [np.sign(x) == elected for x in wt]
    mixed = np.sum([np.where(a, x, 0.0) for a, x in zip(agree, wt)], axis=0)
    if not normalize:
        return mixed
    div = np.sum([np.where(a, wi, 0.0) for a, wi in zip(agree, w)], axis=0)
    return mixed / np.where(div == 0, 1.0, div)


def ref_slerp(t, v0, v1):
    a, b = v0.reshape(-1), v1.reshape(-1)
    dot = np.clip(np.dot(a / np.linalg.norm(a), b / np.linalg.norm(b)), -1, 1)
    if abs(dot) > 0.9995:
        return (1 - t) * v0 + t * v1
    th = np.arccos(dot)
    return np.sin((1 - t) * th) / np.sin(th) * v0 + np.sin(t * th) / np.sin(th) * v1


# ---------------------------------------------------------------------------------------------------


def make_inputs(m=3, seed=0):
    """fp32 base and deltas with exact zeros and many equal magnitudes (ties at every rank cut)."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(SHAPE).astype(np.float32)
    deltas = []
    for _ in range(m):
        d = rng.choice([0.0, 0.25, 0.5, 0.5, 1.0, 2.0], size=SHAPE) * rng.choice([-1.0, 1.0], size=SHAPE)
        noisy = rng.random(SHAPE) < 0.3
        d[noisy] = rng.standard_normal(int(noisy.sum()))
        deltas.append(d.astype(np.float32))
    return base, deltas


ON_DEVICES = {"on": False}  # set by the `chunk` fixture: inputs as jax arrays spread over the 8 devices


def run(method, base, deltas, per_model, params=None, from_models=False):
    spec = MergeSpec(method, len(deltas), dict(params or {}), [dict(p) for p in per_model])
    x = [(base + d if from_models else d).reshape(-1) for d in deltas]
    b = base.reshape(-1)
    if ON_DEVICES["on"]:  # the merge on a mesh: flat tensors sharded over all devices
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        where = NamedSharding(Mesh(np.array(jax.devices()[:4]), ("x",)), P("x"))
        b, x = jax.device_put(b, where), [jax.device_put(a, where) for a in x]
    out = merge_array(spec, NAME, SHAPE, b, x, from_models=from_models, layers=3)
    return np.asarray(out, np.float64).reshape(SHAPE)


@pytest.fixture(params=[1 << 18, 16, "devices"], ids=["one-chunk", "chunked", "on-devices"])
def chunk(request, monkeypatch):
    """Run each method test with the real chunk size and with a tiny one (several chunks, padding,
    re-read on every pass as an embedding is rather than kept on the device), and with the inputs sharded
    over devices (several chunks too: the kernel vmapped over them)."""
    size = 16 if request.param == "devices" else request.param
    monkeypatch.setattr(methods, "CHUNK", size)
    if size == 16:
        monkeypatch.setattr(methods, "CACHE_ELEMENTS", 0)
    monkeypatch.setitem(ON_DEVICES, "on", request.param == "devices")
    return size


W = [1.0, 0.6, -0.3]
DENS = [0.3, 0.5, 0.9]


def check(got, want):
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)


def test_task_arithmetic_and_linear(chunk):
    base, ds = make_inputs()
    b = base.astype(np.float64)
    check(run("task_arithmetic", base, ds, [{"weight": w} for w in W], {"lambda": 0.8}),
          b + 0.8 * sum(w * d for w, d in zip(W, ds)))
    check(run("task_arithmetic", base, ds, [{"weight": w} for w in W], {"normalize": True}),
          b + sum(w * d for w, d in zip(W, ds)) / sum(W))
    models = [b + d for d in ds]
    check(run("linear", base, ds, [{"weight": w} for w in W], from_models=True),
          sum(w * x for w, x in zip(W, models)) / sum(W))
    check(run("linear", base, ds, [{"weight": w} for w in W], {"normalize": False}),
          sum(w * x for w, x in zip(W, models)))


def test_ties_and_magnitude_prune(chunk):
    base, ds = make_inputs()
    per = [{"weight": w, "density": p} for w, p in zip(W, DENS)]
    trimmed = [ref_topk(d.astype(np.float64), p) for d, p in zip(ds, DENS)]
    check(run("ties", base, ds, per), base + ref_ties_combine(trimmed, W))
    check(run("ties", base, ds, per, {"normalize": False, "lambda": 1.5}),
          base + 1.5 * ref_ties_combine(trimmed, W, normalize=False))
    check(run("magnitude_prune", base, ds, per), base + sum(w * t for w, t in zip(W, trimmed)))
    # the trimmed count is exact even though many magnitudes are equal at the cut
    one = run("magnitude_prune", base, ds[:1], [{"weight": 1.0, "density": 0.3}]) - base
    assert np.count_nonzero(one) == np.count_nonzero(ref_topk(ds[0].astype(np.float64), 0.3))


def test_dare(chunk):
    base, ds = make_inputs()
    per = [{"weight": w, "density": p} for w, p in zip(W, DENS)]
    n = base.size
    for rescale in ("inverse", "l1"):
        sparse = [ref_dare(d.astype(np.float64), p, uniforms(7, i, n), rescale) for i, (d, p) in enumerate(zip(ds, DENS))]
        check(run("dare_linear", base, ds, per, {"seed": 7, "rescale": rescale}),
              base + sum(w * s for w, s in zip(W, sparse)))
        check(run("dare_ties", base, ds, per, {"seed": 7, "rescale": rescale}),
              base + ref_ties_combine(sparse, W, normalize=False))
    none = [np.where(uniforms(7, i, n).reshape(SHAPE) < np.float32(p), d, 0.0) for i, (d, p) in enumerate(zip(ds, DENS))]
    check(run("dare_linear", base, ds, per, {"seed": 7, "rescale": False}), base + sum(w * s for w, s in zip(W, none)))


def test_breadcrumbs_and_della(chunk):
    base, ds = make_inputs()
    gam = [0.1, 0.05, 0.0]
    per = [{"weight": w, "density": p, "gamma": g} for w, p, g in zip(W, DENS, gam)]
    crumbs = [ref_breadcrumbs(d.astype(np.float64), p, g) for d, p, g in zip(ds, DENS, gam)]
    check(run("breadcrumbs", base, ds, per), base + sum(w * c for w, c in zip(W, crumbs)))
    check(run("breadcrumbs_ties", base, ds, per), base + ref_ties_combine(crumbs, W, normalize=False))
    dens, eps = [0.4, 0.5, 0.6], [0.1, 0.2, 0.3]
    per = [{"weight": w, "density": p, "epsilon": e} for w, p, e in zip(W, dens, eps)]
    pruned = [ref_della(d.astype(np.float64), p, e, uniforms(3, i, base.size, SHAPE))
              for i, (d, p, e) in enumerate(zip(ds, dens, eps))]
    check(run("della", base, ds, per, {"seed": 3}), base + ref_ties_combine(pruned, W))
    check(run("della_linear", base, ds, per, {"seed": 3}), base + sum(w * s for w, s in zip(W, pruned)))


def test_slerp(chunk):
    base, ds = make_inputs(1)
    for t in (0.0, 0.3, 1.0):
        check(run("slerp", base, ds, [{}], {"t": t}, from_models=True),
              ref_slerp(t, base.astype(np.float64), (base + ds[0]).astype(np.float64)))
    # (nearly) collinear tensors fall back to lerp
    check(run("slerp", base, [base * 0.5], [{}], {"t": 0.25}), base * 1.125)


def test_dare_reproducible_by_seed_and_name():
    base, ds = make_inputs(2)
    per = [{"weight": 1.0, "density": 0.5}] * 2
    a = run("dare_ties", base, ds, per, {"seed": 11})
    np.testing.assert_array_equal(a, run("dare_ties", base, ds, per, {"seed": 11}))
    assert not np.array_equal(a, run("dare_ties", base, ds, per, {"seed": 12}))
    spec = MergeSpec("dare_ties", 2, {"seed": 11}, per)
    other = merge_array(spec, "model.layers.2.mlp.up_proj.weight", SHAPE, base.reshape(-1),
                        [d.reshape(-1) for d in ds], from_models=False, layers=3)
    assert not np.array_equal(a.reshape(-1), np.asarray(other, np.float64))  # masks differ per tensor


def test_ties_density_one_single_model_is_task_arithmetic():
    base, ds = make_inputs(1)
    np.testing.assert_array_equal(run("ties", base, ds, [{"weight": 1.0, "density": 1.0}]),
                                  run("task_arithmetic", base, ds, [{"weight": 1.0}]))
    # with another weight both divide w * delta by w; XLA may round that division differently (1 ulp)
    np.testing.assert_allclose(run("ties", base, ds, [{"weight": 0.7, "density": 1.0}]),
                               run("task_arithmetic", base, ds, [{"weight": 0.7}], {"normalize": True}),
                               rtol=3e-7, atol=0)


# ---------------------------------------------------------------------------------------------------
# recipes


def test_mergekit_gradients_and_filters():
    r = load_recipe("""
merge_method: ties
base_model: /base
models:
  - model: /base
  - model: /m1
    parameters: {weight: 1.0, density: [0.1, 0.5]}
  - model: /m2
    parameters:
      weight: 0.5
      density: [{filter: mlp, value: 0.3}, {value: 0.7}]
parameters: {normalize: true, int8_mask: true, lambda: 1e-0}
dtype: bfloat16
overrides: [{pattern: "model.embed_tokens.*", skip: true}, {pattern: "*.k_proj.*", parameters: {density: 0.9}}]
""")
    assert r.models == ["/m1", "/m2"] and r.base == "/base"  # the base listed among models is the base
    tp = r.spec.resolve("model.layers.1.mlp.up_proj.weight", 3)  # t = 1/2
    np.testing.assert_allclose(tp.density, [0.3, 0.3])
    tp = r.spec.resolve("model.layers.2.self_attn.q_proj.weight", 3)  # t = 1
    np.testing.assert_allclose(tp.density, [0.5, 0.7])
    np.testing.assert_allclose(r.spec.resolve("model.norm.weight", 3).density, [0.1, 0.7])  # t = 0
    assert r.spec.resolve("model.embed_tokens.weight", 3).skip
    np.testing.assert_allclose(r.spec.resolve("model.layers.0.self_attn.k_proj.weight", 3).density, [0.9, 0.9])
    assert r.spec.dtype == "bfloat16"


@pytest.mark.parametrize("text, match", [
    ("merge_method: ties\nmodels: [{model: /a}]\n", "needs a base_model"),
    ("merge_method: nuslerp\nbase_model: /b\nmodels: [{model: /a}]\n", "unknown merge method 'nuslerp'"),
    ("merge_method: ties\nbase_model: /b\nslices: []\nmodels: [{model: /a}]\n", "'slices'"),
    ("merge_method: ties\nbase_model: /b\nmodels: [{model: /a, parameters: {wieght: 1}}]\n", "wieght"),
    ("merge_method: ties\nbase_model: /b\nmodels: [{model: /a}]\ntokenizer_source: union\n", "tokenizer_source"),
    ("merge_method: slerp\nbase_model: /b\nmodels: [{model: /a}, {model: /c}]\nparameters: {t: 0.5}\n", "exactly one"),
])
def test_recipe_refusals(text, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe(text)


@pytest.mark.parametrize("method, per, params, match", [
    ("ties", [{"density": 0.0}], {}, "density=0 is outside"),
    ("dare_ties", [{"density": 1.5}], {}, "density=1.5 is outside"),
    ("della", [{"density": 0.1, "epsilon": 0.2}], {}, "density \\+/- epsilon"),
    ("task_arithmetic", [{"weight": 1.0}, {"weight": -1.0}], {"normalize": True}, "sum to 0"),
    ("dare_linear", [{"weight": 0.5}, {"weight": -0.5}], {"normalize": True}, "sum to 0"),
])
def test_bad_parameters_name_the_tensor(method, per, params, match):
    spec = MergeSpec(method, len(per), params, per)
    with pytest.raises(RecipeError, match=match) as e:
        spec.resolve(NAME, 3)
    assert NAME in str(e.value)


# ---------------------------------------------------------------------------------------------------
# streamed (HF dirs -> HF dir) vs in memory (pytrees on an 8-device mesh)


@pytest.fixture
def three_models(tmp_path):
    from conftest import make_hf_model
    paths = []
    for i in range(3):
        make_hf_model("llama", seed=i).save_pretrained(tmp_path / f"m{i}")
        paths.append(tmp_path / f"m{i}")
    return paths


@pytest.mark.parametrize("method, per, params", [
    ("ties", [{"weight": 1.0, "density": [0.2, 0.6]}, {"weight": 0.5, "density": [{"filter": "mlp", "value": 0.3},
                                                                                  {"value": 0.8}]}], {}),
    ("dare_ties", [{"weight": 1.0, "density": 0.4}, {"weight": 0.7, "density": 0.6}], {"seed": 5}),
    ("slerp", [{}], {"t": [0.0, 0.8]}),
])  # top-k (ties), random masks (dare), interpolation (slerp); every method's math: the tests above
def test_streaming_equals_in_memory_on_mesh(three_models, tmp_path, method, per, params):
    from paft_jax.config import MeshConfig
    from paft_jax.hf.layout import get_path, iter_hf_tensors, to_hf
    from paft_jax.hf.load import load_model
    from paft_jax.hf.st_io import SafetensorsFile
    from paft_jax.mesh import build_mesh
    from paft_jax.merge.recipe import Override
    from paft_jax.merge.tree import merge_deltas, merge_models
    assert len(jax.devices()) == 8
    base, *models = three_models[: 1 + len(per)]
    spec = MergeSpec(method, len(per), params, per, [Override("model.embed_tokens.*", skip=True)])
    res = merge_to_hf(spec, base, models, tmp_path / "out", verify=False)
    written = SafetensorsFile(res.out / "model.safetensors")
    mcfg = MeshConfig(fsdp=4, tensor=2)
    mesh, rules = build_mesh(mcfg), mcfg.logical_rules()
    lms = [load_model(p, mesh=mesh, rules=rules, with_tokenizer=False) for p in [base, *models]]
    merged = merge_models(lms[0].params, [lm.params for lm in lms[1:]], spec, cfg=lms[0].cfg)
    for e, i, name in iter_hf_tensors(lms[0].cfg):
        leaf = get_path(merged, e.path)
        assert leaf.sharding == get_path(lms[0].params, e.path).sharding, name
        np.testing.assert_array_equal(to_hf(e, np.asarray(leaf if i is None else leaf[i])), written.get(name),
                                      err_msg=name)
    emb = ("embed_tokens", "embedding")
    np.testing.assert_array_equal(np.asarray(get_path(merged, emb)), np.asarray(get_path(lms[0].params, emb)))
    if method == "ties":  # deltas in, as the training code stores them, give the same merge
        deltas = [jax.tree_util.tree_map(lambda a, b: a - b, lm.params, lms[0].params) for lm in lms[1:]]
        from_deltas = merge_deltas(lms[0].params, deltas, spec, cfg=lms[0].cfg)
        for a, b in zip(jax.tree_util.tree_leaves(from_deltas), jax.tree_util.tree_leaves(merged)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_generic_pytree_merge_keeps_sharding():
    from jax.sharding import NamedSharding, PartitionSpec as P
    from paft_jax.config import MeshConfig
    from paft_jax.mesh import build_mesh
    from paft_jax.merge.tree import merge_deltas
    mesh = build_mesh(MeshConfig(fsdp=8))
    rng = np.random.default_rng(0)
    sh = NamedSharding(mesh, P("fsdp", None))
    base = {"w": jax.device_put(rng.standard_normal((16, 4)).astype(np.float32), sh)}
    ds = [{"w": jax.device_put(rng.standard_normal((16, 4)).astype(np.float32), sh)} for _ in range(2)]
    out = merge_deltas(base, ds, MergeSpec("task_arithmetic", 2, {}, [{"weight": 0.5}, {"weight": 0.25}]))
    assert out["w"].sharding == sh
    np.testing.assert_allclose(np.asarray(out["w"]), np.asarray(base["w"]) + 0.5 * np.asarray(ds[0]["w"])
                               + 0.25 * np.asarray(ds[1]["w"]), rtol=1e-6)
    with pytest.raises(ValueError, match="deltas\\[1\\]: leaf \\['w'\\] has shape"):
        merge_deltas(base, [ds[0], {"w": ds[1]["w"][:8]}], MergeSpec("task_arithmetic", 2))


# ---------------------------------------------------------------------------------------------------
# bad inputs on disk


def spec2(method="ties"):
    return MergeSpec(method, 1, {}, [{"weight": 1.0, "density": 0.5}])


def test_refuses_different_architectures_and_shapes(hf_dir, tmp_path):
    llama = hf_dir("llama")
    with pytest.raises(ValueError, match="architecture .*Qwen2ForCausalLM.* differs"):
        merge_to_hf(spec2(), llama, [hf_dir("qwen2")], tmp_path / "o1", verify=False)
    from conftest import make_hf_model
    make_hf_model("llama", intermediate_size=64).save_pretrained(tmp_path / "narrow")
    with pytest.raises(ValueError, match="mlp.*has shape .*different sizes"):
        merge_to_hf(spec2(), llama, [tmp_path / "narrow"], tmp_path / "o2", verify=False)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_refuses_missing_tensor(hf_dir, tmp_path):
    from paft_jax.hf.st_io import SafetensorsFile, write_streaming
    import shutil
    base = hf_dir("llama")
    cut = tmp_path / "cut"
    shutil.copytree(base, cut)
    f = SafetensorsFile(base / "model.safetensors")
    keep = [(n, f.shape(n), f.dtype(n)) for n in f.names() if n != "model.layers.1.mlp.down_proj.weight"]
    write_streaming(cut / "model.safetensors", keep, lambda n: np.asarray(f.get(n)))
    with pytest.raises(ValueError, match=f"{cut}: missing tensors .*model.layers.1.mlp.down_proj.weight"):
        merge_to_hf(spec2(), base, [cut], tmp_path / "o", verify=False)


def test_output_can_never_be_an_input(hf_dir, tmp_path):
    base = hf_dir("llama")
    for out in (base, base / "sub", tmp_path):
        with pytest.raises(ValueError, match="would overwrite or nest with the input"):
            merge_to_hf(spec2(), base, [base], out, verify=False)
    assert (base / "model.safetensors").exists()


def test_cli_merge_recipe_verified_with_model_card(three_models, tmp_path, capsys):
    from paft_jax.merge.cli import main
    base, m1, m2 = three_models
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: dare_ties\nbase_model: {base}\nmodels:\n"
                      f"  - model: {m1}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
                      f"  - model: {m2}\n    parameters: {{weight: 0.5, density: 0.3}}\n"
                      "parameters: {seed: 3}\ndtype: bfloat16\n")
    out = tmp_path / "merged"
    assert main(["merge", "--config", str(recipe), "--out", str(out), "--max-shard-size", "20KB"]) == 0
    printed = capsys.readouterr().out
    assert "verify: max |logits diff|" in printed
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    card = (out / "README.md").read_text()
    assert "merge_method: dare_ties" in card and str(m2) in card
    assert not list(tmp_path.glob(".merged.tmp-*"))
    # flag form, same merge: identical tensors
    out2 = tmp_path / "merged2"
    assert main(["merge", "--method", "dare_ties", "--base", str(base), "--model", str(m1), "--model", str(m2),
                 "--weight", "1.0", "--weight", "0.5", "--density", "0.5", "--density", "0.3", "--param", "seed=3",
                 "--dtype", "bfloat16", "--no-verify", "--out", str(out2)]) == 0
    from paft_jax.merge.sources import HFDirSource
    a, b = HFDirSource(out), HFDirSource(out2)
    for n in a.names():
        np.testing.assert_array_equal(np.asarray(a.get(n)), np.asarray(b.get(n)))


def test_shipped_recipes_load():
    from pathlib import Path
    files = sorted((Path(__file__).parent.parent / "configs" / "merge").glob("*.yaml"))
    assert files
    for f in files:
        r = load_recipe(f)
        assert r.base and len(r.models) == r.spec.num_models == 2
        r.spec.resolve("model.layers.0.mlp.up_proj.weight", 30)


class DeltaSource:
    """A stand-in for a paft_jax delta checkpoint: the TensorSource interface with is_delta=True."""

    is_delta = True
    config = None

    def __init__(self, label, tensors):
        self.label, self.tensors = label, tensors

    def names(self):
        return list(self.tensors)

    def shape(self, name):
        return self.tensors[name].shape

    def dtype(self, name):
        return self.tensors[name].dtype

    def get(self, name):
        return self.tensors[name]


def test_delta_sources_plug_in(three_models, tmp_path):
    """Deltas from a checkpoint-like source, alone or mixed with HF dirs, give the HF dirs' merge."""
    from paft_jax.merge.sources import HFDirSource
    base, m1, m2 = three_models
    b = HFDirSource(base)
    deltas = [DeltaSource(f"ckpt{i}", {n: np.asarray(HFDirSource(m).get(n)) - np.asarray(b.get(n)) for n in b.names()})
              for i, m in enumerate((m1, m2))]
    spec = MergeSpec("dare_ties", 2, {"seed": 1}, [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.4}])
    want = HFDirSource(merge_to_hf(spec, base, [m1, m2], tmp_path / "a", verify=False).out)
    for i, inputs in enumerate(([deltas[0], m2], deltas)):
        got = HFDirSource(merge_to_hf(spec, base, inputs, tmp_path / f"b{i}", verify=False).out)
        for n in want.names():
            np.testing.assert_array_equal(np.asarray(got.get(n)), np.asarray(want.get(n)), err_msg=n)


def test_linear_recipe_averages_the_base_as_mergekit_does():
    r = load_recipe("merge_method: linear\nbase_model: /b\nmodels:\n  - {model: /a, parameters: {weight: 1.0}}\n"
                    "parameters: {weight: 0.25}\n")
    assert r.models == ["/a", "/b"]
    np.testing.assert_allclose(r.spec.resolve("model.norm.weight", 2).weight, [1.0, 0.25])
    r = load_recipe("merge_method: linear\nbase_model: /b\nmodels:\n  - {model: /a, parameters: {weight: 1.0}}\n"
                    "  - {model: /b, parameters: {weight: 3.0}}\n")
    assert r.models == ["/a", "/b"] and list(r.spec.resolve("x", None).weight) == [1.0, 3.0]


def test_bfloat16_inputs_streamed_equal_in_memory(hf_dir, tmp_path):
    from paft_jax.hf.layout import get_path, iter_hf_tensors, to_hf
    from paft_jax.hf.load import load_model
    from paft_jax.merge.sources import HFDirSource
    from paft_jax.merge.tree import merge_models
    from conftest import make_hf_model
    import torch
    paths = []
    for i in range(3):
        make_hf_model("qwen2", seed=i).to(torch.bfloat16).save_pretrained(tmp_path / f"q{i}")
        paths.append(tmp_path / f"q{i}")
    spec = MergeSpec("ties", 2, {}, [{"weight": 1.0, "density": 0.4}, {"weight": 0.6, "density": 0.5}])
    out = HFDirSource(merge_to_hf(spec, paths[0], paths[1:], tmp_path / "out", verify=False).out)
    lms = [load_model(p, with_tokenizer=False) for p in paths]
    assert lms[0].cfg.param_dtype == "bfloat16"
    merged = merge_models(lms[0].params, [lm.params for lm in lms[1:]], spec, cfg=lms[0].cfg)
    for e, i, name in iter_hf_tensors(lms[0].cfg):
        leaf = get_path(merged, e.path)
        assert out.dtype(name) == leaf.dtype
        np.testing.assert_array_equal(to_hf(e, np.asarray(leaf if i is None else leaf[i])), out.get(name), err_msg=name)


def test_failed_verification_removes_the_output(three_models, tmp_path):
    """The verification process's real comparison, held to an atol no two frameworks meet: a mismatch
    error naming the directory, and nothing published."""
    from paft_jax.hf.verify import ExportMismatchError
    out = tmp_path / "merged"
    with pytest.raises(ExportMismatchError, match="transformers' logits differ"):
        merge_to_hf(spec2(), three_models[0], [three_models[1]], out, atol=1e-12)
    assert not out.exists() and not list(tmp_path.glob(".merged.*"))


def test_verifier_reports_its_process_failing(tmp_path):
    """A verification whose process fails (here: no such directory) is an error carrying its stderr."""
    from paft_jax.hf.verifier import Verifier
    verifier = Verifier(1e-3, "llama")
    try:
        with pytest.raises(RuntimeError, match=r"verification of .*missing failed \(rc 1\)"):
            verifier.check(tmp_path / "missing")
    finally:
        verifier.close()


def test_the_merge_cli_starts_its_verifier_before_importing_jax():
    """The CLI parses a recipe and starts the verification's process without JAX or torch imported: the
    verifier's own imports then overlap the merge's (benchmarks/merge.md)."""
    import subprocess
    import sys
    code = ("import sys, paft_jax.launch, paft_jax.merge.cli, paft_jax.merge.recipe, paft_jax.hf.verifier; "
            "heavy = {'jax', 'torch', 'transformers'} & set(sys.modules); assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def _chunked(base, xs, step):
    def chunks():
        for c, start in enumerate(range(0, base.size, step)):
            stop = min(base.size, start + step)
            pad = step - (stop - start)
            yield (np.pad(base[start:stop], (0, pad)), tuple(np.pad(x[start:stop], (0, pad)) for x in xs),
                   np.int32(stop - start), c)
    return chunks


@pytest.mark.parametrize("from_models", [False, True])
def test_host_rank_cut_equals_the_histogram_one(from_models):
    """The streamed path's sampled-bracket selection (NumPy) gives exactly the radix-select histograms' cut
    (XLA), ties at the cut included, for every target rank from 'everything' to 'nothing'."""
    rng = np.random.default_rng(3)
    n = 5000
    base = rng.standard_normal(n).astype(np.float32)
    ties = rng.choice([0.0, 0.25, 0.5, 1.0], size=n).astype(np.float32)  # long runs of equal magnitudes
    smooth = (rng.standard_normal(n) * 1e-3).astype(np.float32)
    ds = [ties, smooth]
    xs = [base + d for d in ds] if from_models else ds
    chunks = _chunked(base, xs, 700)
    for q in (0.0, 0.1, 0.5, 0.9, 0.999):
        m = int(q * n)
        targets = np.array([[m, min(n, m + 40)], [m, n]], np.int32)
        want = methods.rank_cut(chunks, targets, n, from_models)
        got = methods.rank_cut_host(chunks, targets, n, from_models)
        assert got is not None
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{k} at q={q}")


def test_host_rank_cut_falls_back_when_the_sample_misleads():
    """Every 32nd magnitude (the sampled ones) is huge: the bracket misses the cut, the NumPy selection says
    so, and the merge takes the histogram path and is still exact."""
    n = 64 * methods.SAMPLE_EVERY
    d = np.full(n, 1e-3, np.float32) * (1 + np.arange(n, dtype=np.float32) / n)
    d[::methods.SAMPLE_EVERY] = 10.0
    base = np.zeros(n, np.float32)
    targets = np.array([[n // 2]], np.int32)
    chunks = _chunked(base, [d], 256)
    assert methods.rank_cut_host(chunks, targets, n, False) is None
    spec = MergeSpec("magnitude_prune", 1, {}, [{"weight": 1.0, "density": 0.5}])
    got = np.asarray(merge_array(spec, NAME, (n,), base, [d], from_models=False, layers=None))
    np.testing.assert_array_equal(got, ref_topk(d.astype(np.float64), 0.5).astype(np.float32))


def test_refuses_a_model_whose_config_differs_unless_accepted(hf_dir, tmp_path):
    """Same tensors, another rope_theta (or max_position_embeddings): a different function, refused naming
    the key and both values; an accepted key passes; keys that cannot change the computation are ignored."""
    import json
    from conftest import make_hf_model
    base = hf_dir("llama", rope_theta=10000.0)
    make_hf_model("llama", seed=1, rope_theta=1000.0).save_pretrained(tmp_path / "rope")
    with pytest.raises(ValueError, match=r"config differs .*rope_theta 1000\.0 \(base 10000\.0\)"):
        merge_to_hf(spec2(), base, [tmp_path / "rope"], tmp_path / "o1", verify=False)
    make_hf_model("llama", seed=1, max_position_embeddings=576).save_pretrained(tmp_path / "pos")
    with pytest.raises(ValueError, match=r"max_position_embeddings 576 \(base 64\)"):
        merge_to_hf(spec2(), base, [tmp_path / "pos"], tmp_path / "o2", verify=False)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    accepted = MergeSpec("ties", 1, {}, [{"weight": 1.0, "density": 0.5}], accept_config=("rope_theta",))
    merge_to_hf(accepted, base, [tmp_path / "rope"], tmp_path / "o3", verify=False)
    cfg = json.loads((tmp_path / "rope" / "config.json").read_text())   # file-only keys do not count
    cfg.update(transformers_version="0.0.1", torch_dtype="bfloat16", use_cache=False)
    del cfg["rope_parameters"]
    cfg["rope_theta"] = 10000.0                                       # transformers v4's spelling of the base's RoPE
    (tmp_path / "rope" / "config.json").write_text(json.dumps(cfg))
    merge_to_hf(spec2(), base, [tmp_path / "rope"], tmp_path / "o4", verify=False)


def test_cli_accepts_a_config_difference_only_when_named(hf_dir, tmp_path, capsys):
    from conftest import make_hf_model
    from paft_jax.launch import cli as main
    base = hf_dir("llama", rope_theta=10000.0)
    make_hf_model("llama", seed=1, rope_theta=1000.0).save_pretrained(tmp_path / "rope")
    args = ["merge", "--method", "ties", "--base", str(base), "--model", str(tmp_path / "rope"), "--density", "0.5",
            "--no-verify"]
    assert main(args + ["--out", str(tmp_path / "o1")]) == 2
    err = capsys.readouterr().err
    assert "rope_theta" in err and "--accept-config-difference" in err and "Traceback" not in err
    assert main(args + ["--out", str(tmp_path / "o2"), "--accept-config-difference", "rope_theta"]) == 0
