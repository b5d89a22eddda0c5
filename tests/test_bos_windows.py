"""Packed calibration windows and ``eval --task lm`` windows start with the BOS token of a
tokenizer that puts one before every text (Gemma, Llama 3), as the model saw in training; other
tokenizers' windows are cut as before."""

from __future__ import annotations

import torch
from conftest import _build_tiny_tokenizer, build_tiny_model, tiny_texts

from statprune.calibration import leading_bos, pack_examples
from statprune.evaluate import evaluate

PLAIN = _build_tiny_tokenizer()  # [CLS] $A [SEP] template, no bos_token
WITH_BOS = _build_tiny_tokenizer(bos_token="[CLS]")  # the same template: [CLS] is its BOS
BOS = WITH_BOS.convert_tokens_to_ids("[CLS]")


def test_leading_bos_only_where_the_tokenizer_adds_it():
    assert leading_bos(PLAIN) is None
    assert leading_bos(WITH_BOS) == BOS
    assert (
        leading_bos(_build_tiny_tokenizer(template=False, bos_token="[CLS]")) is None
    )  # declared, not added


def test_packed_windows_start_with_bos():
    texts = tiny_texts(60, seed=2)
    plain = torch.cat(
        [b.inputs["input_ids"] for b in pack_examples(PLAIN, texts, 12, 0, seq_len=16, batch_size=5)]
    )
    bos = torch.cat(
        [b.inputs["input_ids"] for b in pack_examples(WITH_BOS, texts, 12, 0, seq_len=16, batch_size=5)]
    )
    assert plain.shape == bos.shape == (12, 16)
    assert (bos[:, 0] == BOS).all() and not (plain[:, 0] == BOS).any()
    assert torch.equal(bos[:, 1:], plain[:, 1:])  # the same windows otherwise


def test_lm_eval_windows_start_with_bos_and_score_the_same_tokens():
    model = build_tiny_model("llama")
    seen: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].clone()), with_kwargs=True)
    texts = tiny_texts(40, seed=4)
    plain = evaluate(model, PLAIN, texts, task="lm", window=16, batch_size=2)
    first = torch.cat([x[:, 0] for x in seen])
    seen.clear()
    with_bos = evaluate(model, WITH_BOS, texts, task="lm", window=16, batch_size=2)
    assert first.numel() > 3 and (first != BOS).sum() >= 1
    assert all((x[:, 0] == BOS).all() for x in seen)
    assert with_bos.n_tokens == plain.n_tokens
    assert with_bos.perplexity != plain.perplexity
