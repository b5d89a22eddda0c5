"""FLOPs and parameter accounting of attention and FFN blocks (Kwon et al. 2022 style).

Per layer at sequence length ``s``, hidden ``d``, head dim ``d_h`` (multiply-accumulates):
a query head costs ``2·s·d·d_h`` (Q and output projections) ``+ 2·s²·d_h`` (QKᵀ and AV), a key/value
head ``2·s·d·d_h``; so a multi-head-attention head costs ``4·s·d·d_h + 2·s²·d_h``. An FFN neuron
costs ``2·s·d`` (``3·s·d`` gated), times ``k/E`` for the routed experts of a mixture-of-experts
layer (a token passes through ``k`` of ``E``; every expert's parameters count) but not for its
shared experts (Qwen2-MoE's, run on every token): a shared neuron costs ``E/k`` routed ones in
FLOPs and one in parameters, so the FLOPs of a count of a layer's neurons depend on how many of
them are shared (``shared=`` of :meth:`LayerShape.cost`). Embeddings, norms,
softmax, biases, routers and task heads are excluded; FLOPs = 2 × MACs. Parameters count the
weights and biases of the same projections.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from statprune.adapters.base import AttentionLayout, FFNLayout, HeadGroups, ModelAdapter


@dataclass(frozen=True)
class LayerShape(HeadGroups):
    """Geometry of one layer, enough to price any head/neuron count."""

    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_width: int
    gated: bool
    qkv_bias: bool
    o_bias: bool
    ffn_in_bias: bool
    ffn_out_bias: bool
    # mixture of experts: the fraction (top-k, experts) of the FFN neurons a token passes through;
    # FLOPs count those (balanced routing), parameters every expert
    ffn_active: tuple[int, int] = (1, 1)
    # of the ffn_width neurons, those of shared experts (on every token: not scaled by k/E)
    ffn_shared: int = 0

    def __post_init__(self) -> None:  # a tuple even when read back from JSON (latency tables)
        object.__setattr__(self, "ffn_active", tuple(int(v) for v in self.ffn_active))

    @property
    def heads_per_group(self) -> int:
        return self.n_heads // self.groups

    def kv_heads(self, heads: int) -> int:
        """Key/value heads left with ``heads`` query heads (GQA keeps them until none is left)."""
        if heads == 0:
            return 0
        return self.n_kv_heads if self.grouped else heads

    def attention_macs(self, heads: int, seq_len: int) -> int:
        d, hd, s = self.hidden, self.head_dim, seq_len
        return s * d * hd * (2 * heads + 2 * self.kv_heads(heads)) + 2 * s * s * hd * heads

    def shared_of(self, neurons: int, shared: int | None = None) -> int:
        """Shared-expert neurons among ``neurons`` kept: ``shared`` when given, else as many as
        keeping every expert the same fraction gives (``neurons · ffn_shared // ffn_width``: 0 or
        all of them at no neuron or every neuron kept). The allocation always gives ``shared``."""
        if shared is not None:
            return shared
        return neurons * self.ffn_shared // self.ffn_width if self.ffn_width else 0

    def ffn_macs(self, neurons: int, seq_len: int, shared: int | None = None) -> int:
        """``neurons`` kept, ``shared`` of them in shared experts (see :meth:`shared_of`)."""
        top_k, experts = self.ffn_active
        shared = self.shared_of(neurons, shared)
        per_neuron = seq_len * self.hidden * (3 if self.gated else 2)
        return (shared * experts + (neurons - shared) * top_k) * per_neuron // experts

    def attention_params(self, heads: int) -> int:
        d, hd, kv = self.hidden, self.head_dim, self.kv_heads(heads)
        weights = d * hd * (2 * heads + 2 * kv)
        return weights + (hd * (heads + 2 * kv) if self.qkv_bias else 0) + (d if self.o_bias else 0)

    def ffn_params(self, neurons: int) -> int:
        n_in = 2 if self.gated else 1
        weights = neurons * self.hidden * (n_in + 1)
        biases = (neurons * n_in if self.ffn_in_bias else 0) + (self.hidden if self.ffn_out_bias else 0)
        return weights + biases

    def cost(self, heads: int, neurons: int, kind: str, seq_len: int, shared: int | None = None) -> int:
        """FLOPs (``kind='flops'``) or parameters (``'params'``) of the layer's two blocks;
        ``shared``: shared-expert neurons among ``neurons`` (see :meth:`shared_of`)."""
        if kind == "flops":
            return 2 * (self.attention_macs(heads, seq_len) + self.ffn_macs(neurons, seq_len, shared))
        if kind == "params":
            return self.attention_params(heads) + self.ffn_params(neurons)
        raise ValueError(f"unknown cost kind {kind!r}")


def _has_bias(layer: nn.Module, path: str) -> bool:
    try:
        return getattr(layer.get_submodule(path), "bias", None) is not None
    except AttributeError:
        return False


def layer_shape(layer: nn.Module, attn: AttentionLayout, ffn: FFNLayout, hidden: int) -> LayerShape:
    """``ffn.experts`` widths past the ``ffn.active[1]`` routed experts are shared experts."""
    shared = sum(ffn.experts[ffn.active[1] :]) if ffn.experts is not None else 0
    return LayerShape(
        hidden=hidden,
        n_heads=attn.n_heads,
        n_kv_heads=attn.n_kv_heads,
        head_dim=attn.head_dim,
        ffn_width=ffn.width,
        gated=ffn.gated,
        qkv_bias=_has_bias(layer, attn.q),
        o_bias=_has_bias(layer, attn.o) or _has_bias(layer, attn.block),
        ffn_in_bias=_has_bias(layer, ffn.inputs[0]),
        ffn_out_bias=_has_bias(layer, ffn.output),
        ffn_active=ffn.active,
        ffn_shared=shared,
    )


def model_shapes(adapter: ModelAdapter, base_model: nn.Module) -> list[LayerShape]:
    """The current shape of every layer of a (possibly already pruned) model."""
    return [
        layer_shape(layer, adapter.attention(layer), adapter.ffn(layer), adapter.hidden_size)
        for layer in adapter.layers(base_model)
    ]


def total_cost(shapes: list[LayerShape], counts: list[tuple[int, int]], kind: str, seq_len: int) -> int:
    """Cost of a model whose layer ``i`` keeps ``counts[i] = (heads, neurons)``."""
    return sum(s.cost(h, n, kind, seq_len) for s, (h, n) in zip(shapes, counts, strict=True))


def dense_counts(shapes: list[LayerShape]) -> list[tuple[int, int]]:
    return [(s.n_heads, s.ffn_width) for s in shapes]
