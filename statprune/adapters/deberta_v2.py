"""Microsoft DeBERTa-v2 and DeBERTa-v3 encoders (``model_type`` ``deberta-v2``).

Disentangled attention adds, per head, content-to-position and position-to-content scores: the
shared relative-position embeddings (hidden-sized, one table for all layers) go through the
layer's key and query projections (``share_att_key``, as in every released v2/v3 checkpoint) or
through its own ``pos_key_proj``/``pos_query_proj``. Either way the position projections have
one block of rows per head, so a layer that keeps fewer heads slices them with the same heads
(``head_projections``) and the pruned attention is exact for the kept heads. Attention is scaled
by ``sqrt(head_dim * (1 + len(pos_att_type)))``, which the head count does not enter.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from statprune.adapters.bert import BertAdapter


class DebertaV2Adapter(BertAdapter):
    model_types = ("deberta-v2",)
    qkv_names = ("query_proj", "key_proj", "value_proj")

    @classmethod
    def max_positions(cls, model: Any) -> int | None:
        """The absolute position table's size where there is one (``position_biased_input``);
        None for relative positions alone (DeBERTa-v3): buckets cover any length."""
        if not getattr(model.config, "position_biased_input", True):
            return None
        return super().max_positions(model)

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "attention_head_size", None) or super().head_dim

    def head_projections(self, layer: nn.Module) -> tuple[str, ...]:
        block = layer.get_submodule("attention.self")
        return tuple(
            f"attention.self.{name}"
            for name in ("pos_key_proj", "pos_query_proj")
            if isinstance(getattr(block, name, None), nn.Linear)
        )
