"""Merge engine: sparsify-and-fuse deltas into a base (TIES, DARE, task arithmetic, ...), in memory on
the mesh or streamed from disk, and delta sparsity analysis.  See docs/merge.md.

The names below are loaded on first use, so the streamed CLI path does not import the model code."""
import importlib

_WHERE = {"MergeSpec": "recipe", "Override": "recipe", "Recipe": "recipe", "RecipeError": "recipe",
          "load_recipe": "recipe", "merge_deltas": "tree", "merge_models": "tree", "merge_to_hf": "engine",
          "analyze": "sparsity"}
__all__ = list(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f"paft_jax.merge.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'paft_jax.merge' has no attribute {name!r}")
