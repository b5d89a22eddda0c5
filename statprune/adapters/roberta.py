"""RoBERTa encoders: BERT's layers, with learned positions numbered from ``pad_token_id + 1``."""

from __future__ import annotations

from statprune.adapters.bert import BertAdapter


class RobertaAdapter(BertAdapter):
    model_types = ("roberta",)
    positions_after_pad = True
