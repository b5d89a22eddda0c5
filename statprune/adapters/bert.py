"""BERT encoders (and their task-head classes); the base of the RoBERTa-style adapters, and of
MPNet's and DeBERTa-v2's, whose layers differ from BERT's only in the names of the attention
modules (the class attributes below)."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from statprune.adapters.base import AttentionLayout, FFNLayout, ModelAdapter


class BertAdapter(ModelAdapter):
    model_types = ("bert",)
    layers_path = "encoder.layer"
    # the attention module of a layer, its query/key/value projections inside it, the output one
    attention_block: ClassVar[str] = "attention.self"
    qkv_names: ClassVar[tuple[str, str, str]] = ("query", "key", "value")
    attention_output: ClassVar[str] = "attention.output.dense"

    @property
    def head_dim(self) -> int:
        return self.config.hidden_size // self.config.num_attention_heads

    def attention(self, layer: nn.Module) -> AttentionLayout:
        head_dim = self.head_dim
        q, k, v = (f"{self.attention_block}.{name}" for name in self.qkv_names)
        heads = self.current_heads(layer, q, head_dim)
        return AttentionLayout(
            block=self.attention_block,
            q=q,
            k=k,
            v=v,
            o=self.attention_output,
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
        return {self.attention_block: {"num_attention_heads": n_heads, "all_head_size": n_heads * head_dim}}
