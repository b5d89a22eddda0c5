"""Keep a sentence-transformers model a sentence-transformers model.

A sentence-transformers folder is a Hugging Face model folder plus ``modules.json``, which lists the
modules the embedding goes through (``Transformer`` → ``Pooling`` → ``Normalize`` …), each with its
own sub-folder (``1_Pooling/config.json``), and ``sentence_bert_config.json`` (the Transformer
module's settings, e.g. ``max_seq_length``) and ``config_sentence_transformers.json`` (prompts,
similarity function) at the top. Compression changes only the Transformer module's weights, which
live at the folder's top level; everything else is copied verbatim, so
``SentenceTransformer(OUT, trust_remote_code=True)`` runs the compressed transformer through the
input's own pooling, normalization and dense layers. Only files are read: no module is imported.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from statprune.errors import ModelError

MODULES_FILE = "modules.json"
# Top-level files of sentence-transformers itself (the Transformer module's and the model's settings).
_TOP_LEVEL = ("config_sentence_transformers.json", "sentence_bert_config.json")


def read_modules(folder: Path) -> list[dict[str, Any]] | None:
    """The module list of a sentence-transformers folder, or None for a plain Hugging Face folder.

    Raises ``ModelError`` when ``modules.json`` is unreadable, or when the transformer module is
    not the folder's top level (then the folder's own weights are not the embedding model's).
    """
    file = folder / MODULES_FILE
    if not file.is_file():
        return None
    try:
        modules = json.loads(file.read_text())
        entries = [(str(m["type"]), str(m.get("path", ""))) for m in modules]
    except (ValueError, TypeError, KeyError) as exc:
        raise ModelError(f"cannot read {file} ({exc}); fix or remove it") from None
    for kind, path in entries:
        if kind.rsplit(".", 1)[-1] == "Transformer" and path.strip("./"):
            raise ModelError(
                f"{file} puts the transformer in {path!r}, not at the folder's top level; "
                f"compress {folder / path} instead"
            )
    return modules


def copy_modules(source: Path, dest: Path, modules: list[dict[str, Any]]) -> list[str]:
    """Copy ``modules.json``, the top-level sentence-transformers settings and every module
    sub-folder from ``source`` into ``dest``; returns the copied names (relative paths)."""
    copied = [MODULES_FILE]
    shutil.copyfile(source / MODULES_FILE, dest / MODULES_FILE)
    names = list(_TOP_LEVEL) + sorted(p.name for p in source.glob("sentence_*_config.json"))
    for name in dict.fromkeys(names):
        if (source / name).is_file():
            shutil.copyfile(source / name, dest / name)
            copied.append(name)
    for module in modules:
        path = str(module.get("path", "")).strip("/")
        if not path or path in copied:
            continue
        src = source / path
        if src.is_dir():
            shutil.copytree(src, dest / path, dirs_exist_ok=True)
            copied.append(path)
    return copied


def max_seq_length(folder: Path) -> int | None:
    """The Transformer module's ``max_seq_length`` when ``sentence_bert_config.json`` sets it."""
    file = folder / "sentence_bert_config.json"
    try:
        value = json.loads(file.read_text()).get("max_seq_length") if file.is_file() else None
    except ValueError:
        return None
    return int(value) if isinstance(value, int) else None


def describe(modules: list[dict[str, Any]]) -> str:
    """The module chain, e.g. ``Transformer → Pooling → Normalize``."""
    return " → ".join(str(m.get("type", "?")).rsplit(".", 1)[-1] for m in modules)
