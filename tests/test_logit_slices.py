"""Language-model heads with a large vocabulary (Gemma-3: 262,144 tokens) go through the loss
gradients in slices of rows, so a batch's logits never exceed ``fisher_grads._LOGIT_BUDGET``
floats; the examples are independent, so the gradients are those of the whole batch."""

from __future__ import annotations

import torch
from conftest import _build_tiny_tokenizer, build_tiny_model, tiny_texts

import statprune.fisher_grads as fg
from statprune.adapters import adapter_for
from statprune.calibration import tokenize_examples

TOKENIZER = _build_tiny_tokenizer()


def _setup():
    model = build_tiny_model("llama", num_hidden_layers=2)
    batches = tokenize_examples(TOKENIZER, tiny_texts(7, seed=5), seq_len=24, batch_size=7)
    for b in batches:
        b.inputs.pop("token_type_ids", None)
    return model, adapter_for(model.config), batches


def _logit_sizes(model) -> list[int]:
    """Records the number of logits of every forward of ``model``."""
    sizes: list[int] = []
    model.get_output_embeddings().register_forward_hook(lambda m, a, out: sizes.append(out.numel()))
    return sizes


def test_slices_give_the_whole_batch_gradients_within_the_logit_budget(monkeypatch):
    model, adapter, batches = _setup()
    vocab = model.get_output_embeddings().weight.shape[0]
    tokens = batches[0].inputs["input_ids"].shape[1]
    whole_sens = fg.output_sensitivity(model, adapter, batches, covariance=True)
    whole_masks = fg.collect_mask_gradients(model, adapter, batches)

    monkeypatch.setattr(fg, "_LOGIT_BUDGET", 3 * tokens * vocab - 1)  # 2 rows a pass: 2+2+2+1
    assert fg._rows_per_pass(model, tokens, 7) == 2
    sizes = _logit_sizes(model)
    sliced_sens = fg.output_sensitivity(model, adapter, batches, covariance=True)
    sliced_masks = fg.collect_mask_gradients(model, adapter, batches)

    assert max(sizes) <= fg._LOGIT_BUDGET and len(sizes) == 8  # 4 passes for each of the two calls
    assert sliced_sens.labels == whole_sens.labels == "sampled"
    for a, b in zip(
        sliced_sens.heads + sliced_sens.neurons, whole_sens.heads + whole_sens.neurons, strict=True
    ):
        assert abs(a - b) <= 1e-5 * abs(b)
    for key, c in whole_sens.covariance.items():
        torch.testing.assert_close(sliced_sens.covariance[key], c, rtol=1e-4, atol=1e-7)
    assert sliced_masks.examples == whole_masks.examples == 7
    for a, b in zip(
        sliced_masks.heads + sliced_masks.neurons, whole_masks.heads + whole_masks.neurons, strict=True
    ):
        assert a.shape == b.shape == (7, a.shape[1])
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_classifier_is_not_sliced():
    model = build_tiny_model("bert")
    assert model.get_output_embeddings() is None
    assert fg._rows_per_pass(model, 128, 16) == 16
