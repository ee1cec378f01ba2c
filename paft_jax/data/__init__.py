"""Data: validated records, chat-template tokenization with loss masks, packing, resumable sharded batches.

Trainer entry points: `DataConfig` (config.py), `make_loader(cfg, tokenizer)` -> `BatchIterator`
(`__next__`, `state()`, `restore(state)`), `to_global(batch, mesh)`.  docs/data.md has the contract.
"""
from paft_jax.data.config import DataConfig, SourceConfig
from paft_jax.data.dataset import Example, SourceStats, TokenizedDataset, build_dataset
from paft_jax.data.loader import BatchIterator, batch_sharding, global_steps_per_epoch, make_loader, one_pass, to_global
from paft_jax.data.records import DataError
from paft_jax.data.tokenize import ChatTokenizer

__all__ = ["BatchIterator", "ChatTokenizer", "DataConfig", "DataError", "Example", "SourceConfig", "SourceStats",
           "TokenizedDataset", "batch_sharding", "build_dataset", "global_steps_per_epoch", "make_loader", "one_pass", "to_global"]
