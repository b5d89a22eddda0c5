"""MPNet encoders (e.g. all-mpnet-base-v2) and their task-head classes.

MPNet adds a relative-position bias with one channel per head, computed once by the encoder and
shared by all layers; a layer that keeps fewer heads selects its heads' channels.
"""

from __future__ import annotations

from torch import nn

from statprune.adapters.base import AttentionLayout, FFNLayout, ModelAdapter


class MPNetAdapter(ModelAdapter):
    model_types = ("mpnet",)
    layers_path = "encoder.layer"
    positions_after_pad = True

    def attention(self, layer: nn.Module) -> AttentionLayout:
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        heads = self.current_heads(layer, "attention.attn.q", head_dim)
        return AttentionLayout(
            block="attention.attn",
            q="attention.attn.q",
            k="attention.attn.k",
            v="attention.attn.v",
            o="attention.attn.o",
            n_heads=heads,
            n_kv_heads=heads,
            head_dim=head_dim,
        )

    def ffn(self, layer: nn.Module) -> FFNLayout:
        return FFNLayout(
            inputs=("intermediate.dense",),
            output="output.dense",
            width=self.linear_width(layer, "intermediate.dense"),
        )

    def head_attributes(self, n_heads: int, n_kv_heads: int, head_dim: int) -> dict[str, dict]:
        return {"attention.attn": {"num_attention_heads": n_heads, "all_head_size": n_heads * head_dim}}

    def shared_head_tables(self, base_model: nn.Module) -> list[tuple[nn.Parameter, int]]:
        # MPNetEncoder.relative_attention_bias: Embedding(buckets, heads)
        return [(base_model.get_submodule("encoder.relative_attention_bias").weight, 1)]

    def head_argument_selectors(self, kept_heads: list[int]) -> list[dict]:
        # MPNetSelfAttention.forward(hidden_states, attention_mask, position_bias, ...)
        return [
            {"path": "attention.attn", "position": 2, "name": "position_bias", "dim": 1, "index": kept_heads}
        ]
