"""BERT encoders (and their task-head classes); the base of the RoBERTa-style adapters."""

from __future__ import annotations

from torch import nn

from statprune.adapters.base import AttentionLayout, FFNLayout, ModelAdapter


class BertAdapter(ModelAdapter):
    model_types = ("bert",)
    layers_path = "encoder.layer"

    def attention(self, layer: nn.Module) -> AttentionLayout:
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        heads = self.current_heads(layer, "attention.self.query", head_dim)
        return AttentionLayout(
            block="attention.self",
            q="attention.self.query",
            k="attention.self.key",
            v="attention.self.value",
            o="attention.output.dense",
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
        return {"attention.self": {"num_attention_heads": n_heads, "all_head_size": n_heads * head_dim}}
