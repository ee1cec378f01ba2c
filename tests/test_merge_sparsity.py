"""Delta sparsity analysis: counts, norms and sign agreement against direct NumPy computations."""
import json

import numpy as np
import pytest

from paft_jax.hf.st_io import SafetensorsFile, write_streaming
from paft_jax.merge.sparsity import analyze, format_table, module_type


def perturbed(src_dir, dst, fn):
    """Copy an HF dir, replacing every tensor t by fn(name, t)."""
    import shutil
    shutil.copytree(src_dir, dst)
    f = SafetensorsFile(src_dir / "model.safetensors")
    write_streaming(dst / "model.safetensors", [(n, f.shape(n), f.dtype(n)) for n in f.names()],
                    lambda n: fn(n, np.asarray(f.get(n))).astype(f.dtype(n)))
    return dst


@pytest.fixture
def models(hf_dir, tmp_path):
    base = hf_dir("llama")
    rng = np.random.default_rng(0)
    deltas = {}

    def sparse(name, t):
        d = rng.standard_normal(t.shape).astype(np.float32) * 1e-2
        d[rng.random(t.shape) < (0.9 if "mlp" in name else 0.2)] = 0  # mlp deltas 90% exact zeros
        d.reshape(-1)[:3] = 1e-5 * np.abs(t.reshape(-1)[:3])  # tiny: near zero at relative 1e-4, not 1e-6
        deltas[name] = d
        return t + d

    a = perturbed(base, tmp_path / "a", sparse)
    b = perturbed(base, tmp_path / "b", lambda n, t: t - deltas[n] * np.where(np.arange(t.size).reshape(t.shape) % 4 == 0, -1, 1))
    return base, a, b


def test_counts_norms_and_sign_agreement(models, tmp_path):
    base, a, b = models
    rep = analyze(base, [a, b])
    fb = SafetensorsFile(base / "model.safetensors")
    fa, fbb = SafetensorsFile(a / "model.safetensors"), SafetensorsFile(b / "model.safetensors")
    zeros = {}
    for name in fb.names():
        kind = module_type(name)
        x0 = np.asarray(fb.get(name), np.float32)
        da, db = np.asarray(fa.get(name)) - x0, np.asarray(fbb.get(name)) - x0
        r = rep["tensors"][name]
        assert r["models"][0]["zero_frac"] == pytest.approx(np.mean(da == 0))
        assert r["models"][0]["under_frac"]["0.0001"] == pytest.approx(np.mean(np.abs(da) <= 1e-4 * np.abs(x0)))
        assert r["models"][1]["l1"] == pytest.approx(np.abs(db).astype(np.float64).sum(), rel=1e-6)
        assert r["models"][1]["l2"] == pytest.approx(np.linalg.norm(db.astype(np.float64)), rel=1e-6)
        both = (da != 0) & (db != 0)
        assert r["sign_agreement"] == pytest.approx(np.mean(np.sign(da[both]) == np.sign(db[both])))
        z = zeros.setdefault(kind, [0, 0])
        z[0] += int((da == 0).sum())
        z[1] += da.size
    for kind, (nz, n) in zeros.items():
        assert rep["modules"][kind]["models"][0]["zero_frac"] == pytest.approx(nz / n)
    assert rep["modules"]["up_proj"]["models"][0]["zero_frac"] > 0.8 > rep["modules"]["q_proj"]["models"][0]["zero_frac"]
    # b = base - a's delta with every 4th element's sign kept: they disagree on about 3/4
    assert rep["total"]["sign_agreement"] == pytest.approx(0.25, abs=0.05)
    table = format_table(rep)
    assert "up_proj" in table and "TOTAL" in table and "sign=" in table


def test_cli_writes_json_and_png(models, tmp_path, capsys):
    from paft_jax.merge.cli import main
    base, a, b = models
    js, png = tmp_path / "s.json", tmp_path / "s.png"
    assert main(["sparsity", "--base", str(base), "--model", str(a), "--model", str(b), "--tol", "1e-3",
                 "--absolute", "--json", str(js), "--plot", str(png)]) == 0
    rep = json.loads(js.read_text())
    assert rep["tolerance_kind"] == "absolute" and rep["tolerances"] == [1e-3]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert "TOTAL" in capsys.readouterr().out


