"""Llama-style decoders: Llama, Mistral, Qwen2 (GQA, SwiGLU FFN, optional tied embeddings)."""

from __future__ import annotations

from torch import nn

from statprune.adapters.base import AttentionLayout, FFNLayout, ModelAdapter


class LlamaAdapter(ModelAdapter):
    model_types = ("llama", "mistral", "qwen2")
    layers_path = "layers"
    is_decoder = True

    @property
    def head_dim(self) -> int:
        cfg = self.config
        return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    def attention(self, layer: nn.Module) -> AttentionLayout:
        hd = self.head_dim
        heads = self.current_heads(layer, "self_attn.q_proj", hd)
        kv_heads = self.current_heads(layer, "self_attn.k_proj", hd)
        return AttentionLayout(
            block="self_attn",
            q="self_attn.q_proj",
            k="self_attn.k_proj",
            v="self_attn.v_proj",
            o="self_attn.o_proj",
            n_heads=heads,
            n_kv_heads=kv_heads,
            head_dim=hd,
        )

    def ffn(self, layer: nn.Module) -> FFNLayout:
        return FFNLayout(
            inputs=("mlp.gate_proj", "mlp.up_proj"),
            output="mlp.down_proj",
            width=self.linear_width(layer, "mlp.up_proj"),
        )

    def head_attributes(self, n_heads: int, n_kv_heads: int, head_dim: int) -> dict[str, dict]:
        return {"self_attn": {"num_key_value_groups": n_heads // n_kv_heads}}
