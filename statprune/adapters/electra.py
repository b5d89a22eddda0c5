"""ELECTRA encoders (discriminators and generators): BERT's layers; the embeddings may be narrower
than the layers (``embedding_size``), projected up by ``embeddings_project`` before the first
layer, which pruning never touches."""

from __future__ import annotations

from statprune.adapters.bert import BertAdapter


class ElectraAdapter(BertAdapter):
    model_types = ("electra",)
