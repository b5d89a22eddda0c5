"""Meta OPT decoders: multi-head attention with separate projections, a two-layer ReLU FFN
(``fc1``/``fc2``) directly in the decoder layer, learned positions numbered from 2."""

from __future__ import annotations

from typing import Any

from torch import nn

from statprune.adapters.base import AttentionLayout, FFNLayout, ModelAdapter


class OPTAdapter(ModelAdapter):
    model_types = ("opt",)
    layers_path = "decoder.layers"
    is_decoder = True

    @classmethod
    def max_positions(cls, model: Any) -> int | None:
        """The position table's size less its offset (``OPTLearnedPositionalEmbedding``: 2)."""
        table = model.base_model.decoder.embed_positions
        return int(table.num_embeddings - getattr(table, "offset", 2))

    def attention(self, layer: nn.Module) -> AttentionLayout:
        hd = self.config.hidden_size // self.config.num_attention_heads
        heads = self.current_heads(layer, "self_attn.q_proj", hd)
        return AttentionLayout(
            block="self_attn",
            q="self_attn.q_proj",
            k="self_attn.k_proj",
            v="self_attn.v_proj",
            o="self_attn.out_proj",
            n_heads=heads,
            n_kv_heads=heads,
            head_dim=hd,
        )

    def ffn(self, layer: nn.Module) -> FFNLayout:
        return FFNLayout(inputs=("fc1",), output="fc2", width=self.linear_width(layer, "fc1"))

    def head_attributes(self, n_heads: int, n_kv_heads: int, head_dim: int) -> dict[str, dict]:
        return {"self_attn": {"num_heads": n_heads}}
