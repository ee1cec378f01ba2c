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
    return _load(path, overrides)[0]


def _load(path: str | None, overrides: list[str]):
    """(DataConfig, the tokenizer the file's training config names or None)."""
    from paft_jax.config import apply_overrides, from_dict, yaml_load
    from paft_jax.data.config import DataConfig
    raw: dict = {}
    tokenizer = None
    if path is not None:
        raw = yaml_load(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: top level must be a mapping")
        if isinstance(raw.get("data"), dict):  # a training config: its tokenizer, else its model's
            tokenizer = raw.get("tokenizer") or (raw.get("model", "smollm2") if raw.get("model") != "random" else None)
            if tokenizer is None:
                raise ValueError(f"{path}: model: random without `tokenizer:`; give --tokenizer")
            raw = raw["data"]
    raw = apply_overrides(raw, overrides)
    try:
        return from_dict(DataConfig, raw, "data."), tokenizer
    except ValueError as e:
        raise ValueError(f"{path or '<overrides>'}: {e}") from None


def stats(cfg, tokenizer, tokenizer_name: str | None = None) -> dict:
    """Everything data-stats prints, as a dict (one process's view of the whole data set).  Every invalid row
    is counted and listed (as with skip_invalid: true); `skip_invalid` in the output is the config's own."""
    from paft_jax.data.dataset import build_dataset
    from paft_jax.data.loader import BatchIterator
    t0 = time.perf_counter()
    ds = build_dataset(dataclasses.replace(cfg, skip_invalid=True), tokenizer, process_index=0, process_count=1,
                       max_invalid_examples=10**9)
    seconds = time.perf_counter() - t0
    out = {"kind": cfg.kind, "tokenizer": tokenizer_name, "skip_invalid": cfg.skip_invalid, "seq_len": cfg.seq_len, "batch_size": cfg.batch_size, "pack": cfg.pack,
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
             f"({s['examples']} examples, tokenized in {s['tokenize_seconds']}s"
             f"{', tokenizer ' + s['tokenizer'] if s.get('tokenizer') else ''})"]
    for src in s["sources"]:
        inv = sum(src["invalid"].values())
        lines.append(f"  {src['label']}: rows {src['rows']}, valid {src['valid']}, invalid {inv}"
                     f"{' ' + json.dumps(src['invalid']) if inv else ''}, truncated {src['truncated']}, "
                     f"dropped (too long) {src['dropped_too_long']}, tokens {src['tokens']}, "
                     f"trained tokens {src['trained_tokens']}")
        for m in src["invalid_examples"]:
            lines.append(f"    invalid: {m}")
    bad = sum(sum(src["invalid"].values()) for src in s["sources"])
    if bad and not s.get("skip_invalid", True):
        lines.append(f"  note: training refuses this data at its first invalid row ({bad} invalid rows); fix them "
                     "or set skip_invalid: true")
    e = s.get("efficiency")
    if e:
        lines.append(f"  efficiency (real tokens / slots): packed {e['packed']:.1%} ({e['packed_rows']} rows of "
                     f"{s['seq_len']}), padded in buckets {e['buckets']} {e['padded_buckets']:.1%}, padded to "
                     f"{s['seq_len']} {e['padded_to_seq_len']:.1%}; {e['batches_per_epoch']} batches per epoch")
    return "\n".join(lines)


def cmd_data_stats(args) -> int:
    from paft_jax.train.base import resolve_tokenizer
    cfg, named = _load(args.config, (args.set or []) + (args.overrides or []))
    name = args.tokenizer or named or "smollm2"
    try:
        tok = resolve_tokenizer(name, None)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"--tokenizer {name}: {e}" if args.tokenizer else
                         f"{args.config}: the tokenizer of its model {name!r}: {e} (give --tokenizer)") from None
    s = stats(cfg, tok, name)
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
    p.add_argument("--tokenizer", default=None,
                   help="HF model directory, .gguf file, 'smollm2' or 'llama3-test' whose tokenizer and chat template "
                        "are used (default: the training config's `tokenizer`, else its `model`'s; 'smollm2' for a "
                        "bare data config)")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    p.set_defaults(fn=cmd_data_stats, func=cmd_data_stats)
    return p
