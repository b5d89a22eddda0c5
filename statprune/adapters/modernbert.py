"""Answer.AI ModernBERT encoders: fused ``Wqkv``, a gated FFN whose ``Wi`` computes the input and
the gate in one projection (``[input; gate]``, chunked in two), rotary positions, and local
(sliding-window) attention on most layers with a global layer every few.

``Wqkv`` stacks every query row, then every key row, then every value row (``QKV_STACKED``: the
forward views its output as (…, 3, heads, head_dim)); ``Wi`` is a fused gated input
(``FFNLayout.fused``: neuron i is rows i and width + i). The generic surgery slices both; the
attention forward infers the head count from the width, and the sliding window is a per-layer fact
that pruning does not touch, so no module attribute changes.
"""

from __future__ import annotations

from torch import nn

from statprune.adapters.base import QKV_STACKED, AttentionLayout, FFNLayout, ModelAdapter


class ModernBertAdapter(ModelAdapter):
    model_types = ("modernbert",)
    layers_path = "layers"

    @classmethod
    def sliding_window(cls, config) -> int | None:
        """The whole local window, ``local_attention`` tokens (``config.sliding_window`` is its
        half, the reach on each side)."""
        window = getattr(config, "local_attention", None)
        return window if isinstance(window, int) and window > 0 else None

    def attention(self, layer: nn.Module) -> AttentionLayout:
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        heads = self.current_heads(layer, "attn.Wqkv", head_dim, parts=3)
        return AttentionLayout(
            block="attn",
            q="attn.Wqkv",
            k="attn.Wqkv",
            v="attn.Wqkv",
            o="attn.Wo",
            n_heads=heads,
            n_kv_heads=heads,
            head_dim=head_dim,
            qkv=QKV_STACKED,
        )

    def ffn(self, layer: nn.Module) -> FFNLayout:
        width = self.linear_width(layer, "mlp.Wo", "in")
        return FFNLayout(inputs=("mlp.Wi",), output="mlp.Wo", width=width, fused=True)

    def head_attributes(self, n_heads: int, n_kv_heads: int, head_dim: int) -> dict[str, dict]:
        return {}
