"""Microsoft Phi-3 decoders: Llama's layer with fused projections.

``qkv_proj`` computes queries, keys and values in one matrix, stacked (every query row, then the
key rows, then the value rows) and ``gate_up_proj`` both halves of the SwiGLU FFN (gate rows, then
up rows). The layouts say so (``QKV_STACKED``, ``FFNLayout.fused``) and the generic surgery keeps
the rows of the kept heads or neurons in each part. The attention splits the fused output at
``config.num_attention_heads · head_dim``, a model-wide field: a layer that keeps fewer heads gets
its own copy of the config with its count (``head_config``, the ``config`` op).
"""

from __future__ import annotations

from torch import nn

from statprune.adapters.base import QKV_STACKED, AttentionLayout, FFNLayout
from statprune.adapters.llama import LlamaAdapter


class Phi3Adapter(LlamaAdapter):
    model_types = ("phi3",)

    def attention(self, layer: nn.Module) -> AttentionLayout:
        hd, cfg = self.head_dim, self.config
        rows = self.current_heads(layer, "self_attn.qkv_proj", hd)  # query + 2 × key/value heads
        kv_heads = cfg.num_key_value_heads
        if kv_heads < cfg.num_attention_heads:  # grouped: the key/value heads stay (all or none)
            heads = rows - 2 * kv_heads if rows else 0
        else:  # multi-head: they go with their query heads
            heads = kv_heads = rows // 3
        return AttentionLayout(
            block="self_attn",
            q="self_attn.qkv_proj",
            k="self_attn.qkv_proj",
            v="self_attn.qkv_proj",
            o="self_attn.o_proj",
            n_heads=heads,
            n_kv_heads=kv_heads if heads else 0,
            head_dim=hd,
            qkv=QKV_STACKED,
        )

    def ffn(self, layer: nn.Module) -> FFNLayout:
        width = self.linear_width(layer, "mlp.gate_up_proj") // 2
        return FFNLayout(inputs=("mlp.gate_up_proj",), output="mlp.down_proj", width=width, fused=True)

    def head_attributes(self, n_heads: int, n_kv_heads: int, head_dim: int) -> dict[str, dict]:
        values = {"num_key_value_groups": n_heads // n_kv_heads, "num_key_value_heads": n_kv_heads}
        return {"self_attn": values}

    def head_config(self, n_heads: int, n_kv_heads: int, head_dim: int) -> dict[str, dict]:
        return {"self_attn": {"num_attention_heads": n_heads, "num_key_value_heads": n_kv_heads}}
