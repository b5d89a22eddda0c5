"""DistilBERT encoders (and their task-head classes)."""

from __future__ import annotations

from torch import nn

from statprune.adapters.base import AttentionLayout, FFNLayout, ModelAdapter


class DistilBertAdapter(ModelAdapter):
    model_types = ("distilbert",)
    layers_path = "transformer.layer"

    @property
    def hidden_size(self) -> int:
        return self.config.dim

    def attention(self, layer: nn.Module) -> AttentionLayout:
        head_dim = self.config.dim // self.config.n_heads
        heads = self.current_heads(layer, "attention.q_lin", head_dim)
        return AttentionLayout(
            block="attention",
            q="attention.q_lin",
            k="attention.k_lin",
            v="attention.v_lin",
            o="attention.out_lin",
            n_heads=heads,
            n_kv_heads=heads,
            head_dim=head_dim,
        )

    def ffn(self, layer: nn.Module) -> FFNLayout:
        return FFNLayout(inputs=("ffn.lin1",), output="ffn.lin2", width=self.linear_width(layer, "ffn.lin1"))

    def head_attributes(self, n_heads: int, n_kv_heads: int, head_dim: int) -> dict[str, dict]:
        return {"attention": {"n_heads": n_heads}}
