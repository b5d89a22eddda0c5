"""EleutherAI GPT-NeoX decoders (Pythia): a fused ``query_key_value`` laid out head by head, and a
parallel residual.

``query_key_value`` holds, for each head in turn, its query, key and value rows
(``QKV_INTERLEAVED``): the attention views its output as (heads, 3 · head_dim) and chunks the last
dimension, so the head count follows the sliced rows and no attribute changes. Multi-head attention
with biases, rotary positions on part of each head (``rotary_pct``, untouched by pruning whole
heads), a GELU FFN (``dense_h_to_4h``/``dense_4h_to_h``). With ``use_parallel_residual`` (Pythia)
attention and FFN both read the layer input: the statistics hooks sit on the projections, so each
block's statistics are of the inputs it really sees either way. The cache reaches the attention as
``layer_past``, which ``EmptyAttention`` also accepts.
"""

from __future__ import annotations

from torch import nn

from statprune.adapters.base import QKV_INTERLEAVED, AttentionLayout, FFNLayout, ModelAdapter


class GPTNeoXAdapter(ModelAdapter):
    model_types = ("gpt_neox",)
    layers_path = "layers"
    is_decoder = True

    def attention(self, layer: nn.Module) -> AttentionLayout:
        hd = self.config.hidden_size // self.config.num_attention_heads
        heads = self.current_heads(layer, "attention.query_key_value", hd, parts=3)
        return AttentionLayout(
            block="attention",
            q="attention.query_key_value",
            k="attention.query_key_value",
            v="attention.query_key_value",
            o="attention.dense",
            n_heads=heads,
            n_kv_heads=heads,
            head_dim=hd,
            qkv=QKV_INTERLEAVED,
        )

    def ffn(self, layer: nn.Module) -> FFNLayout:
        width = self.linear_width(layer, "mlp.dense_h_to_4h")
        return FFNLayout(inputs=("mlp.dense_h_to_4h",), output="mlp.dense_4h_to_h", width=width)

    def head_attributes(self, n_heads: int, n_kv_heads: int, head_dim: int) -> dict[str, dict]:
        return {}
