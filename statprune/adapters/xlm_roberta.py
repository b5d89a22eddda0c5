"""XLM-RoBERTa and CamemBERT encoders: the RoBERTa architecture under other names (the same
module tree, ``encoder.layer.N.attention.self.query`` …), so RoBERTa's adapter describes them."""

from __future__ import annotations

from statprune.adapters.roberta import RobertaAdapter


class XLMRobertaAdapter(RobertaAdapter):
    model_types = ("xlm-roberta", "camembert")
