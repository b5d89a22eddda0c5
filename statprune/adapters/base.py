"""What statprune needs to know about a model family: where heads and FFN neurons live.

An adapter is a description, not an algorithm (the SliceGPT ``ModelAdapter`` pattern): module
paths of the attention and FFN projections inside one layer, the head geometry, the module
attributes that must change when a layer keeps fewer heads, and the facts about the family that
the rest of statprune asks about (encoder or decoder, which task heads it has, how its positions
are numbered, whether it takes segment ids, what a saved folder needs to load without statprune).
The generic surgery in ``statprune.surgery`` does the slicing; adding a family is one small file
in this package (it is found and registered on import, see ``statprune.adapters``).

The class methods answer for any transformers model, including families statprune cannot prune
(``statprune.adapters.adapter_class`` falls back to ``ModelAdapter`` itself for those), so that
``eval``, ``export-onnx`` and ``bench`` keep working on uncompressed models of other families.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

# how the query, key and value projections of a layer are laid out (``AttentionLayout.qkv``)
QKV_SEPARATE = "separate"  # three modules ``q``, ``k``, ``v`` (Llama, BERT)
# one fused module (``q == k == v``): every query row, then every key row, then every value row
# (Phi-3 ``qkv_proj``, GPT-2 ``c_attn``, ModernBERT ``Wqkv``)
QKV_STACKED = "stacked"
# one fused module, head by head: head h's query, key and value rows, then head h + 1's
# (GPT-NeoX ``query_key_value``; multi-head attention only)
QKV_INTERLEAVED = "interleaved"


class HeadGroups:
    """The grouped-query structure of an attention with ``n_heads`` query heads and ``n_kv_heads``
    key/value heads (shared by :class:`AttentionLayout` and ``statprune.flops.LayerShape``)."""

    n_heads: int
    n_kv_heads: int

    @property
    def grouped(self) -> bool:
        """Grouped-query attention: several query heads share one key/value head."""
        return self.n_kv_heads < self.n_heads

    @property
    def groups(self) -> int:
        """Groups that must keep equal numbers of query heads (1 for multi-head attention)."""
        return self.n_kv_heads if self.grouped else 1


@dataclass(frozen=True)
class AttentionLayout(HeadGroups):
    """Attention projections of one layer (paths relative to the layer module)."""

    block: str  # the module replaced by ``EmptyAttention`` when every head goes
    q: str
    k: str
    v: str
    o: str  # output projection: its input columns are the concatenated head outputs
    n_heads: int
    n_kv_heads: int
    head_dim: int
    qkv: str = QKV_SEPARATE  # the layout of the q/k/v rows (the ``QKV_…`` constants above)

    def __post_init__(self) -> None:
        """A fused layout names one module three times, a separate one three modules (``ValueError``
        otherwise: an adapter bug that would slice the wrong rows)."""
        if self.qkv not in (QKV_SEPARATE, QKV_STACKED, QKV_INTERLEAVED):
            raise ValueError(f"unknown q/k/v layout {self.qkv!r}")
        if (self.q == self.k == self.v) != (self.qkv != QKV_SEPARATE):
            raise ValueError(f"q/k/v layout {self.qkv!r} mismatches the paths {self.q}, {self.k}, {self.v}")

    @property
    def o_inside_block(self) -> bool:
        return self.o.startswith(self.block + ".")

    def rows(self, part: str, heads: Sequence[int] | None = None) -> tuple[str, torch.Tensor]:
        """The module computing ``part`` ("q", "k" or "v") and the rows of its weight (output
        features) that hold ``heads`` of that part (default: all of them), head by head.

        Separate modules: rows ``h·d_h … (h+1)·d_h − 1``; stacked: the same, after the rows of the
        parts before this one; interleaved: ``h·3·d_h + j·d_h + (0 … d_h − 1)`` for part j."""
        which = "qkv".index(part)
        count = self.n_heads if part == "q" else self.n_kv_heads
        index = torch.as_tensor(list(range(count) if heads is None else heads), dtype=torch.long)
        hd = self.head_dim
        if self.qkv == QKV_INTERLEAVED:
            starts = index * 3 * hd + which * hd
        elif self.qkv == QKV_STACKED:
            starts = (0, self.n_heads, self.n_heads + self.n_kv_heads)[which] * hd + index * hd
        else:
            starts = index * hd
        return getattr(self, part), (starts[:, None] + torch.arange(hd)).reshape(-1)

    def kept_rows(self, heads: Sequence[int], kv_heads: Sequence[int]) -> dict[str, torch.Tensor]:
        """Rows each q/k/v module keeps when the layer keeps the query heads ``heads`` and the
        key/value heads ``kv_heads`` (path → row indices, in the order the module's forward reads
        them); modules that keep every row are left out."""
        kept: dict[str, list[torch.Tensor]] = {}
        full: dict[str, list[torch.Tensor]] = {}
        if self.qkv == QKV_INTERLEAVED:  # head by head: all three parts of a kept head together
            hd3 = 3 * self.head_dim
            index = torch.as_tensor(list(heads), dtype=torch.long)
            kept[self.q] = [(index[:, None] * hd3 + torch.arange(hd3)).reshape(-1)]
            full[self.q] = [torch.arange(self.n_heads * hd3)]
        else:
            for part, chosen in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
                path, rows = self.rows(part, chosen)
                kept.setdefault(path, []).append(rows)
                full.setdefault(path, []).append(self.rows(part)[1])
        out = {path: torch.cat(rows) for path, rows in kept.items()}
        return {path: rows for path, rows in out.items() if not torch.equal(rows, torch.cat(full[path]))}

    def weight(self, layer: nn.Module, part: str) -> torch.Tensor:
        """The rows of ``part``'s weight, ``(heads · head_dim, in_features)``, out of a fused
        module where the projections are fused (a view for separate modules)."""
        path, rows = self.rows(part)
        w = layer.get_submodule(path).weight
        return w if self.qkv == QKV_SEPARATE else w[rows.to(w.device)]


@dataclass(frozen=True)
class FFNLayout:
    """FFN projections of one layer: ``inputs`` produce the neurons, ``output`` consumes them."""

    inputs: tuple[str, ...]  # e.g. ("intermediate.dense",) or ("mlp.gate_proj", "mlp.up_proj")
    output: str
    width: int
    # one input module computing both halves of a gated FFN, chunked in two by the forward pass:
    # neuron i is rows i and width + i (Phi-3 ``gate_up_proj`` = [gate; up], ModernBERT ``Wi`` =
    # [input; gate])
    fused: bool = False
    # mixture of experts (statprune.moe): the neurons of every routed expert, concatenated; each
    # expert's width; the module whose calls give their routed activations (``activations``); the
    # fraction of the neurons a token passes through, (top-k, experts)
    experts: tuple[int, ...] | None = None
    probe: str = ""
    active: tuple[int, int] = (1, 1)

    @property
    def gated(self) -> bool:
        return len(self.inputs) == 2 or self.fused

    def rows(self, neurons: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows of each input module's weight that compute ``neurons`` (path → row indices)."""
        neurons = torch.as_tensor(neurons, dtype=torch.long)
        if self.fused:
            return {self.inputs[0]: torch.cat([neurons, neurons + self.width])}
        return {path: neurons for path in self.inputs}

    def input_weights(self, layer: nn.Module) -> list[torch.Tensor]:
        """The input projections' weights, each ``(width, in_features)``, in the modules' order
        (a fused module's weight split in its two halves, in its row order)."""
        weights = [layer.get_submodule(path).weight for path in self.inputs]
        return [weights[0][: self.width], weights[0][self.width :]] if self.fused else weights


