"""Evaluation: metrics against hand computations, agreement with a reference, errors, and the CLI."""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math

import pytest
import torch
from conftest import _build_tiny_tokenizer, build_tiny_model, tiny_texts

from statprune.errors import DataError, ModelError
from statprune.evaluate import (
    EvalResult,
    add_eval_parser,
    detect_task,
    embedding_agreement,
    evaluate,
    evaluate_paths,
    lm_windows,
    paired_change_interval,
    read_labels,
    run_eval,
    wilson_interval,
)

LABELS = {0: "neg", 1: "neu", 2: "pos"}


@pytest.fixture(scope="module")
def tok():
    return _build_tiny_tokenizer()


def perturbed(model, scale: float = 0.05, seed: int = 1):
    """A copy of ``model`` with Gaussian noise added to every weight."""
    noisy = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in noisy.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * scale)
    return noisy


def varied_classifier(family: str = "bert", **overrides):
    """A tiny classifier whose argmax varies across inputs (a random head barely does)."""
    model = build_tiny_model(family, id2label=LABELS, label2id={v: k for k, v in LABELS.items()}, **overrides)
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 3][-1]
    tok = _build_tiny_tokenizer()
    with torch.no_grad():  # centre the logits over typical inputs, then sharpen them
        logits = [model(**tok(t, return_tensors="pt")).logits for t in tiny_texts(50, seed=9)]
        mean = torch.cat(logits).mean(0)
        head.bias.sub_(mean).mul_(20.0)
        head.weight.mul_(20.0)
    return model


def own_predictions(model, tok, texts) -> list[int]:
    """The model's argmax for each text, one unpadded example at a time."""
    with torch.no_grad():
        return [int(model(**tok(t, return_tensors="pt")).logits.argmax(-1)) for t in texts]


def lm_text(n_words: int, seed: int = 0) -> str:
    import random

    from conftest import TINY_WORDS

    rng = random.Random(seed)
    return " ".join(rng.choice(TINY_WORDS) for _ in range(n_words))


# ------------------------------------------------------------------------------- task detection


@pytest.mark.parametrize(
    ("family", "task", "expected"),
    [
        ("bert", "classify", "classify"),
        ("roberta", "classify", "classify"),
        ("distilbert", "classify", "classify"),
        ("mpnet", "classify", "classify"),
        ("bert", "base", "embed"),
        ("roberta", "base", "embed"),
        ("distilbert", "base", "embed"),
        ("mpnet", "base", "embed"),
        ("llama", "classify", "lm"),
        ("mistral", "classify", "lm"),
        ("qwen2", "classify", "lm"),
    ],
)
def test_detect_task(family, task, expected):
    assert detect_task(build_tiny_model(family, task=task)) == expected


def test_detect_task_decoder_base_model_is_embed():
    assert detect_task(build_tiny_model("llama").model) == "embed"


def test_detect_task_of_loaded_folder(tiny_model_dir):
    import statprune

    assert detect_task(statprune.load(tiny_model_dir("bert"))) == "classify"
    assert detect_task(statprune.load(tiny_model_dir("llama", name="lm"))) == "lm"


def test_detect_task_unknown_head_asks_for_task():
    from transformers import BertConfig, BertForMaskedLM

    model = BertForMaskedLM(
        BertConfig(
            vocab_size=19, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64
        )
    )
    with pytest.raises(ModelError, match="--task embed"):
        detect_task(model)
    result = evaluate(model, _build_tiny_tokenizer(), tiny_texts(4), task="embed", reference=model)
    assert result.task == "embed"
    assert result.cosine_min == pytest.approx(1.0)


# -------------------------------------------------------------------------------------- classify


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "mpnet"])
def test_classify_against_itself(family, tok):
    model = varied_classifier(family)
    texts = tiny_texts(30)
    result = evaluate(model, tok, texts, reference=copy.deepcopy(model), batch_size=7)
    assert result.task == "classify"
    assert result.n_examples == 30
    assert result.n_tokens == sum(len(tok(t)["input_ids"]) for t in texts)
    assert result.agreement == 1.0
    assert result.kl == pytest.approx(0.0, abs=1e-9)
    assert result.accuracy is None and result.reference_accuracy is None
    assert result.perplexity is None and result.cosine_mean is None


