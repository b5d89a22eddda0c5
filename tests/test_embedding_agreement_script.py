"""benchmarks/embedding_agreement.py: the label-free similarity head and the Markdown section."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import _build_tiny_tokenizer, build_tiny_model, tiny_texts

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from embedding_agreement import (
    SimilarityToAnchorsForSequenceClassification,
    anchor_embeddings,
    markdown,
)

from statprune.calibration import tokenize_examples
from statprune.driver import compress
from statprune.fisher_grads import has_loss_without_labels


def test_similarity_head_scores_cosines_to_the_anchors_and_drives_stat():
    encoder, tok = build_tiny_model("bert", task="base"), _build_tiny_tokenizer()
    batches = tokenize_examples(tok, tiny_texts(40), seq_len=32, batch_size=8)
    anchors = anchor_embeddings(encoder, batches, 6)
    assert anchors.shape == (6, encoder.config.hidden_size)
    head = SimilarityToAnchorsForSequenceClassification(encoder, anchors, temperature=0.5)
    assert has_loss_without_labels(head) and head.base_model is encoder
    inputs = batches[0].inputs
    with torch.no_grad():
        logits = head(**inputs).logits
        hidden = encoder(**inputs).last_hidden_state
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    expected = torch.nn.functional.cosine_similarity(pooled.unsqueeze(1), anchors.unsqueeze(0), dim=-1) / 0.5
    assert torch.allclose(logits, expected, atol=1e-5)
    pruned, report = compress(head, tok, batches, keep_flops=0.6, progress=False)
    assert report.options["layer_weighting"].startswith("gradient")  # the head's loss drove it
    assert report.flops_kept <= 0.6 and isinstance(pruned.base_model, type(encoder))


def test_markdown_section_lists_every_row():
    rows = [
        {
            "model": "MiniLM",
            "method": m,
            "budget": b,
            "flops_kept": b,
            "params_kept": b,
            "cosine_mean": 0.9,
            "cosine_min": 0.7,
            "neighbor_overlap_at_1": 0.5,
            "neighbor_overlap_at_10": 0.6 + i / 100,
            "similarity_spearman": 0.9,
            "n_examples": 800,
            "calibration_samples": 512,
            "compress_seconds": 3.0,
        }
        for i, (m, b) in enumerate([("stat", 0.7), ("flap", 0.7), ("stat", 0.5)])
    ]
    text = markdown({"rows": rows, "machine": "test"})
    assert text.count("| MiniLM") == 0 and text.count("| 70% |") == 2 and text.count("| 50% |") == 1
    assert "on 512 unlabeled" in text and "`fisher` is absent" in text
    assert "70%: flap (50.0% top-1, 61.0% top-10)" in text


@pytest.mark.parametrize("count", [1, 100])
def test_anchor_count_is_capped_by_the_data(count):
    encoder, tok = build_tiny_model("bert", task="base"), _build_tiny_tokenizer()
    batches = tokenize_examples(tok, tiny_texts(10), seq_len=16, batch_size=4)
    assert anchor_embeddings(encoder, batches, count).shape[0] == min(count, 10)