@dataclass(frozen=True)
class TaskHead:
    """A task-head class kind, recognized by the ending of the transformers class name."""

    kind: str  # e.g. "sequence-classification", "causal-lm"
    suffix: str  # e.g. "ForSequenceClassification"
    auto_class: str  # the ``transformers.AutoModel…`` class that loads it (the saved ``auto_map``)
    # its output has ``logits`` that a loss can be taken of without labels (the gradient layer
    # weighting and ``--method fisher``); question answering returns start/end logits instead
    logits: bool = True


TASK_HEADS: tuple[TaskHead, ...] = (
    TaskHead("sequence-classification", "ForSequenceClassification", "AutoModelForSequenceClassification"),
    TaskHead("token-classification", "ForTokenClassification", "AutoModelForTokenClassification"),
    TaskHead("question-answering", "ForQuestionAnswering", "AutoModelForQuestionAnswering", logits=False),
    TaskHead("multiple-choice", "ForMultipleChoice", "AutoModelForMultipleChoice"),
    TaskHead("masked-lm", "ForMaskedLM", "AutoModelForMaskedLM"),
    TaskHead("causal-lm", "ForCausalLM", "AutoModelForCausalLM"),
    TaskHead("causal-lm", "LMHeadModel", "AutoModelForCausalLM"),  # GPT-2 style names
)


