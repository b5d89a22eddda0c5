"""OpenAI GPT-2 decoders: ``Conv1D`` projections and a fused, stacked ``c_attn``.

GPT-2's linear layers are transformers ``Conv1D`` modules, whose weight is stored transposed
((in, out)); ``prepare`` (``statprune.surgery.linearize``) replaces them by ``nn.Linear`` before
anything reads a weight (recorded as ``linear`` ops, so the saved folder rebuilds them), and every
other part of statprune sees the usual orientation. ``c_attn`` computes queries, keys and values in
one matrix, stacked (``QKV_STACKED``), and the attention splits its output every ``split_size`` features, an
attribute set per layer with the kept heads. Multi-head attention, a GELU FFN (``c_fc``/``c_proj``),
learned positions (``wpe``), biases everywhere. The causal-LM class is ``GPT2LMHeadModel``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from statprune.adapters.base import QKV_STACKED, AttentionLayout, FFNLayout, ModelAdapter


class GPT2Adapter(ModelAdapter):
    model_types = ("gpt2",)
    layers_path = "h"
    is_decoder = True

    @classmethod
    def max_positions(cls, model: Any) -> int | None:
        """The size of the learned position table ``wpe``."""
        return int(model.base_model.wpe.num_embeddings)

    def attention(self, layer: nn.Module) -> AttentionLayout:
        hd = self.config.hidden_size // self.config.num_attention_heads
        heads = self.current_heads(layer, "attn.c_attn", hd, parts=3)
        return AttentionLayout(
            block="attn",
            q="attn.c_attn",
            k="attn.c_attn",
            v="attn.c_attn",
            o="attn.c_proj",
            n_heads=heads,
            n_kv_heads=heads,
            head_dim=hd,
            qkv=QKV_STACKED,
        )

    def prepare(self, base_model: nn.Module) -> list[dict]:
        """Every ``Conv1D`` replaced by the equivalent ``nn.Linear`` (``linear`` ops)."""
        from statprune.surgery import linearize

        return linearize(self, base_model)

    def ffn(self, layer: nn.Module) -> FFNLayout:
        width = self.linear_width(layer, "mlp.c_fc")
        return FFNLayout(inputs=("mlp.c_fc",), output="mlp.c_proj", width=width)

    def head_attributes(self, n_heads: int, n_kv_heads: int, head_dim: int) -> dict[str, dict]:
        return {"attn": {"split_size": n_heads * head_dim, "num_heads": n_heads}}
