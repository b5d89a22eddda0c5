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


# --- the embedding head for ONNX export (statprune.export) -----------------------------------

# The modules after the Transformer that the ONNX export can put in the graph: sentence-transformers'
# own classes (imported from the installed package, never from the folder), by the last part of the
# ``type`` in modules.json. Dense and custom modules are refused (their weights are not read here).
_EXPORTABLE = ("Pooling", "Normalize")


def embedding_modules(folder: Path, modules: list[dict[str, Any]]) -> list[Any]:
    """sentence-transformers' own ``Pooling`` / ``Normalize`` modules of ``folder``, in order.

    They map ``{"token_embeddings": [batch, seq, hidden], "attention_mask": [batch, seq]}`` to
    ``sentence_embedding`` [batch, dim], exactly as ``SentenceTransformer(folder).encode`` does.
    Raises ``ModelError`` when sentence-transformers is not installed or a module after the
    Transformer is of another kind (e.g. ``Dense``): then the caller exports token embeddings.
    """
    kinds = [(str(m.get("type", "")).rsplit(".", 1)[-1], str(m.get("path", ""))) for m in modules]
    tail = [(kind, path) for kind, path in kinds if kind != "Transformer"]
    other = [kind for kind, _ in tail if kind not in _EXPORTABLE]
    if other:
        raise ModelError(
            f"{folder / MODULES_FILE} has a {other[0]} module, which the ONNX export cannot put in the "
            "graph (only Pooling and Normalize); pass --no-pooling to export token embeddings"
        )
    if not any(kind == "Pooling" for kind, _ in tail):
        raise ModelError(f"{folder / MODULES_FILE} has no Pooling module; pass --no-pooling")
    try:
        from sentence_transformers.base.modules.normalize import Normalize
        from sentence_transformers.sentence_transformer.modules.pooling import Pooling
    except ImportError:
        try:  # sentence-transformers 5
            from sentence_transformers.models import Normalize, Pooling
        except ImportError:
            raise ModelError(
                "exporting the pooling of a sentence-transformers folder needs sentence-transformers "
                "(pip install 'statprune[st]'); or pass --no-pooling"
            ) from None
    classes = {"Pooling": Pooling, "Normalize": Normalize}
    loaded = []
    for kind, path in tail:
        try:
            loaded.append(classes[kind].load(str(folder), subfolder=path.strip("/")))
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise ModelError(f"cannot read the {kind} module of {folder} ({exc})") from None
    return loaded


def is_embedding_folder(folder: Path) -> bool:
    """Whether ``folder`` is a sentence-transformers folder whose modules include a Pooling."""
    try:
        modules = read_modules(folder)
    except ModelError:
        return False
    return bool(modules) and any(str(m.get("type", "")).endswith("Pooling") for m in modules)
