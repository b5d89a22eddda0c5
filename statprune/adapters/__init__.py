"""Model-family adapters and the registry that picks one for a model."""

from __future__ import annotations

from statprune.adapters.base import AttentionLayout, FFNLayout, ModelAdapter
from statprune.adapters.bert import BertAdapter
from statprune.adapters.distilbert import DistilBertAdapter
from statprune.adapters.llama import LlamaAdapter
from statprune.adapters.mpnet import MPNetAdapter
from statprune.errors import ModelError

ADAPTERS: tuple[type[ModelAdapter], ...] = (BertAdapter, DistilBertAdapter, MPNetAdapter, LlamaAdapter)
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for a in ADAPTERS for t in a.model_types)


def adapter_for(config) -> ModelAdapter:
    """The adapter for a transformers config, or a ``ModelError`` naming the supported families."""
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter(config)
    raise ModelError(
        f"unsupported architecture {model_type!r}; statprune supports: " + ", ".join(SUPPORTED_MODEL_TYPES)
    )


__all__ = ["ADAPTERS", "SUPPORTED_MODEL_TYPES", "AttentionLayout", "FFNLayout", "ModelAdapter", "adapter_for"]
