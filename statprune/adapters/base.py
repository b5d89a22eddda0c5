"""What statprune needs to know about a model family: where heads and FFN neurons live.

An adapter is a description, not an algorithm (the SliceGPT ``ModelAdapter`` pattern): module
paths of the attention and FFN projections inside one layer, the head geometry, and the module
attributes that must change when a layer keeps fewer heads. The generic surgery in
``statprune.surgery`` does the slicing; adding a family is one small file.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from torch import nn


@dataclass(frozen=True)
class AttentionLayout:
    """Attention projections of one layer (paths relative to the layer module)."""

    block: str  # the module replaced by ``EmptyAttention`` when every head goes
    q: str
    k: str
    v: str
    o: str  # output projection: its input columns are the concatenated head outputs
    n_heads: int
    n_kv_heads: int
    head_dim: int

    @property
    def grouped(self) -> bool:
        """Grouped-query attention: several query heads share one key/value head."""
        return self.n_kv_heads < self.n_heads

    @property
    def groups(self) -> int:
        """Groups that must keep equal numbers of query heads (1 for multi-head attention)."""
        return self.n_kv_heads if self.grouped else 1

    @property
    def o_inside_block(self) -> bool:
        return self.o.startswith(self.block + ".")


@dataclass(frozen=True)
class FFNLayout:
    """FFN projections of one layer: ``inputs`` produce the neurons, ``output`` consumes them."""

    inputs: tuple[str, ...]  # e.g. ("intermediate.dense",) or ("mlp.gate_proj", "mlp.up_proj")
    output: str
    width: int

    @property
    def gated(self) -> bool:
        return len(self.inputs) == 2


class ModelAdapter(ABC):
    """Base class of the per-family adapters. Paths are relative to ``model.base_model``."""

    model_types: ClassVar[tuple[str, ...]]  # config.model_type values handled
    layers_path: ClassVar[str]  # the ModuleList of transformer layers
    is_decoder: ClassVar[bool] = False

    def __init__(self, config) -> None:
        self.config = config

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def layers(self, base_model: nn.Module) -> nn.ModuleList:
        return base_model.get_submodule(self.layers_path)

    def layer_path(self, index: int) -> str:
        return f"{self.layers_path}.{index}"

    @abstractmethod
    def attention(self, layer: nn.Module) -> AttentionLayout:
        """Attention layout of a layer as it is now (it may already be pruned)."""

    @abstractmethod
    def ffn(self, layer: nn.Module) -> FFNLayout:
        """FFN layout of a layer as it is now."""

    @abstractmethod
    def head_attributes(self, n_heads: int, n_kv_heads: int, head_dim: int) -> dict[str, dict]:
        """Module attributes (path relative to the layer → {name: value}) for a pruned head count."""

    def head_argument_selectors(self, kept_heads: list[int]) -> list[dict]:
        """Extra ``select_argument`` ops for per-head inputs computed outside the layer."""
        return []

    @staticmethod
    def linear_width(layer: nn.Module, path: str, dim: str = "out") -> int:
        module = layer.get_submodule(path)
        return module.out_features if dim == "out" else module.in_features

    @staticmethod
    def current_heads(layer: nn.Module, q_path: str, head_dim: int) -> int:
        """Heads currently in a layer (0 once the block was replaced by ``EmptyAttention``)."""
        try:
            q = layer.get_submodule(q_path)
        except AttributeError:
            return 0
        return q.out_features // head_dim
