"""Answer.AI ModernBERT encoders: fused ``Wqkv``, a gated FFN whose ``Wi`` computes the input and
the gate in one projection (``[input; gate]``, chunked in two), rotary positions, and local
(sliding-window) attention on most layers with a global layer every few.

The fused projections are sliced block by block (``AttentionLayout.row_blocks``,
``FFNLayout.stacked``); the attention forward infers the head count from the width, and the
sliding window is a per-layer fact that pruning does not touch, so no module attribute changes.
"""

from __future__ import annotations

from torch import nn

from statprune.adapters.base import AttentionLayout, FFNLayout, ModelAdapter


class ModernBertAdapter(ModelAdapter):
    model_types = ("modernbert",)
    layers_path = "layers"

    def attention(self, layer: nn.Module) -> AttentionLayout:
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        try:
            heads = layer.get_submodule("attn.Wqkv").out_features // (3 * head_dim)
        except AttributeError:  # every head removed: the block is an EmptyAttention
            heads = 0
        return AttentionLayout(
            block="attn",
            q="attn.Wqkv",
            k="attn.Wqkv",
            v="attn.Wqkv",
            o="attn.Wo",
            n_heads=heads,
            n_kv_heads=heads,
            head_dim=head_dim,
        )

    def ffn(self, layer: nn.Module) -> FFNLayout:
        return FFNLayout(
            inputs=("mlp.Wi",), output="mlp.Wo", width=self.linear_width(layer, "mlp.Wo", "in"), stacked=2
        )

    def head_attributes(self, n_heads: int, n_kv_heads: int, head_dim: int) -> dict[str, dict]:
        return {}
