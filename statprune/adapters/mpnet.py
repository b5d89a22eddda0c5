"""MPNet encoders (e.g. all-mpnet-base-v2) and their task-head classes.

MPNet adds a relative-position bias with one channel per head, computed once by the encoder and
shared by all layers; a layer that keeps fewer heads selects its heads' channels.
"""

from __future__ import annotations

from torch import nn

from statprune.adapters.bert import BertAdapter


class MPNetAdapter(BertAdapter):
    """BERT's layer with other attention module names, plus the shared position bias."""

    model_types = ("mpnet",)
    positions_after_pad = True
    attention_block = "attention.attn"
    qkv_names = ("q", "k", "v")
    attention_output = "attention.attn.o"

    def shared_head_tables(self, base_model: nn.Module) -> list[tuple[nn.Parameter, int]]:
        # MPNetEncoder.relative_attention_bias: Embedding(buckets, heads)
        return [(base_model.get_submodule("encoder.relative_attention_bias").weight, 1)]

    def head_argument_selectors(self, kept_heads: list[int]) -> list[dict]:
        # MPNetSelfAttention.forward(hidden_states, attention_mask, position_bias, ...)
        return [
            {"path": "attention.attn", "position": 2, "name": "position_bias", "dim": 1, "index": kept_heads}
        ]