def test_plot_labels_every_axis_and_keeps_the_legend_off_the_bars(models):
    """The legend (2 models x 5 counts) below the axes, clear of the bars and the module names, inside the
    figure; every axis says what it measures and in which unit."""
    import matplotlib.pyplot as plt
    from paft_jax.merge.sparsity import figure
    base, a, b = models
    rep = analyze(base, [a, b])
    fig = figure(rep, names=["sft", "preference"])
    try:
        fig.canvas.draw()
        legends = fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
        assert len(legends) == 1 and len(legends[0].get_texts()) == 2 * (2 + len(rep["tolerances"]))
        box = legends[0].get_window_extent()
        assert 0 <= box.x0 and 0 <= box.y0 and box.x1 <= fig.bbox.x1 and box.y1 <= fig.bbox.y1  # not cut off
        assert len(fig.axes) == 2
        for ax in fig.axes:
            assert "fraction" in ax.get_ylabel() and "module type" in ax.get_xlabel()
            assert not box.overlaps(ax.get_window_extent())        # the data area
            for label in ax.get_xticklabels() + [ax.xaxis.label]:  # and what is written under it
                assert not box.overlaps(label.get_window_extent())
    finally:
        plt.close(fig)


def test_refuses_mismatched_models(hf_dir):
    with pytest.raises(ValueError, match="architecture"):
        analyze(hf_dir("llama"), [hf_dir("qwen2")])


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit pattern by integer round-to-nearest-even (the reference for bf16_visible)."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def test_bf16_visible_matches_integer_rounding():
    from paft_jax.merge.sparsity import bf16_visible
    # at 1.0 a bf16 step is 2**-7: a delta under half of it rounds back to the same weight
    assert not bf16_visible(np.float32([1.0]), np.float32([0.0039]))[0]
    assert bf16_visible(np.float32([1.0]), np.float32([0.0040]))[0]
    rng = np.random.default_rng(1)
    b = rng.standard_normal(100_000).astype(np.float32) * rng.choice([1e-3, 1.0, 30.0], 100_000)
    d = b * rng.choice([0, 1e-4, 2e-3, 4e-3, 1e-2], 100_000) * rng.choice([-1, 1], 100_000)
    d = d.astype(np.float32)
    want = _bf16_bits(b + d) != _bf16_bits(b)
    got = bf16_visible(b, d)
    assert np.array_equal(got, want) and 0.2 < want.mean() < 0.8


def test_report_counts_entries_visible_in_bf16(models):
    from paft_jax.merge.sparsity import bf16_visible
    base, a, b = models
    rep = analyze(base, [a, b])
    fb, fa = SafetensorsFile(base / "model.safetensors"), SafetensorsFile(a / "model.safetensors")
    seen = n = 0
    for name in fb.names():
        x0 = np.asarray(fb.get(name), np.float32)
        vis = bf16_visible(x0, np.asarray(fa.get(name), np.float32) - x0)
        assert rep["tensors"][name]["models"][0]["bf16_visible_frac"] == pytest.approx(vis.mean())
        seen, n = seen + int(vis.sum()), n + vis.size
    assert rep["total"]["models"][0]["bf16_visible_frac"] == pytest.approx(seen / n)
    # the deltas of 1e-2 sit at several bf16 steps of these small weights: most are visible, the zeros never
    assert 0 < rep["total"]["models"][0]["bf16_visible_frac"] <= 1 - rep["total"]["models"][0]["zero_frac"]
    assert "bf16vis" in format_table(rep)


def test_counts_on_the_devices_equal_the_host_ones():
    """The merge on the mesh counts each tensor's statistics where its shards are (SparsityStats.add_device):
    the same counts as the NumPy pass, norms to float32 accuracy."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from paft_jax.merge.sparsity import SparsityStats
    rng = np.random.default_rng(3)
    b = (rng.standard_normal((64, 48)) * rng.choice([1e-3, 1.0], (64, 48))).astype(np.float32)
    ds = [np.where(rng.random(b.shape) < 0.4, 0, rng.standard_normal(b.shape) * 1e-2).astype(np.float32)
          for _ in range(2)]
    ds[0].reshape(-1)[:5] = 1e-5 * np.abs(b.reshape(-1)[:5])
    host, dev = SparsityStats(), SparsityStats()
    host.add("model.layers.0.mlp.up_proj.weight", b, ds)
    where = NamedSharding(Mesh(np.array(jax.devices()), ("x",)), P("x"))
    dev.add_device("model.layers.0.mlp.up_proj.weight", jax.device_put(b, where),
                   [jax.device_put(d, where) for d in ds])
    h, d = host.report("base", ["a", "b"])["total"], dev.report("base", ["a", "b"])["total"]
    assert h["both_nonzero_frac"] == d["both_nonzero_frac"] and h["sign_agreement"] == d["sign_agreement"]
    for mh, md in zip(h["models"], d["models"]):
        for k in ("zero_frac", "under_frac", "bf16_visible_frac"):
            assert mh[k] == md[k], k
        for k in ("l1", "l2", "rel_l2"):
            assert md[k] == pytest.approx(mh[k], rel=1e-5), k
    assert 0 < h["models"][0]["zero_frac"] < 1 and h["sign_agreement"] is not None
