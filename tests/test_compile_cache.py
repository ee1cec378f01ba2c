"""The persistent compilation cache: a run's programs are stored beside it, and a second run of the same
programs loads every one of them instead of compiling it."""
import re
import subprocess
import sys

import pytest

from paft_jax.compile_cache import cache_dir, check


def test_where_the_cache_goes():
    assert cache_dir("auto", "runs/x") == "runs/x/xla_cache"
    assert cache_dir("auto", "gs://b/run/") == "gs://b/run/xla_cache"
    assert cache_dir("off", "runs/x") is None
    assert cache_dir("/shared/xla", "runs/x") == "/shared/xla"
    with pytest.raises(ValueError, match="compile_cache=''"):
        check("")


def _sft(out, *extra):
    p = subprocess.run([sys.executable, "-m", "paft_jax.launch", "sft", "--config", "configs/tiny_sft.yaml",
                        "steps=2", "eval_data=null", f"output_dir={out}", "--no-progress", *extra],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    m = re.search(r"compilation cache: (\d+) programs loaded, (\d+) compiled and stored", p.stderr)
    assert m, p.stderr[-2000:]
    return int(m[1]), int(m[2])


def test_a_second_run_loads_every_program_from_the_cache(tmp_path):
    """Default `auto`: the cache is the run's own (output_dir/xla_cache); a shared directory serves a second
    run, which then compiles nothing."""
    loaded, compiled = _sft(tmp_path / "a")
    assert loaded == 0 and compiled > 0
    assert any((tmp_path / "a" / "xla_cache").iterdir())
    shared = tmp_path / "shared"
    loaded, compiled = _sft(tmp_path / "b", f"compile_cache={shared}")
    assert loaded == 0 and compiled > 0
    again = _sft(tmp_path / "c", f"compile_cache={shared}")
    assert again == (compiled, 0)
    off = subprocess.run([sys.executable, "-m", "paft_jax.launch", "sft", "--config", "configs/tiny_sft.yaml",
                          "steps=2", "eval_data=null", f"output_dir={tmp_path / 'd'}", "--no-progress",
                          "compile_cache=off"], capture_output=True, text=True, timeout=600)
    assert off.returncode == 0 and "compilation cache" not in off.stderr
    assert not (tmp_path / "d" / "xla_cache").exists()
