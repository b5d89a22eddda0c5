"""Model-family adapters and the registry that picks one for a model.

Every module of this package is imported here, and every ``ModelAdapter`` subclass that declares
``model_types`` in its own body is registered for them: adding a family is adding one file.
``REFUSED`` gives the reason for families statprune knows it cannot prune.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from statprune.adapters.base import TASK_HEADS, AttentionLayout, FFNLayout, ModelAdapter, TaskHead
from statprune.errors import ModelError

# model_type -> why statprune refuses it (named in the error, after the supported families)
REFUSED: dict[str, str] = {
    "albert": (
        "shared layer weights: every ALBERT layer reuses one set of weights, so pruning one "
        "layer's heads or neurons would prune them in all layers"
    ),
}


def _discover() -> dict[str, type[ModelAdapter]]:
    registry: dict[str, type[ModelAdapter]] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(module).values():
            if (
                isinstance(obj, type)
                and issubclass(obj, ModelAdapter)
                and obj.__module__ == module.__name__
                and "model_types" in vars(obj)
            ):
                for model_type in obj.model_types:
                    if model_type in registry:
                        raise RuntimeError(
                            f"model type {model_type!r} is claimed by both {registry[model_type].__name__} "
                            f"and {obj.__name__}"
                        )
                    registry[model_type] = obj
    return registry


REGISTRY: dict[str, type[ModelAdapter]] = _discover()
ADAPTERS: tuple[type[ModelAdapter], ...] = tuple(dict.fromkeys(REGISTRY.values()))
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(REGISTRY)


def adapter_class(config: Any) -> type[ModelAdapter]:
    """The adapter class of a config's family, or ``ModelAdapter`` itself (generic answers to the
    class-method questions: task head, causal LM, token types...) for a family statprune does not
    prune. Never raises."""
    return REGISTRY.get(getattr(config, "model_type", None), ModelAdapter)


def adapter_for(config: Any) -> ModelAdapter:
    """The adapter for a transformers config, or a ``ModelError`` naming the supported families
    (and, for a family in ``REFUSED``, why it is not one of them)."""
    model_type = getattr(config, "model_type", None)
    if model_type in REGISTRY:
        return REGISTRY[model_type](config)
    message = f"unsupported architecture {model_type!r}"
    if model_type in REFUSED:
        message += f" ({REFUSED[model_type]})"
    raise ModelError(message + "; statprune supports: " + ", ".join(SUPPORTED_MODEL_TYPES))


def task_head(model: Any) -> TaskHead | None:
    """The task head of a transformers model (None for a bare base model); see ``ModelAdapter``."""
    return adapter_class(getattr(model, "config", None)).task_head(model)


def is_causal_lm(model: Any) -> bool:
    """Whether ``model`` is a causal LM: the one check statprune uses (``ModelAdapter.is_causal_lm``)."""
    return adapter_class(getattr(model, "config", None)).is_causal_lm(model)


__all__ = [
    "ADAPTERS",
    "REFUSED",
    "REGISTRY",
    "SUPPORTED_MODEL_TYPES",
    "TASK_HEADS",
    "AttentionLayout",
    "FFNLayout",
    "ModelAdapter",
    "TaskHead",
    "adapter_class",
    "adapter_for",
    "is_causal_lm",
    "task_head",
]
