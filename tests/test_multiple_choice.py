"""``…ForMultipleChoice`` models: (batch, choices, seq) inputs. The conformance test compresses and
reloads them for every encoder family; here, how calibration feeds them and what is refused."""

from __future__ import annotations

import pytest
import torch
from conftest import _build_tiny_tokenizer, tiny_texts
from families import build

import statprune
from statprune.adapters import adapter_class

TOKENIZER = _build_tiny_tokenizer()


def test_calibration_texts_become_one_choice_questions():
    model = build("bert", "ForMultipleChoice")
    adapter = adapter_class(model.config)
    enc = TOKENIZER(["the cat sat", "a dog ran on the mat"], padding=True, return_tensors="pt")
    inputs = adapter.forward_inputs(model, dict(enc))
    assert inputs["input_ids"].shape == (2, 1, enc["input_ids"].shape[1])
    with torch.no_grad():
        assert model(**inputs).logits.shape == (2, 1)
    classifier = build("bert", "ForSequenceClassification")
    assert adapter.forward_inputs(classifier, dict(enc)) == dict(enc)  # other heads: unchanged


def test_multiple_choice_compresses_and_refuses_gradient_methods():
    model = build("bert", "ForMultipleChoice")
    pruned, report = statprune.compress(
        model, TOKENIZER, tiny_texts(64), keep_flops=0.6, samples=64, seq_len=16, progress=False
    )
    assert report.flops_kept <= 0.6
    enc = TOKENIZER(
        ["the cat sat", "the dog sat", "a fox ran", "a fox sat"], padding=True, return_tensors="pt"
    )
    questions = {k: v.reshape(2, 2, -1) for k, v in enc.items()}  # 2 questions of 2 choices
    with torch.no_grad():
        logits, dense = pruned(**questions).logits, model(**questions).logits
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
    assert torch.linalg.vector_norm(logits - dense) < torch.linalg.vector_norm(dense)
    with pytest.raises(
        statprune.StatpruneError, match="multiple-choice model: calibration texts are one-choice"
    ):
        statprune.compress(
            model,
            TOKENIZER,
            tiny_texts(64),
            keep_flops=0.6,
            samples=64,
            seq_len=16,
            method="fisher",
            progress=False,
        )