def test_classify_perturbed_copy_disagrees(tok):
    model = varied_classifier()
    texts = tiny_texts(60)
    assert len(set(own_predictions(model, tok, texts))) > 1
    result = evaluate(perturbed(model, 0.2), tok, texts, reference=model)
    assert result.agreement < 1.0
    assert result.kl > 1e-4


def test_accuracy_matches_hand_computation(tok):
    model = varied_classifier()
    texts = tiny_texts(40, seed=3)
    preds = own_predictions(model, tok, texts)
    labels = [p if i % 3 else (p + 1) % 3 for i, p in enumerate(preds)]
    expected = sum(p == y for p, y in zip(preds, labels, strict=True)) / len(texts)
    result = evaluate(model, tok, texts, labels=labels, batch_size=8)
    assert result.accuracy == pytest.approx(expected)
    names = [LABELS[y] for y in labels]  # label names map through config.label2id
    assert evaluate(model, tok, texts, labels=names).accuracy == pytest.approx(expected)
    ref = evaluate(perturbed(model, 0.2), tok, texts, labels=labels, reference=model)
    assert ref.reference_accuracy == pytest.approx(expected)
    low, high = ref.accuracy_interval
    assert low <= ref.accuracy <= high and 0 < high - low < 0.5
    low, high = ref.accuracy_change_interval
    assert low <= ref.accuracy - ref.reference_accuracy <= high
    same = evaluate(model, tok, texts, labels=labels, reference=model)
    assert same.accuracy_change_interval == (0.0, 0.0)  # identical predictions: no uncertainty
    assert "95% CI" in ref.summary() and "change" in ref.summary()


def test_wilson_interval_known_values():
    low, high = wilson_interval(8, 10)  # textbook: 0.490 to 0.943
    assert (round(low, 3), round(high, 3)) == (0.49, 0.943)
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == 1.0
    assert wilson_interval(0, 0) is None
    narrow, wide = wilson_interval(400, 800), wilson_interval(5, 10)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]


def test_paired_change_interval_counts_only_disagreements():
    ref = torch.tensor([True] * 90 + [False] * 10)
    better = ref.clone()
    better[90:95] = True  # 5 more right, none lost
    low, high = paired_change_interval(better, ref)
    assert low < 0.05 < high and low > 0  # +0.05, significantly above zero
    mixed = ref.clone()
    mixed[90:95] = True
    mixed[:5] = False  # 5 gained, 5 lost: no change, interval around zero
    low, high = paired_change_interval(mixed, ref)
    assert low < 0 < high and high == pytest.approx(-low)


