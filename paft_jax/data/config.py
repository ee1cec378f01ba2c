"""`DataConfig`: typed, built with `paft_jax.config.from_dict` (unknown keys refused with their path)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paft_jax.config import from_dict

SOURCE_TYPES = ("auto", "jsonl", "json", "parquet", "csv", "dir", "hf_disk", "hf_hub", "tfds")


@dataclass
class SourceConfig:
    """One data source.  `path` (local file or directory, or a gs:// TFDS data_dir) or `name` (HF hub
    dataset or TFDS builder name, with `type`)."""
    path: str | None = None
    name: str | None = None
    type: str = "auto"
    split: str = "train"
    data_dir: str | None = None  # TFDS data_dir (local or gs://); HF hub: data_dir of load_dataset
    # expected number of times each row of this source is used per epoch; the fractional part is a
    # fresh random subset each epoch (seeded), so 0.5 = half the rows, 2 = every row twice
    weight: float = 1.0
    columns: dict[str, str] = field(default_factory=dict)  # rename {source column: record field}

    def __post_init__(self):
        if self.type not in SOURCE_TYPES:
            raise ValueError(f"source type {self.type!r} is not one of {SOURCE_TYPES}")
        if (self.path is None) == (self.name is None) and self.type != "tfds":
            raise ValueError("a source needs exactly one of `path` or `name`")
        if self.type in ("hf_hub", "tfds") and self.name is None:
            raise ValueError(f"a {self.type} source needs `name`")
        if self.name is not None and self.type not in ("hf_hub", "tfds"):
            raise ValueError(f"source name={self.name!r} with type {self.type!r}: a named source needs "
                             "`type: hf_hub` (a Hugging Face hub dataset) or `type: tfds`; a local file or "
                             "directory is `path:`")
        if self.weight < 0:
            raise ValueError(f"source weight must be >= 0, got {self.weight}")

    def missing_path(self) -> str | None:
        """The local file or directory this source names that does not exist (checked with the config,
        before anything loads or is written); None when there is none to check (hub names, URLs)."""
        local = self.path if self.type not in ("hf_hub", "tfds") else (self.data_dir or self.path
                                                                         if self.type == "tfds" else None)
        if local and "://" not in str(local) and not Path(local).expanduser().exists():
            return str(local)
        return None

    def label(self) -> str:
        return self.path if self.path is not None else f"{self.type}:{self.name}[{self.split}]"


@dataclass
class DataConfig:
    kind: str = "sft"                  # sft | preference
    sources: list[Any] = field(default_factory=list)  # SourceConfig mappings
    seq_len: int = 512                 # row length of packed batches and the largest bucket
    batch_size: int = 8                # global rows per step (split evenly over processes)
    pack: bool = True                  # best-fit packing; false: padded batches in length buckets
    buckets: list[int] = field(default_factory=list)  # padded mode; default seq_len/4, /2, seq_len
    max_pairs_per_row: int = 4         # preference packing: P pair slots per row (1 when not packing)
    pack_window: int = 0               # examples best-fit together (0 = the whole epoch)
    max_length: int | None = None      # tokens per sequence (SFT default seq_len; pairs seq_len // 2 each)
    max_prompt_length: int | None = None  # preference: prompt tokens kept (the end of the prompt)
    truncation_keep: str = "start"     # which part of an over-long sequence/completion is kept: start | end
    too_long: str = "truncate"         # truncate | drop (both counted)
    string_format: str = "chat"        # string prompt/completion: chat (template) | raw (concatenated)
    skip_invalid: bool = False         # count and skip invalid rows instead of failing on the first
    shuffle: bool = True
    seed: int = 0
    num_epochs: int | None = None      # None: repeat forever (what multi-process training wants)
    drop_remainder: bool = False       # drop an epoch's last partial batch instead of padding it with empty rows

    def __post_init__(self):
        if self.kind not in ("sft", "preference"):
            raise ValueError(f"data.kind must be 'sft' or 'preference', got {self.kind!r}")
        srcs = []
        for i, s in enumerate(self.sources):
            if isinstance(s, SourceConfig):
                srcs.append(s)
            elif isinstance(s, dict):
                try:
                    srcs.append(from_dict(SourceConfig, s, f"sources[{i}]."))
                except ValueError as e:
                    raise ValueError(f"data.sources[{i}]: {e}") from None
            else:
                raise ValueError(f"data.sources[{i}] must be a mapping, got {s!r}")
        self.sources = srcs
        for name in ("seq_len", "batch_size", "max_pairs_per_row"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.truncation_keep not in ("start", "end"):
            raise ValueError(f"data.truncation_keep must be 'start' or 'end', got {self.truncation_keep!r}")
        if self.too_long not in ("truncate", "drop"):
            raise ValueError(f"data.too_long must be 'truncate' or 'drop', got {self.too_long!r}")
        if self.string_format not in ("chat", "raw"):
            raise ValueError(f"data.string_format must be 'chat' or 'raw', got {self.string_format!r}")
        for b in self.buckets:
            if not 1 <= b <= self.seq_len:
                raise ValueError(f"data.buckets: {b} is not in [1, seq_len={self.seq_len}]")
        limit = self.seq_len if self.kind == "sft" else self.seq_len // 2
        if self.max_length is not None and not 1 <= self.max_length <= limit:
            raise ValueError(f"data.max_length={self.max_length} must be in [1, {limit}] "
                             f"({'seq_len' if self.kind == 'sft' else 'seq_len // 2: chosen and rejected share a row'})")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError(f"data.max_prompt_length must be >= 1, got {self.max_prompt_length}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"data.num_epochs must be >= 1 or null, got {self.num_epochs}")

    # derived settings
    def sequence_limit(self) -> int:
        if self.max_length is not None:
            return self.max_length
        return self.seq_len if self.kind == "sft" else self.seq_len // 2

    def bucket_lengths(self) -> list[int]:
        b = sorted(set(self.buckets)) if self.buckets else sorted({max(1, self.seq_len // 4),
                                                                    max(1, self.seq_len // 2), self.seq_len})
        if b[-1] != self.seq_len:
            b.append(self.seq_len)  # every example fits some bucket
        return b

    def pairs_per_row(self) -> int:
        return self.max_pairs_per_row if self.pack else 1