class ModelAdapter(ABC):
    """Base class of the per-family adapters. Paths are relative to ``model.base_model``.

    A subclass that sets ``model_types`` in its own body is registered for those
    ``config.model_type`` values; an intermediate base class (none of its own) is not.
    """

    model_types: ClassVar[tuple[str, ...]] = ()  # config.model_type values handled
    layers_path: ClassVar[str]  # the ModuleList of transformer layers
    # causal self-attention with a KV cache (decoder-only LMs); encoders are bidirectional
    is_decoder: ClassVar[bool] = False
    # learned positions numbered from the padding index + 1 (RoBERTa and its descendants, MPNet)
    positions_after_pad: ClassVar[bool] = False
    task_heads: ClassVar[tuple[TaskHead, ...]] = TASK_HEADS

    # --- facts about a model of the family (class methods: they need no adapter instance) -----

    @classmethod
    def task_head(cls, model: Any) -> TaskHead | None:
        """The task head of ``model`` (None for a bare base model or a head statprune does not
        know)."""
        name = type(model).__name__
        return next((head for head in cls.task_heads if name.endswith(head.suffix)), None)

    @classmethod
    def is_causal_lm(cls, model: Any) -> bool:
        """Whether ``model`` is a causal language model (next-token logits over the vocabulary).
        The one test of this in statprune: ``export``, ``evaluate``, ``bench`` and
        ``fisher_grads`` ask here."""
        head = cls.task_head(model)
        return head is not None and head.kind == "causal-lm"

    @classmethod
    def forward_inputs(cls, model: Any, inputs: dict) -> dict:
        """Keyword arguments of ``model``'s forward for a batch of (batch, seq) token tensors: a
        multiple-choice model takes (batch, choices, seq), so each sequence becomes a question
        with one choice (its encoder sees the same (batch, seq) sequences, in the same order)."""
        head = cls.task_head(model)
        if head is None or head.kind != "multiple-choice":
            return inputs
        return {k: v.unsqueeze(1) if hasattr(v, "dim") and v.dim() == 2 else v for k, v in inputs.items()}

    @classmethod
    def auto_map(cls, model: Any, module: str) -> dict[str, str]:
        """``config.auto_map`` of a saved folder: the base class for ``AutoModel`` and the task
        class for its ``AutoModelFor…`` (``module``: the remote-code file's name without .py)."""
        mapping = {"AutoModel": f"{module}.{type(model.base_model).__name__}"}
        head = cls.task_head(model)
        if head is not None:
            mapping[head.auto_class] = f"{module}.{type(model).__name__}"
        return mapping

    @classmethod
    def remote_code_classes(cls, model: Any) -> list[str]:
        """transformers classes the saved ``modeling_statprune.py`` must define (sorted)."""
        return sorted({type(model).__name__, type(model.base_model).__name__})

    @classmethod
    def uses_token_types(cls, model: Any) -> bool:
        """Whether inputs carry ``token_type_ids`` (segment embeddings with more than one type, as
        in BERT; RoBERTa has one type, decoders none)."""
        import inspect

        if "token_type_ids" not in inspect.signature(model.forward).parameters:
            return False
        return int(getattr(model.config, "type_vocab_size", 0) or 0) > 1

    @classmethod
    def max_positions(cls, model: Any) -> int | None:
        """The longest sequence a model with a learned position table accepts (None for rotary
        decoders): the table's size, less the padding index + 1 where positions start after it
        (``embeddings.padding_idx``: MPNet fixes it at 1 whatever ``pad_token_id`` says)."""
        embeddings = getattr(model.base_model, "embeddings", None)
        table = getattr(embeddings, "position_embeddings", None)
        if not isinstance(table, nn.Embedding):
            return None
        limit = table.num_embeddings
        if cls.positions_after_pad:  # the index the module numbers from (MPNet: always 1)
            pad = getattr(embeddings, "padding_idx", None)
            if pad is None:
                pad = model.config.pad_token_id
            limit -= int(pad or 0) + 1
        return int(limit)

    @classmethod
    def sliding_window(cls, config: Any) -> int | None:
        """Tokens a sliding-window attention layer sees (``config.sliding_window`` where enabled:
        Mistral, Qwen2 with ``use_sliding_window``, Gemma2/3), else None (full attention)."""
        window = getattr(config, "sliding_window", None)
        if not isinstance(window, int) or window <= 0 or not getattr(config, "use_sliding_window", True):
            return None
        return window

    def kv_cache_head_dim(self, layout: AttentionLayout) -> int:
        """Head dimension of the zero-head keys/values that a layer which lost every head still
        records in the KV cache (so cache lengths stay right); 0 for encoders (no cache)."""
        return layout.head_dim if self.is_decoder else 0

    # --- where heads and neurons live ------------------------------------------------------------

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

    def head_parameters(self, layer: nn.Module) -> tuple[tuple[str, str], ...]:
        """Parameters inside the attention block whose last dimension runs over the concatenated
        heads' features, as (path relative to the layer, "q" or "kv"): they are sliced with the
        kept query heads ("q") or key/value heads ("kv", only when those go too), e.g. OLMo2's
        ``q_norm.weight`` of width ``n_heads * head_dim``. Empty for most families."""
        return ()

    def head_config(self, n_heads: int, n_kv_heads: int, head_dim: int) -> dict[str, dict]:
        """Config fields (path relative to the layer → {name: value}) that a module reads from
        its ``config`` per layer, for a pruned head count: the module gets its own copy of the
        config with those fields (``config`` op), e.g. Phi-3's attention, which splits its fused
        ``qkv_proj`` output at ``config.num_attention_heads · head_dim``. Empty for most families."""
        return {}

    def prepare(self, base_model: nn.Module) -> list[dict]:
        """Structural changes made (and recorded as ops) before anything is measured, e.g. fused
        expert tensors turned into per-expert widths (``statprune.adapters.moe``). None by default."""
        return []

    def neuron_attributes(self, layer: nn.Module, kept) -> dict[str, dict]:
        """Module attributes (path relative to the layer -> {name: value}) to set when the layer
        keeps FFN neurons ``kept`` (e.g. each expert's width). None by default."""
        return {}

    def head_projections(self, layer: nn.Module) -> tuple[str, ...]:
        """Further linear layers in the attention block whose output rows run over the
        concatenated query heads' features, sliced with the kept heads, e.g. DeBERTa-v2's
        ``pos_key_proj``/``pos_query_proj`` (relative-position keys and queries per head).
        Empty for most families."""
        return ()

    def head_argument_selectors(self, kept_heads: list[int]) -> list[dict]:
        """Extra ``select_argument`` ops for per-head inputs computed outside the layer."""
        return []

    def shared_head_tables(self, base_model: nn.Module) -> list[tuple[nn.Parameter, int]]:
        """Per-head parameters outside the layers, shared by all of them, as (parameter, the
        dimension that indexes heads), e.g. MPNet's relative-position bias: one channel per head,
        which ``head_argument_selectors`` selects for each layer. Empty for most families."""
        return []

    @staticmethod
    def linear_width(layer: nn.Module, path: str, dim: str = "out") -> int:
        """Output (``dim="out"``) or input features of a linear module; transformers' ``Conv1D``
        (GPT-2, weight stored as (in, out)) counts as one until ``surgery.linearize`` converts it."""
        module = layer.get_submodule(path)
        if not hasattr(module, "out_features"):  # Conv1D: nf outputs, nx inputs
            return module.nf if dim == "out" else module.nx
        return module.out_features if dim == "out" else module.in_features

    @classmethod
    def current_heads(cls, layer: nn.Module, q_path: str, head_dim: int, parts: int = 1) -> int:
        """Heads currently in a layer (0 once the block was replaced by ``EmptyAttention``):
        the output features of ``q_path`` over ``parts · head_dim`` (3 for a fused q/k/v module
        whose key/value heads go with the query heads)."""
        try:
            layer.get_submodule(q_path)
        except AttributeError:
            return 0
        return cls.linear_width(layer, q_path) // (parts * head_dim)
