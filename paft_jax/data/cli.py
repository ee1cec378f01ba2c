"""`python -m paft_jax.launch data-stats --config CFG`: rows, tokens, truncation, invalid rows, and
padding vs packing efficiency of a data config, measured with the real tokenizer.

`register(subparsers)` adds the command to launch.py's parser."""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path



def load_data_config(path: str | None, overrides: list[str]):
    """A data config from YAML: the file is a DataConfig, or has one under `data:`."""
    from paft_jax.config import apply_overrides, from_dict, yaml_load
    from paft_jax.data.config import DataConfig
    raw: dict = {}
    if path is not None:
        raw = yaml_load(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: top level must be a mapping")
        if isinstance(raw.get("data"), dict):
            raw = raw["data"]
    raw = apply_overrides(raw, overrides)
    try:
        return from_dict(DataConfig, raw, "data.")
    except ValueError as e:
        raise ValueError(f"{path or '<overrides>'}: {e}") from None


def stats(cfg, tokenizer) -> dict:
    """Everything data-stats prints, as a dict (one process's view of the whole data set)."""
    from paft_jax.data.dataset import build_dataset
    from paft_jax.data.loader import BatchIterator
    t0 = time.perf_counter()
    ds = build_dataset(cfg, tokenizer, process_index=0, process_count=1)
    seconds = time.perf_counter() - t0
    out = {"kind": cfg.kind, "seq_len": cfg.seq_len, "batch_size": cfg.batch_size, "pack": cfg.pack,
           "tokenize_seconds": round(seconds, 2), "sources": [s.as_dict() for s in ds.stats],
           "examples": len(ds.examples)}
    if ds.examples:
        packed = BatchIterator(ds, dataclasses.replace(cfg, pack=True)).efficiency()
        padded_it = BatchIterator(ds, dataclasses.replace(cfg, pack=False))
        padded = padded_it.efficiency()
        real = packed["real_tokens"]
        out["efficiency"] = {
            "real_tokens_per_epoch": real,
            "packed": round(packed["row_efficiency"], 4), "packed_rows": packed["rows"],
            "padded_buckets": round(padded["row_efficiency"], 4), "buckets": padded_it.cfg.bucket_lengths(),
            "padded_to_seq_len": round(real / (packed["examples"] * cfg.seq_len), 4),
            "batches_per_epoch": packed["batches"] if cfg.pack else padded["batches"],
        }
        if cfg.kind == "preference":
            out["efficiency"]["max_pairs_per_row"] = cfg.max_pairs_per_row
    return out


def format_stats(s: dict) -> str:
    lines = [f"kind={s['kind']} seq_len={s['seq_len']} batch_size={s['batch_size']} pack={s['pack']} "
             f"({s['examples']} examples, tokenized in {s['tokenize_seconds']}s)"]
    for src in s["sources"]:
        inv = sum(src["invalid"].values())
        lines.append(f"  {src['label']}: rows {src['rows']}, valid {src['valid']}, invalid {inv}"
                     f"{' ' + json.dumps(src['invalid']) if inv else ''}, truncated {src['truncated']}, "
                     f"dropped (too long) {src['dropped_too_long']}, tokens {src['tokens']}, "
                     f"trained tokens {src['trained_tokens']}")
        for m in src["invalid_examples"]:
            lines.append(f"    skipped: {m}")
    e = s.get("efficiency")
    if e:
        lines.append(f"  efficiency (real tokens / slots): packed {e['packed']:.1%} ({e['packed_rows']} rows of "
                     f"{s['seq_len']}), padded in buckets {e['buckets']} {e['padded_buckets']:.1%}, padded to "
                     f"{s['seq_len']} {e['padded_to_seq_len']:.1%}; {e['batches_per_epoch']} batches per epoch")
    return "\n".join(lines)


def cmd_data_stats(args) -> int:
    from paft_jax.hf.load import _resolve, load_tokenizer
    cfg = load_data_config(args.config, (args.set or []) + (args.overrides or []))
    directory, gguf = _resolve(args.tokenizer)
    tok = load_tokenizer(directory, gguf)
    if tok is None:
        raise SystemExit(f"error: no usable tokenizer in {args.tokenizer}")
    s = stats(cfg, tok)
    print(json.dumps(s, indent=1) if args.json else format_stats(s))
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("data-stats", help="rows, tokens, truncation and padding/packing efficiency of data",
                              description="Loads, validates and tokenizes every row of a data config (as one "
                                          "process) and prints per-source counts and efficiencies.")
    p.add_argument("--config", default=None, help="YAML data config (a DataConfig, or a file with a `data:` key), "
                                                  "e.g. configs/data/arith_sft.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="override data config keys (relative to the `data:` section when the file is a "
                        "training config), e.g. seq_len=1024 skip_invalid=true")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help=argparse.SUPPRESS)  # older spelling
    p.add_argument("--tokenizer", default="smollm2",
                   help="HF model directory, .gguf file, or 'smollm2' (default) whose tokenizer and chat template "
                        "are used")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    p.set_defaults(fn=cmd_data_stats, func=cmd_data_stats)
    return p