@pytest.mark.parametrize("pad_token_id", [0, None])
def test_decoder_classifier(pad_token_id, tok):
    """Llama-style classifiers read each row's last real token; without a pad id they cannot batch."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=19,
        num_hidden_layers=1,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        num_labels=3,
        pad_token_id=pad_token_id,
        initializer_range=1.0,
    )
    model = LlamaForSequenceClassification(config).eval()
    texts = tiny_texts(12, seed=7)
    preds = own_predictions(model, tok, texts)
    assert len(set(preds)) > 1
    result = evaluate(model, tok, texts, labels=preds, reference=model, batch_size=5)
    assert result.accuracy == 1.0
    assert result.agreement == 1.0


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_accuracy_from_labelled_file(tmp_path, tok, fmt):
    model = varied_classifier()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    texts = tiny_texts(25, seed=5)
    preds = own_predictions(model, tok, texts)
    labels = [p if i % 2 else (p + 2) % 3 for i, p in enumerate(preds)]
    expected = sum(p == y for p, y in zip(preds, labels, strict=True)) / len(texts)
    data = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":  # ids, names, a blank text (skipped in step with its label)
        rows = [
            {"text": t, "y": LABELS[y] if i % 2 else y}
            for i, (t, y) in enumerate(zip(texts, labels, strict=True))
        ]
        rows.insert(4, {"text": "  ", "y": "pos"})
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        with data.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "y"])
            writer.writerows([t, str(y)] for t, y in zip(texts, labels, strict=True))
    result = evaluate_paths(tmp_path / "model", data, label_field="y", device="cpu")
    assert result.task == "classify"
    assert result.n_examples == 25
    assert result.accuracy == pytest.approx(expected)
    first = evaluate_paths(tmp_path / "model", data, label_field="y", samples=10, device="cpu")
    assert first.n_examples == 10
    assert first.accuracy == pytest.approx(
        sum(p == y for p, y in zip(preds[:10], labels[:10], strict=True)) / 10
    )


def test_unlabelled_data_has_no_accuracy(tmp_path, tiny_model_dir):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(tiny_texts(5))))
    result = evaluate_paths(tiny_model_dir("bert"), data, device="cpu")
    assert result.accuracy is None
    assert result.n_examples == 5
    txt = tmp_path / "data.txt"
    txt.write_text("\n".join(tiny_texts(5)))
    assert evaluate_paths(tiny_model_dir("bert", name="m2"), txt, device="cpu").accuracy is None


# ----------------------------------------------------------------------------------------- embed


@pytest.mark.parametrize("family", ["bert", "distilbert", "mpnet"])
def test_embed_against_itself_and_perturbed(family, tok):
    model = build_tiny_model(family, task="base")
    texts = tiny_texts(20)
    same = evaluate(model, tok, texts, reference=copy.deepcopy(model), batch_size=6)
    assert same.task == "embed"
    assert same.cosine_mean == pytest.approx(1.0, abs=1e-6)
    assert same.cosine_min == pytest.approx(1.0, abs=1e-6)
    noisy = evaluate(perturbed(model), tok, texts, reference=model)
    assert noisy.cosine_min <= noisy.cosine_mean < 0.999


def test_embed_neighbour_metrics_of_identical_and_perturbed_models(tok):
    model = build_tiny_model("bert", task="base")
    texts = tiny_texts(30)
    same = evaluate(model, tok, texts, reference=copy.deepcopy(model), batch_size=7)
    assert same.neighbor_overlap_at_1 == 1.0
    assert same.neighbor_overlap_at_10 == 1.0
    assert same.similarity_spearman == pytest.approx(1.0, abs=1e-9)
    assert same.similarity_spearman_examples == 30
    assert "top-10 1.0000" in same.summary() and "(Spearman): 1.0000" in same.summary()
    noisy = evaluate(perturbed(model, scale=0.2), tok, texts, reference=model)
    assert 0.0 <= noisy.neighbor_overlap_at_10 < 1.0
    assert noisy.similarity_spearman < 1.0 - 1e-6


def brute_force_overlap(emb, ref, k):
    def neighbours(x, i):
        sims = [
            (float(torch.nn.functional.cosine_similarity(x[i], x[j], dim=0)), j)
            for j in range(len(x))
            if j != i
        ]
        return {j for _, j in sorted(sims, reverse=True)[:k]}

    return sum(len(neighbours(emb, i) & neighbours(ref, i)) / k for i in range(len(emb))) / len(emb)


def test_embedding_agreement_against_brute_force():
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(40, 8, generator=gen, dtype=torch.float64)
    emb = ref + 0.6 * torch.randn(40, 8, generator=gen, dtype=torch.float64)
    got = embedding_agreement(emb, ref, ks=(1, 3, 10))
    for k in (1, 3, 10):
        assert got[f"neighbor_overlap_at_{k}"] == pytest.approx(brute_force_overlap(emb, ref, k), abs=1e-12)
    assert 0.0 < got["neighbor_overlap_at_1"] < 1.0
    from scipy.stats import spearmanr

    iu = torch.triu_indices(40, 40, 1)
    unit, ref_unit = (torch.nn.functional.normalize(x, dim=1) for x in (emb, ref))
    pairs = (unit @ unit.T)[iu[0], iu[1]], (ref_unit @ ref_unit.T)[iu[0], iu[1]]
    assert got["similarity_spearman"] == pytest.approx(spearmanr(*pairs).statistic, abs=1e-12)


def test_embedding_agreement_invariances_and_shuffled_outputs():
    gen = torch.Generator().manual_seed(1)
    ref = torch.randn(200, 16, generator=gen, dtype=torch.float64)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen, dtype=torch.float64))
    scaled = 3.0 * (ref @ rotation)  # cosine structure unchanged
    same = embedding_agreement(scaled, ref)
    assert same["neighbor_overlap_at_1"] == 1.0 and same["neighbor_overlap_at_10"] == 1.0
    assert same["similarity_spearman"] == pytest.approx(1.0, abs=1e-12)
    # a model whose outputs belong to other inputs: neighbours at chance level (k / (n - 1))
    shuffled = embedding_agreement(ref[torch.randperm(200, generator=gen)], ref)
    assert shuffled["neighbor_overlap_at_1"] < 0.05
    assert shuffled["neighbor_overlap_at_10"] < 0.15
    assert abs(shuffled["similarity_spearman"]) < 0.1


def test_embedding_agreement_small_sets_and_spearman_cap():
    ref = torch.randn(5, 4, dtype=torch.float64)
    small = embedding_agreement(ref, ref)
    assert small["neighbor_overlap_at_1"] == 1.0
    assert small["neighbor_overlap_at_10"] is None  # 5 examples have 4 neighbours each
    capped = embedding_agreement(torch.randn(50, 4), torch.randn(50, 4), spearman_max_examples=20)
    assert capped["similarity_spearman_examples"] == 20 and capped["neighbor_examples"] == 50
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(60, 4, generator=gen, dtype=torch.float64)
    noisy = base + 0.5 * torch.randn(60, 4, generator=gen, dtype=torch.float64)
    few = embedding_agreement(noisy, base, neighbor_max_examples=30)
    evenly = torch.linspace(0, 59, 30).round().long()  # searched among these 30 only
    assert few["neighbor_examples"] == 30
    subset = embedding_agreement(noisy[evenly], base[evenly])
    assert few["neighbor_overlap_at_10"] == subset["neighbor_overlap_at_10"]
    assert few["neighbor_overlap_at_10"] != embedding_agreement(noisy, base)["neighbor_overlap_at_10"]
    with pytest.raises(ValueError, match="5 rows against 4"):
        embedding_agreement(ref, ref[:4])


def test_embeddings_are_mask_weighted_means(tok):
    """Padding must not move the pooled embeddings: batched equals one-at-a-time."""
    model = build_tiny_model("bert", task="base")
    other = perturbed(model)
    texts = tiny_texts(9)
    batched = evaluate(other, tok, texts, reference=model, batch_size=9)
    cosines = []
    with torch.no_grad():
        for text in texts:
            enc = tok(text, return_tensors="pt")
            a, b = other(**enc).last_hidden_state.mean(1), model(**enc).last_hidden_state.mean(1)
            cosines.append(float(torch.nn.functional.cosine_similarity(a, b)))
    assert batched.cosine_mean == pytest.approx(sum(cosines) / len(cosines), abs=1e-5)
    assert batched.cosine_min == pytest.approx(min(cosines), abs=1e-5)


# -------------------------------------------------------------------------------------------- lm


def hand_perplexity(model, ids: list[int]) -> float:
    with torch.no_grad():
        x = torch.tensor([ids])
        logp = model(input_ids=x).logits[0, :-1].float().log_softmax(-1)
        nll = -logp.gather(-1, x[0, 1:, None]).squeeze(-1)
    return math.exp(float(nll.double().mean()))


def hf_strided_perplexity(model, ids: list[int], window: int, stride: int) -> tuple[float, int]:
    """The recipe of the Hugging Face perplexity guide, written independently: the model's own
    loss over labels where all but the last ``end - prev_end`` tokens are masked with -100."""
    x = torch.tensor([ids])
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, len(ids), stride):
            end = min(begin + window, len(ids))
            trg_len = end - prev_end
            input_ids = x[:, begin:end]
            target = input_ids.clone()
            target[:, :-trg_len] = -100
            loss = model(input_ids=input_ids, labels=target).loss
            valid = int((target[:, 1:] != -100).sum())  # the loss shifts labels left by one
            nll_sum += float(loss) * valid
            n_tokens += valid
            prev_end = end
            if end == len(ids):
                break
    return math.exp(nll_sum / n_tokens), n_tokens


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_perplexity_matches_hand_computation(family, tok):
    model = build_tiny_model(family)
    text = lm_text(40)
    ids = tok(text)["input_ids"]
    result = evaluate(model, tok, [text], window=64)
    assert result.task == "lm"
    assert (result.window, result.stride) == (64, 64)
    assert result.n_tokens == len(ids) - 1
    assert result.perplexity == pytest.approx(hand_perplexity(model, ids), rel=1e-5)


def test_lm_texts_are_joined(tok):
    model = build_tiny_model("llama")
    texts = ["the cat sat", "on the mat", "a dog ran"]
    ids = tok("\n\n".join(texts))["input_ids"]
    result = evaluate(model, tok, texts)
    assert result.n_examples == 3
    assert result.perplexity == pytest.approx(hand_perplexity(model, ids), rel=1e-5)


@pytest.mark.parametrize(("window", "stride"), [(32, 8), (32, 31), (48, 20), (16, 1)])
def test_strided_perplexity(window, stride, tok):
    model = build_tiny_model("llama")
    text = lm_text(110, seed=2)
    ids = tok(text)["input_ids"]
    assert len(ids) <= 128  # full context fits the tiny model's positions
    result = evaluate(model, tok, [text], window=window, stride=stride, batch_size=3)
    assert (result.window, result.stride) == (window, stride)
    assert result.n_tokens == len(ids) - 1  # every token after the first scored exactly once
    expected, count = hf_strided_perplexity(model, ids, window, stride)
    assert count == result.n_tokens
    assert result.perplexity == pytest.approx(expected, rel=1e-5)
    full = hand_perplexity(model, ids)
    assert result.perplexity == pytest.approx(full, rel=0.05)


def test_non_overlapping_windows_skip_each_first_token(tok):
    model = build_tiny_model("llama")
    text = lm_text(100, seed=4)
    ids = tok(text)["input_ids"]
    result = evaluate(model, tok, [text], window=30)
    n_windows = math.ceil(len(ids) / 30)
    assert result.stride == 30
    assert result.n_tokens == len(ids) - n_windows
    expected, _ = hf_strided_perplexity(model, ids, 30, 30)
    assert result.perplexity == pytest.approx(expected, rel=1e-5)


def test_lm_windows_cover_every_token_once():
    for n, window, stride in [(10, 4, 2), (100, 32, 8), (7, 7, 7), (5, 10, 3), (33, 8, 8)]:
        scored = [t for _, end, first in lm_windows(n, window, stride) for t in range(first, end)]
        if stride < window:
            assert scored == list(range(1, n))
        else:
            assert sorted(set(scored)) == scored
            assert len(scored) == n - len(lm_windows(n, window, stride))
        assert all(end - begin <= window for begin, end, _ in lm_windows(n, window, stride))


def test_default_window_respects_max_positions(tok):
    model = build_tiny_model("llama")  # 128 positions
    result = evaluate(model, tok, [lm_text(300)])
    assert (result.window, result.stride) == (128, 128)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_lm_against_itself_and_perturbed(family, tok):
    model = build_tiny_model(family)
    texts = tiny_texts(30)
    same = evaluate(model, tok, texts, reference=copy.deepcopy(model), window=64, stride=32)
    assert same.perplexity_ratio == pytest.approx(1.0, abs=1e-9)
    assert same.reference_perplexity == pytest.approx(same.perplexity)
    assert same.agreement == 1.0
    assert same.kl == pytest.approx(0.0, abs=1e-9)
    noisy = evaluate(perturbed(model, 0.1), tok, texts, reference=model, window=64, stride=32)
    assert noisy.perplexity_ratio != pytest.approx(1.0, abs=1e-3)
    assert noisy.agreement < 1.0
    assert noisy.kl > 1e-4


# ---------------------------------------------------------------------------------------- errors


def test_missing_label_field_lists_fields(tmp_path, tiny_model_dir):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "the cat", "label": 1}\n{"text": "a dog", "labl": 2}\n')
    with pytest.raises(DataError, match=r"line 2 has no field 'label' \(fields: 'text', 'labl'\)"):
        evaluate_paths(tiny_model_dir("bert"), data, device="cpu")
    with pytest.raises(DataError, match=r"no field 'gold' \(fields: 'text', 'label'\).*--label-field"):
        read_labels(data, "gold")
    table = tmp_path / "data.csv"
    table.write_text("text,stars\nthe cat,1\n")
    with pytest.raises(DataError, match=r"header has no field 'label' \(fields: 'text', 'stars'\)"):
        read_labels(table, "label")
    assert read_labels(table) is None  # the default field is optional


def test_label_errors(tok):
    model = varied_classifier()
    with pytest.raises(DataError, match=r"'great' of example 2 is not one of the model's labels"):
        evaluate(model, tok, ["the cat", "a dog"], labels=["pos", "great"])
    with pytest.raises(DataError, match=r"outside 0\.\.2"):
        evaluate(model, tok, ["the cat"], labels=[3])
    with pytest.raises(DataError, match="2 labels for 1 examples"):
        evaluate(model, tok, ["the cat"], labels=[0, 1])


def test_unknown_task(tok, tmp_path, tiny_model_dir):
    model = build_tiny_model("bert")
    with pytest.raises(DataError, match="unknown task 'regress'; use auto, classify, lm, embed"):
        evaluate(model, tok, ["the cat"], task="regress")
    data = tmp_path / "d.txt"
    data.write_text("the cat\n")
    with pytest.raises(DataError, match="unknown task"):
        evaluate_paths(tiny_model_dir("bert"), data, task="regress")


def test_task_that_the_model_cannot_do(tok):
    with pytest.raises(ModelError, match="--task lm needs a …ForCausalLM model"):
        evaluate(build_tiny_model("bert"), tok, ["the cat"], task="lm")
    with pytest.raises(ModelError, match="--task classify needs"):
        evaluate(build_tiny_model("llama"), tok, ["the cat"], task="classify")


def test_incompatible_reference(tok):
    model = build_tiny_model("bert")
    with pytest.raises(ModelError, match="3 labels but the reference has 2"):
        evaluate(model, tok, ["the cat"], reference=build_tiny_model("bert", num_labels=2))
    with pytest.raises(ModelError, match="the reference model is a LlamaForCausalLM"):
        evaluate(model, tok, ["the cat"], reference=build_tiny_model("llama"))


def test_empty_data(tok, tmp_path, tiny_model_dir):
    with pytest.raises(DataError, match="no examples to evaluate"):
        evaluate(build_tiny_model("bert"), tok, [])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="empty"):
        evaluate_paths(tiny_model_dir("bert"), empty, device="cpu")


def test_window_errors(tok):
    model = build_tiny_model("llama")
    with pytest.raises(DataError, match="--stride 40 is larger than --window 32"):
        evaluate(model, tok, ["the cat sat"], window=32, stride=40)
    with pytest.raises(DataError, match="--window 200 exceeds the model's 128 positions"):
        evaluate(model, tok, ["the cat sat"], window=200)
    with pytest.raises(DataError, match="at least 2"):
        evaluate(model, _build_tiny_tokenizer(template=False), ["cat"])
    with pytest.raises(DataError, match="batch_size must be a positive integer"):
        evaluate(model, tok, ["the cat"], batch_size=0)


def test_model_is_left_in_its_mode(tok):
    model = build_tiny_model("bert").train()
    evaluate(model, tok, ["the cat sat"])
    assert model.training


# ------------------------------------------------------------------------------------------- CLI


def test_run_eval_writes_json(tmp_path, tiny_model_dir, capsys):
    original = tiny_model_dir("bert", name="original")
    compressed = tiny_model_dir("bert", name="compressed", seed=1)
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"text": t, "label": i % 3}) + "\n" for i, t in enumerate(tiny_texts(12)))
    )
    parser = argparse.ArgumentParser(prog="statprune")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "reports" / "eval.json"
    args = parser.parse_args(
        [
            "eval",
            str(compressed),
            "--data",
            str(data),
            "--against",
            str(original),
            "--batch-size",
            "5",
            "--samples",
            "10",
            "--device",
            "cpu",
            "--json",
            str(out),
        ]
    )
    assert run_eval(args) == 0
    printed = capsys.readouterr().out
    assert "task: classify" in printed and "accuracy:" in printed and "agreement" in printed
    report = json.loads(out.read_text())
    assert set(EvalResult.__dataclass_fields__) <= set(report)
    assert report["task"] == "classify"
    assert report["n_examples"] == 10
    assert 0.0 <= report["accuracy"] <= 1.0
    assert 0.0 <= report["agreement"] <= 1.0
    assert report["kl"] >= 0.0
    assert report["perplexity"] is None and report["cosine_mean"] is None
    assert report["against"] == str(original.resolve())

    args = parser.parse_args(
        [
            "eval",
            str(original),
            "--data",
            str(data),
            "--against",
            str(original),
            "--task",
            "embed",
            "--device",
            "cpu",
            "--json",
            str(out),
        ]
    )
    assert run_eval(args) == 0
    report = json.loads(out.read_text())
    assert report["task"] == "embed"
    assert report["cosine_min"] == pytest.approx(1.0, abs=1e-6)


def test_run_eval_lm(tmp_path, tiny_model_dir, capsys):
    model = tiny_model_dir("llama")
    data = tmp_path / "data.txt"
    data.write_text("\n".join(tiny_texts(20)) + "\n")
    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "eval.json"
    args = parser.parse_args(
        [
            "eval",
            str(model),
            "--data",
            str(data),
            "--against",
            str(model),
            "--window",
            "64",
            "--stride",
            "16",
            "--device",
            "cpu",
            "--json",
            str(out),
        ]
    )
    assert run_eval(args) == 0
    report = json.loads(out.read_text())
    assert (report["task"], report["window"], report["stride"]) == ("lm", 64, 16)
    assert report["perplexity_ratio"] == pytest.approx(1.0)
    assert report["agreement"] == 1.0
    assert "perplexity:" in capsys.readouterr().out


# ------------------------------------------------------------------ checking a deployed model


def test_per_class_breakdown_and_flipped_examples_match_hand_counts(tok):
    model = varied_classifier()
    other = perturbed(model, 0.2)
    texts = tiny_texts(60, seed=4)
    ref_preds, preds = own_predictions(model, tok, texts), own_predictions(other, tok, texts)
    labels = [p if i % 4 else (p + 1) % 3 for i, p in enumerate(ref_preds)]
    result = evaluate(other, tok, texts, labels=labels, reference=model, batch_size=7)
    flipped = {i for i, (a, b) in enumerate(zip(preds, ref_preds, strict=True)) if a != b}
    assert flipped and result.flipped == len(flipped)
    rows = {row["class"]: row for row in result.per_class}
    for c in range(3):
        members = [i for i, y in enumerate(labels) if y == c]
        if not members:
            assert c not in rows
            continue
        row = rows[c]
        assert row["label"] == LABELS[c] and row["support"] == len(members)
        assert row["accuracy"] == pytest.approx(sum(preds[i] == c for i in members) / len(members))
        share = lambda hits: sum(hits) / len(members)  # noqa: E731, B023
        assert row["reference_accuracy"] == pytest.approx(share(ref_preds[i] == c for i in members))
        assert row["agreement"] == pytest.approx(share(preds[i] == ref_preds[i] for i in members))
        assert row["predicted"] == preds.count(c) and row["reference_predicted"] == ref_preds.count(c)
    changes = [row["change"] for row in result.per_class]
    assert changes == sorted(changes)  # the classes that lost most first
    listed = result.worst_examples
    assert {e["index"] for e in listed} == flipped
    assert [e["kl"] for e in listed] == sorted((e["kl"] for e in listed), reverse=True)
    for e in listed:
        i = e["index"]
        assert e["text"] == texts[i] and e["label"] == LABELS[labels[i]]
        assert (e["prediction"], e["reference_prediction"]) == (LABELS[preds[i]], LABELS[ref_preds[i]])
    assert len(evaluate(other, tok, texts, reference=model, worst=2).worst_examples) == 2
    summary = result.summary()
    assert "per class, lost most first" in summary and f"flipped predictions: {len(flipped)} of 60" in summary


def test_per_class_without_labels_groups_by_the_reference_prediction(tok):
    model = varied_classifier()
    other = perturbed(model, 0.2)
    texts = tiny_texts(40, seed=5)
    ref_preds, preds = own_predictions(model, tok, texts), own_predictions(other, tok, texts)
    result = evaluate(other, tok, texts, reference=model)
    assert result.accuracy is None
    for row in result.per_class:
        members = [i for i, p in enumerate(ref_preds) if p == row["class"]]
        assert row["support"] == len(members) and "accuracy" not in row
        agree = sum(preds[i] == ref_preds[i] for i in members)
        assert row["agreement"] == pytest.approx(agree / len(members))
    agreements = [row["agreement"] for row in result.per_class]
    assert agreements == sorted(agreements)
    same = evaluate(model, tok, texts, reference=copy.deepcopy(model))
    assert same.flipped == 0 and same.worst_examples == []


def test_embed_and_lm_list_the_examples_that_moved_most(tok):
    model = build_tiny_model("bert", task="base")
    texts = tiny_texts(20, seed=6)
    result = evaluate(perturbed(model, 0.2), tok, texts, reference=model, worst=5)
    cosines = [e["cosine"] for e in result.worst_examples]
    assert len(cosines) == 5 and cosines == sorted(cosines) and cosines[0] == pytest.approx(result.cosine_min)
    assert all(e["text"] == texts[e["index"]] for e in result.worst_examples)
    lm = build_tiny_model("llama")
    result = evaluate(perturbed(lm, 0.1), tok, [lm_text(200, seed=7)], reference=lm, window=32, worst=3)
    kls = [e["kl"] for e in result.worst_examples]
    assert len(kls) == 3 and kls == sorted(kls, reverse=True) and kls[0] >= result.kl
    assert all(e["end"] - e["begin"] <= 32 and e["text"] for e in result.worst_examples)
    assert evaluate(lm, tok, [lm_text(50)], reference=lm, worst=0).worst_examples == []


def _eval_cli(argv):
    from statprune.cli import main

    return main(["eval", *map(str, argv)])


def test_fail_below_exit_status(tmp_path, tok, capsys):
    original, other = tmp_path / "original", tmp_path / "other"
    model = varied_classifier()
    for folder, weights in ((original, model), (other, perturbed(model, 0.2))):
        weights.save_pretrained(folder)
        tok.save_pretrained(folder)
    data = tmp_path / "data.jsonl"
    records = [json.dumps({"text": t, "label": i % 3}) for i, t in enumerate(tiny_texts(30))]
    data.write_text("\n".join(records) + "\n")
    out = tmp_path / "eval.json"
    common = ["--data", data, "--against", original, "--device", "cpu"]
    assert _eval_cli([original, *common, "--fail-below", "1.0"]) == 0
    assert "ok: agreement 1.0000 >= 1" in capsys.readouterr().out
    status = _eval_cli([other, *common, "--json", out, "--fail-below", "0.999", "--fail-below", "accuracy=0"])
    printed = capsys.readouterr().out.splitlines()
    report = json.loads(out.read_text())
    assert report["agreement"] < 0.999
    assert status == 3
    fail = [line for line in printed if line.startswith("FAIL")]
    assert fail == [f"FAIL: agreement {report['agreement']:.4f} is below 0.999 (--fail-below); exit status 3"]
    assert f"ok: accuracy {report['accuracy']:.4f} >= 0" in printed
    assert {"per_class", "flipped", "worst_examples", "worst_rule"} <= set(report)  # written before exiting
    assert sum(row["support"] for row in report["per_class"]) == 30
    # embeddings: neighbour overlap by default
    rules = ["--fail-below", "similarity_spearman=0.99", "--fail-below", "1"]
    assert _eval_cli([original, *common, "--task", "embed", *rules]) == 0
    printed = capsys.readouterr().out
    assert "ok: similarity_spearman 1.0000" in printed and "ok: neighbor_overlap_at_10 1.0000" in printed
    # a metric this run does not measure, or no original to compare with: one-line errors
    assert _eval_cli([other, *common, "--fail-below", "cosine_mean=0.9"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --fail-below: cosine_mean was not measured in this run; "
        "it needs an embedding model (--task embed)"
    )
    assert _eval_cli([other, "--data", data, "--device", "cpu", "--fail-below", "0.9"]) == 1
    assert "add --against ORIGINAL" in capsys.readouterr().err
    assert _eval_cli([other, "--data", data, "--device", "cpu", "--fail-below", "accuracy=0.1"]) == 0
    with pytest.raises(SystemExit) as exc:
        _eval_cli([other, *common, "--fail-below", "kl=0.1"])
    assert exc.value.code == 2
    assert "unknown metric 'kl'" in capsys.readouterr().err


def test_fail_below_reads_percentages_and_refuses_impossible_bars():
    import argparse

    from statprune.evaluate import _fail_below

    assert _fail_below("99%") == (None, pytest.approx(0.99))
    assert _fail_below("agreement=97.5%") == ("agreement", pytest.approx(0.975))
    for bad in ("1.5", "150%", "agreement=-2", "x%"):
        with pytest.raises(argparse.ArgumentTypeError):
            _fail_below(bad)
