"""Shared pytest fixtures."""

from __future__ import annotations

import os

# Tiny models run fastest single-threaded, and parallel test processes must not oversubscribe.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
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


# --- tiny random-weight models of every supported family -------------------------------------

TINY_FAMILIES = ("bert", "roberta", "distilbert", "mpnet", "llama", "mistral", "qwen2")
DECODER_FAMILIES = ("llama", "mistral", "qwen2")


def build_tiny_model(family: str, seed: int = 0, task: str = "classify", **overrides: Any) -> Any:
    """A tiny random-weight model (2 layers, hidden 32, 4 heads, FFN 64) of ``family``.

    Encoders get a 3-label sequence-classification head (``task="base"`` for the bare model);
    decoders are ``…ForCausalLM`` with grouped-query attention (4 query heads, 2 KV heads).
    """
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    vocab = len(TINY_SPECIALS) + len(TINY_WORDS)
    common = {
        "vocab_size": vocab,
        "num_hidden_layers": 2,
        "hidden_size": 32,
        "num_attention_heads": 4,
        "intermediate_size": 64,
    }
    if family in DECODER_FAMILIES:
        config_cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[family]
        config = config_cls(
            **{
                **common,
                "num_key_value_heads": 2,
                "max_position_embeddings": 128,
                "tie_word_embeddings": True,
                "pad_token_id": 0,
                **overrides,
            }
        )
        cls = tf.AutoModelForCausalLM
    elif family == "distilbert":
        config = tf.DistilBertConfig(
            vocab_size=vocab,
            n_layers=2,
            dim=32,
            n_heads=4,
            hidden_dim=64,
            max_position_embeddings=128,
            num_labels=3,
            pad_token_id=0,
            **overrides,
        )
        cls = tf.AutoModelForSequenceClassification if task == "classify" else tf.AutoModel
    else:
        config_cls = {"bert": tf.BertConfig, "roberta": tf.RobertaConfig, "mpnet": tf.MPNetConfig}[family]
        extra = {"max_position_embeddings": 130, "num_labels": 3, "pad_token_id": 0}
        if family == "roberta":
            extra["type_vocab_size"] = 1
        config = config_cls(**{**common, **extra, **overrides})
        cls = tf.AutoModelForSequenceClassification if task == "classify" else tf.AutoModel
    return cls.from_config(config).eval()


def tiny_texts(n: int = 200, seed: int = 0) -> list[str]:
    """Random sentences over the tiny tokenizer's vocabulary."""
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(TINY_WORDS) for _ in range(rng.randint(3, 20))) for _ in range(n)]


@pytest.fixture
def tiny_model_dir(tmp_path):
    """Factory: save a tiny model of ``family`` with its tokenizer to a folder; returns the path."""

    def make(family: str = "bert", name: str = "model", **kwargs: Any):
        model = build_tiny_model(family, **kwargs)
        tokenizer = _build_tiny_tokenizer()
        path = tmp_path / name
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        return path

    return make


@pytest.fixture
def calib_file(tmp_path):
    """A .txt calibration file of ``n`` tiny sentences."""

    def make(n: int = 200, name: str = "calib.txt"):
        path = tmp_path / name
        path.write_text("\n".join(tiny_texts(n)) + "\n")
        return path

    return make


# --- interrupted and resumed runs -----------------------------------------------------------


@contextmanager
def interrupted_after(checkpoint_dir: str | Path, stage: str, layer: int) -> Iterator[None]:
    """Run the block as if Ctrl-C struck right after the checkpoint in ``checkpoint_dir`` saved
    ``layer`` of ``stage`` (``"analyse"`` or ``"prune"``).

    ``Checkpoint.save`` is patched for the block only. Fails unless the block raised that
    ``KeyboardInterrupt`` and left a checkpoint whose ``stage`` had finished exactly ``layer``, so
    that a run resumed from it has work left to replay.
    """
    from statprune.checkpoint import Checkpoint

    save = Checkpoint.save

    def save_then_stop(self, name, at, data, inputs):
        save(self, name, at, data, inputs)
        if name == stage and at == layer:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Checkpoint, "save", save_then_stop)
        with pytest.raises(KeyboardInterrupt):
            yield
    state = json.loads((Path(checkpoint_dir) / f"{stage}.json").read_text())
    assert state["done"] == layer, state


def assert_same_weights(expected: Any, got: Any) -> None:
    """Every tensor of ``got``'s state dict equals ``expected``'s, bit for bit, in the same order."""
    import torch

    pairs = zip(expected.state_dict().items(), got.state_dict().values(), strict=True)
    for (name, a), b in pairs:
        assert torch.equal(a, b), name
