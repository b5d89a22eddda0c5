"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

TINY_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
TINY_WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "mat", "over", "fence"]
TINY_WORDS += ["quick", "brown", "fox", "jumps", "lazy"]


def _build_tiny_tokenizer(template: bool = True, **kwargs: Any) -> Any:
    """A word-level BERT-style fast tokenizer over ``TINY_SPECIALS + TINY_WORDS``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(TINY_SPECIALS + TINY_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if template:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
    defaults = {
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "model_input_names": ["input_ids", "token_type_ids", "attention_mask"],
    }
    return PreTrainedTokenizerFast(tokenizer_object=tok, **{**defaults, **kwargs})


@pytest.fixture
def make_tiny_tokenizer() -> Callable[..., Any]:
    """Factory for tiny tokenizer variants.

    Keyword arguments override the wrapper's (e.g. ``pad_token=None``); ``template=False`` drops
    the [CLS]/[SEP] post-processor.
    """
    return _build_tiny_tokenizer


@pytest.fixture
def tiny_tokenizer() -> Any:
    """A word-level BERT-style tokenizer: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, token_type_ids."""
    return _build_tiny_tokenizer()
