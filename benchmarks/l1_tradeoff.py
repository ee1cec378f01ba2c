"""L1 on the SFT delta: sparsity vs held-out loss, penalty and both proximal modes, on SmolLM2-135M.

Trains the SFT branch (configs/smollm2_sft.yaml, bundled arithmetic set) once per setting from the same
base (loaded once), then reports the delta's exact-zero fraction, the fraction under small magnitudes,
and the held-out loss (data/arith/test.jsonl).  Writes a table (stdout and JSON) and a plot.

    XLA_FLAGS= python benchmarks/l1_tradeoff.py [--steps 20] [--settings dense,prox:0.5,padam:1e-4,pen:1e3 ...]

Settings: `dense` (no L1), `prox:LAMBDA` (l1_mode proximal), `padam:LAMBDA` (proximal_adam),
`pen:LAMBDA` (penalty).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from paft_jax.train.step_fn import delta_stats  # noqa: E402

DEFAULT = "dense,prox:0.25,prox:0.5,prox:0.75,prox:0.95,padam:1e-5,padam:1e-4,pen:100,pen:10000"
MODES = {"prox": "proximal", "padam": "proximal_adam", "pen": "penalty"}
LABELS = {"dense": "dense (no L1)", "prox": "proximal", "padam": "proximal_adam", "pen": "penalty"}
TOLS = (1e-7, 1e-6, 1e-5)


def sparsity(delta) -> dict:
    """The training loop's own per-step counter (step_fn.delta_stats), at this table's tolerances."""
    s = {k: float(v) for k, v in delta_stats(delta, TOLS).items()}
    return {"exact_zero": s["delta/zero_frac"], **{f"abs<={t:g}": s[f"delta/abs_le_{t:g}"] for t in TOLS},
            "l1_mean": s["delta/mean_abs"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs/smollm2_sft.yaml"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--settings", default=DEFAULT, help="comma list: dense | prox:LAMBDA | padam:LAMBDA | pen:LAMBDA")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/l1_tradeoff.json"))
    ap.add_argument("--plot", default=str(ROOT / "docs/img/l1_tradeoff.png"))
    ap.add_argument("--append", action="store_true", help="add these settings to the rows already in --out")
    ap.add_argument("--replot", action="store_true", help="only redraw --plot from the rows in --out")
    ap.add_argument("overrides", nargs="*", help="extra key=value for the training config")
    args = ap.parse_args()
    if args.replot:
        return plot(json.loads(Path(args.out).read_text())["rows"], Path(args.plot))

    from paft_jax.mesh import build_mesh
    from paft_jax.train.config import load_train_config
    from paft_jax.train.base import load_base
    from paft_jax.train.loop import train
    common = [f"steps={args.steps}", "eval_every=0", "eval_at_start=false", "optim.warmup_steps=2",
              "checkpoint.enabled=false", *args.overrides]
    cfg0 = load_train_config(args.config, common)
    mesh = build_mesh(cfg0.mesh)
    base = load_base(cfg0, mesh, cfg0.mesh.logical_rules())
    rows = []
    if args.append and Path(args.out).exists():
        prev = json.loads(Path(args.out).read_text())
        if prev["steps"] != args.steps or prev["overrides"] != args.overrides:
            raise SystemExit(f"--append: {args.out} was made with other steps/overrides")
        rows = [r for r in prev["rows"] if r["setting"] not in args.settings.split(",")]
    for setting in args.settings.split(","):
        mode, _, lam = setting.partition(":")
        if mode != "dense" and mode not in MODES:
            raise SystemExit(f"unknown setting {setting!r}: expected dense | prox:L | padam:L | pen:L")
        extra = [] if mode == "dense" else [f"objective.l1_lambda={lam}", f"objective.l1_mode={MODES[mode]}"]
        cfg = load_train_config(args.config, common + extra + [f"output_dir=runs/l1/{setting.replace(':', '_')}"])
        t = time.time()
        res = train(cfg, mesh=mesh, base=base, progress=True, name=setting)
        ev = [r for r in res.history if "eval_loss" in r][-1]
        row = {"setting": setting, "mode": mode, "lambda": float(lam or 0), "eval_loss": ev["eval_loss"],
               "eval_token_accuracy": ev["eval_mean_token_accuracy"],
               "train_loss_last": [r for r in res.history if "loss" in r][-1]["loss"],
               **sparsity(res.state.delta), "wall_s": time.time() - t}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del res

    print(f"\nSFT delta sparsity vs held-out loss: SmolLM2-135M, {args.steps} steps, {Path(args.config).name}\n")
    head = f"{'setting':12} {'eval loss':>9} {'tok acc':>8} {'exact 0':>8} " + \
        " ".join(f"{'<=' + format(t, 'g'):>8}" for t in TOLS) + f" {'mean|d|':>9}"
    print(head)
    order = {"dense": 0, "prox": 1, "padam": 2, "pen": 3}
    rows.sort(key=lambda r: (order[r["mode"]], r["lambda"]))
    for r in rows:
        print(f"{r['setting']:12} {r['eval_loss']:9.4f} {r['eval_token_accuracy']:8.3f} {r['exact_zero']:8.1%} " +
              " ".join(f"{r[f'abs<={t:g}']:8.1%}" for t in TOLS) + f" {r['l1_mean']:9.2e}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"steps": args.steps, "config": args.config, "overrides": args.overrides,
                                          "rows": rows}, indent=1))
    plot(rows, Path(args.plot))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, marker in (("dense", "o"), ("prox", "s"), ("padam", "D"), ("pen", "^")):
        sel = [r for r in rows if r["mode"] == mode]
        if sel:
            ax.plot([100 * r["exact_zero"] for r in sel], [r["eval_loss"] for r in sel], marker=marker,
                    linestyle="-" if len(sel) > 1 else "", label=LABELS[mode])
            for r in sel:
                if r["mode"] != "dense":
                    ax.annotate(f"{r['lambda']:g}", (100 * r["exact_zero"], r["eval_loss"]), fontsize=8,
                                textcoords="offset points", xytext=(4, 4))
    ax.axvline(90, color="gray", linestyle=":", linewidth=1)  # the bar: >= 90% exact zeros
    ax.set_xlabel("exact zeros in the SFT delta (%)")
    ax.set_ylabel("held-out loss (arith test)")
    ax.set_title("L1 on the SFT delta: sparsity vs held-out loss")
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
