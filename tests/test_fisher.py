"""The ``fisher`` baseline (Kwon et al. 2022): its linear algebra against brute force and explicit
least squares, its mask gradients, and end to end through compress, save/load, CLI and sweep."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from conftest import _build_tiny_tokenizer, build_tiny_model, tiny_texts

import statprune
from statprune.adapters import adapter_for
from statprune.calibration import CalibrationBatch, tokenize_examples
from statprune.cli import main
from statprune.errors import BudgetError
from statprune.fisher_grads import MaskGradients, collect_mask_gradients
from statprune.linalg.fisher import (
    SearchBlock,
    kept_importance,
    mask_search,
    nested_losses,
    pruning_loss,
    rearrange,
    tune_mask_scales,
)
from statprune.sweep import parse_methods, sweep

TOKENIZER = _build_tiny_tokenizer()

# ------------------------------------------------------------------------------- mask search


def _uniform_blocks(head_imp, neuron_imp, head_cost, neuron_cost):
    blocks = []
    for imp in head_imp:
        counts = list(range(len(imp) + 1))
        blocks.append(
            SearchBlock("heads", counts, [c * head_cost for c in counts], kept_importance(imp, counts))
        )
    for imp in neuron_imp:
        counts = list(range(len(imp) + 1))
        costs = [c * neuron_cost for c in counts]
        blocks.append(SearchBlock("neurons", counts, costs, kept_importance(imp, counts)))
    return blocks


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("budget", [0.0, 7.0, 13.0, 20.0, 31.0, 100.0])
def test_mask_search_matches_brute_force(seed, budget):
    gen = torch.Generator().manual_seed(seed)
    head_imp = [torch.rand(2, generator=gen, dtype=torch.float64) * 4 for _ in range(2)]
    neuron_imp = [torch.rand(3, generator=gen, dtype=torch.float64) for _ in range(2)]
    head_cost, neuron_cost = 5.0, 2.0
    counts = mask_search(_uniform_blocks(head_imp, neuron_imp, head_cost, neuron_cost), budget)
    units = [(float(v), head_cost) for imp in head_imp for v in imp]
    units += [(float(v), neuron_cost) for imp in neuron_imp for v in imp]
    best = max(
        sum(v for (v, _), on in zip(units, mask, strict=True) if on)
        for mask in itertools.product([0, 1], repeat=len(units))
        if sum(c for (_, c), on in zip(units, mask, strict=True) if on) <= budget
    )
    kept = [
        sorted(imp.tolist(), reverse=True)[:c] for imp, c in zip(head_imp + neuron_imp, counts, strict=True)
    ]
    cost = head_cost * sum(counts[:2]) + neuron_cost * sum(counts[2:])
    assert cost <= budget
    assert sum(map(sum, kept)) == pytest.approx(best)


def test_mask_search_trades_heads_for_neurons():
    # heads are cheap per importance in layer 0 only: the search keeps both of them, no other head
    blocks = _uniform_blocks(
        [torch.tensor([9.0, 8.0]), torch.tensor([0.5, 0.4])],
        [torch.tensor([1.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, 1.0])],
        head_cost=4.0,
        neuron_cost=1.0,
    )
    assert mask_search(blocks, 8.0 + 6.0) == [2, 0, 3, 3]
    assert mask_search(blocks, 8.0 + 3.0) == [2, 0, 3, 0]  # two heads and three neurons beat one + six


def test_kept_importance_of_groups_sums_each_groups_top():
    imp = torch.tensor([1.0, 5.0, 2.0, 4.0, 3.0, 0.0])  # groups {0,1,2}, {3,4,5}
    assert kept_importance(imp, [0, 2, 4, 6], groups=2) == [0.0, 9.0, 14.0, 15.0]


def test_mask_search_respects_group_and_multiple_steps():
    blocks = [
        SearchBlock("heads", [0, 2, 4], [0.0, 10.0, 16.0], [0.0, 5.0, 6.0]),  # GQA: KV cost on the first
        SearchBlock("neurons", [0, 4, 8, 10], [0.0, 4.0, 8.0, 10.0], [0.0, 4.0, 6.0, 6.5]),
    ]
    for budget in (0.0, 5.0, 9.0, 12.0, 15.0, 19.0, 26.0):
        counts = mask_search(blocks, budget)
        cost = sum(b.costs[b.counts.index(c)] for b, c in zip(blocks, counts, strict=True))
        assert cost <= budget
    assert mask_search(blocks, 26.0) == [4, 10]
    assert mask_search(blocks, 10.0) == [0, 10]  # 6.5 from neurons beats 5.0 from two heads


# ------------------------------------------------------------------------------- rearrangement


def test_rearrange_with_a_diagonal_fisher_keeps_the_top_diagonal():
    diag = torch.tensor([3.0, 0.5, 2.0, 0.1, 4.0, 1.0], dtype=torch.float64)
    for keep in range(7):
        kept = rearrange(torch.diag(diag), keep)
        assert kept.tolist() == sorted(torch.argsort(diag, descending=True)[:keep].tolist())


def test_rearrange_uses_correlations():
    # units 0 and 1 have the smallest diagonals but aligned gradients: pruning both costs
    # 1 + 1.1 + 2·0.9 = 3.9, pruning {0, 2} only 2.5, the best pair
    fisher = torch.tensor([[1.0, 0.9, 0.0], [0.9, 1.1, 0.0], [0.0, 0.0, 1.5]], dtype=torch.float64)
    assert rearrange(torch.diag(torch.diagonal(fisher)), 1).tolist() == [2]  # diagonal choice
    kept = rearrange(fisher, 1)
    assert kept.tolist() == [1]
    assert pruning_loss(fisher, [0, 2]) == pytest.approx(1.25)
    best = min(itertools.combinations(range(3), 2), key=lambda p: pruning_loss(fisher, list(p)))
    assert sorted(set(range(3)) - set(best)) == kept.tolist()


@pytest.mark.parametrize("groups", [1, 2])
def test_rearrange_never_worse_than_the_diagonal_choice(groups):
    gen = torch.Generator().manual_seed(3)
    for trial in range(20):
        g = torch.randn(12, 8, generator=gen, dtype=torch.float64) + torch.randn(1, 8, generator=gen) * 2
        fisher = g.T @ g
        keep = (trial % 4 + 1) * groups
        kept = rearrange(fisher, keep, groups)
        diag_kept = rearrange(torch.diag(torch.diagonal(fisher)), keep, groups)
        assert kept.numel() == keep
        assert torch.bincount(kept // (8 // groups), minlength=groups).tolist() == [keep // groups] * groups
        pruned = sorted(set(range(8)) - set(kept.tolist()))
        diag_pruned = sorted(set(range(8)) - set(diag_kept.tolist()))
        assert pruning_loss(fisher, pruned) <= pruning_loss(fisher, diag_pruned) + 1e-12


def test_nested_losses_price_every_prefix():
    g = torch.randn(9, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    fisher = g.T @ g
    order = torch.tensor([4, 1, 5, 0, 3, 2])
    for step in (1, 2):
        losses = nested_losses(fisher, order, step)
        expected = [pruning_loss(fisher, order[r * step :]) for r in range(6 // step + 1)]
        torch.testing.assert_close(losses, torch.tensor(expected, dtype=torch.float64))


# ------------------------------------------------------------------------------- mask tuning


def _explicit_lstsq(z, w, kept, block):
    """Solve min_m ‖Σ_u m_u W_Su Z_Suᵀ − W Zᵀ‖_F over explicit matrices."""
    target = (w @ z.T).reshape(-1)
    cols = []
    for u in range(kept.numel() // block):
        idx = kept[u * block : (u + 1) * block]
        cols.append((w[:, idx] @ z[:, idx].T).reshape(-1))
    design = torch.stack(cols, dim=1)
    m = torch.linalg.lstsq(design, target[:, None]).solution[:, 0]
    return m, float(((design @ m - target) ** 2).sum()), float(((design.sum(1) - target) ** 2).sum())


def test_tuning_recovers_an_exact_duplicate():
    torch.manual_seed(0)
    z = torch.randn(40, 3, dtype=torch.float64)
    z[:, 2] = 2.0 * z[:, 0]  # dropped neuron 2 is twice kept neuron 0, with the same W column
    w = torch.randn(5, 3, dtype=torch.float64)
    w[:, 2] = w[:, 0]
    tuning = tune_mask_scales(z.T @ z, w, torch.tensor([0, 1]))
    torch.testing.assert_close(tuning.scales, torch.tensor([3.0, 1.0], dtype=torch.float64))
    assert tuning.error_tuned < 1e-9 * tuning.total
    m, _, plain = _explicit_lstsq(z, w, torch.tensor([0, 1]), 1)
    torch.testing.assert_close(tuning.scales, m)
    assert tuning.error_plain == pytest.approx(plain)


@pytest.mark.parametrize("block", [1, 3])
def test_tuning_equals_explicit_least_squares(block):
    torch.manual_seed(1)
    units = 5
    mix = torch.randn(units * block, units * block, dtype=torch.float64)
    z = torch.randn(60, units * block, dtype=torch.float64) @ mix
    w = torch.randn(7, units * block, dtype=torch.float64)
    kept = torch.cat([torch.arange(u * block, (u + 1) * block) for u in (0, 2, 3)])
    tuning = tune_mask_scales(z.T @ z, w, kept, block)
    m, residual, plain = _explicit_lstsq(z, w, kept, block)
    torch.testing.assert_close(tuning.scales, m, rtol=1e-6, atol=1e-8)
    assert tuning.error_tuned == pytest.approx(residual, rel=1e-6)
    assert tuning.error_plain == pytest.approx(plain, rel=1e-9)
    assert tuning.error_tuned < tuning.error_plain  # (e) tuning beats plain removal of the same units
    assert tuning.total == pytest.approx(float(((w @ z.T) ** 2).sum()))


def test_tuning_keeping_nothing():
    z = torch.randn(10, 4, dtype=torch.float64)
    tuning = tune_mask_scales(
        z.T @ z, torch.randn(3, 4, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    )
    assert tuning.scales.numel() == 0 and tuning.error_tuned == tuning.total


# ------------------------------------------------------------------------------- mask gradients


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_batched_masks_give_per_example_gradients(family):
    model = build_tiny_model(family)
    adapter = adapter_for(model.config)
    texts = tiny_texts(3, seed=5)
    batched = tokenize_examples(TOKENIZER, texts, seq_len=32, batch_size=3)
    singles = tokenize_examples(TOKENIZER, texts, seq_len=32, batch_size=1)
    if family == "llama":
        for b in batched + singles:
            b.inputs.pop("token_type_ids", None)
    a = collect_mask_gradients(model, adapter, batched)
    b = collect_mask_gradients(model, adapter, singles)
    assert a.examples == b.examples == 3
    assert a.labels == ("next-token" if family == "llama" else "predicted")
    for x, y in zip(a.heads + a.neurons, b.heads + b.neurons, strict=True):
        assert x.abs().max() > 0
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("classes", [2, 3])
def test_expected_fisher_is_the_label_average_weighted_by_the_model(classes):
    """Without labels a classifier's Fisher is E_{y~p(y|x)}[g gᵀ]: the per-class gradients (each
    obtained with that class as the given label) weighted by the model's probabilities."""
    model = build_tiny_model("bert", num_labels=classes)
    adapter = adapter_for(model.config)
    (batch,) = tokenize_examples(TOKENIZER, tiny_texts(4, seed=7), seq_len=32, batch_size=4)
    with torch.no_grad():
        probs = model(**batch.inputs).logits.softmax(-1).double()
    expected = collect_mask_gradients(model, adapter, [batch], unlabelled="expected")
    assert expected.labels == "expected" and expected.examples == 4
    assert expected.neurons[0].shape[0] == 4 * (classes - 1)  # K - 1 backward passes per example
    per_class = [
        collect_mask_gradients(
            model, adapter, [CalibrationBatch({**batch.inputs, "labels": torch.full((4,), c)})]
        )
        for c in range(classes)
    ]
    for i in range(len(expected.neurons)):
        for part in ("heads", "neurons"):
            got = getattr(expected, part)[i]
            want = sum(
                MaskGradients.fisher(getattr(g, part)[i] * probs[:, c, None].sqrt().float())
                for c, g in enumerate(per_class)
            )
            torch.testing.assert_close(MaskGradients.fisher(got), want, rtol=1e-4, atol=1e-12)
    # the argmax loss differs, and batching does not change the expected Fisher
    predicted = collect_mask_gradients(model, adapter, [batch], unlabelled="predicted")
    assert not torch.allclose(
        MaskGradients.importance(predicted.neurons[0]),
        MaskGradients.importance(expected.neurons[0]),
        rtol=1e-3,
        atol=0,
    )
    singles = tokenize_examples(TOKENIZER, tiny_texts(4, seed=7), seq_len=32, batch_size=1)
    one_by_one = collect_mask_gradients(model, adapter, singles, unlabelled="expected")
    torch.testing.assert_close(
        MaskGradients.fisher(one_by_one.heads[1]),
        MaskGradients.fisher(expected.heads[1]),
        rtol=1e-4,
        atol=1e-12,
    )


def test_given_labels_are_used_and_recorded():
    model = build_tiny_model("bert")
    adapter = adapter_for(model.config)
    (batch,) = tokenize_examples(TOKENIZER, tiny_texts(4, seed=2), seq_len=32, batch_size=4)
    with torch.no_grad():
        predicted = model(**batch.inputs).logits.argmax(-1)
    other = (predicted + 1) % 3
    given = collect_mask_gradients(model, adapter, [CalibrationBatch({**batch.inputs, "labels": other})])
    own = collect_mask_gradients(model, adapter, [batch])
    assert given.labels == "given" and own.labels == "predicted"
    assert not torch.allclose(given.neurons[0], own.neurons[0])
    same = collect_mask_gradients(model, adapter, [CalibrationBatch({**batch.inputs, "labels": predicted})])
    torch.testing.assert_close(same.neurons[0], own.neurons[0])
    assert all(p.requires_grad for p in model.parameters())  # weights unfrozen again


# ------------------------------------------------------------------------------- end to end


def _compress(model, **kwargs):
    return statprune.compress(model, TOKENIZER, tiny_texts(300), progress=False, **kwargs)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_fisher_meets_the_budget_and_round_trips(family, tmp_path):
    model = build_tiny_model(family)
    pruned, report = _compress(model, keep_flops=0.6, method="fisher")
    assert 0.5 <= report.flops_kept <= 0.6
    assert report.options["method"] == "fisher" and report.options["allocation"] == "mask-search"
    assert report.options["fisher_labels"] == ("next-token" if family == "llama" else "predicted")
    adapter = adapter_for(pruned.config)
    for lr, layer in zip(report.layers, adapter.layers(pruned.base_model), strict=True):
        attn = adapter.attention(layer)
        assert attn.n_heads == len(lr.heads_kept) and adapter.ffn(layer).width == len(lr.neurons_kept)
        if family == "llama":  # grouped-query attention: equal heads in both key/value groups
            assert len(lr.heads_kept) % 2 == 0
            assert sum(h < 2 for h in lr.heads_kept) == len(lr.heads_kept) // 2
    statprune.save(pruned, tmp_path / "out", tokenizer=TOKENIZER, report=report)
    loaded = statprune.load(tmp_path / "out")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, pruned(input_ids=ids).logits)
    saved = json.loads((tmp_path / "out" / "statprune.json").read_text())
    assert saved["options"]["fisher_labels"] == report.options["fisher_labels"]


def test_fisher_params_budget_round_to_and_heads_only():
    model = build_tiny_model("llama")
    _, report = _compress(model, keep_params=0.6, method="fisher", round_to=8)
    assert 0.5 <= report.params_kept <= 0.6
    assert all(len(lr.neurons_kept) % 8 == 0 for lr in report.layers)
    _, report = _compress(build_tiny_model("bert"), keep_flops=0.8, method="fisher", prune=("heads",))
    assert report.flops_kept <= 0.8
    assert all(len(lr.neurons_kept) == lr.neurons_total for lr in report.layers)


def test_tuning_lowers_the_layer_output_error():
    model = build_tiny_model("bert")
    common = {"keep_flops": 0.5, "method": "fisher", "activations": "sequential"}
    _, tuned = _compress(model, **common)
    _, plain = _compress(model, correction=False, **common)
    assert [lr.heads_kept for lr in tuned.layers] == [lr.heads_kept for lr in plain.layers]
    assert [lr.neurons_kept for lr in tuned.layers] == [lr.neurons_kept for lr in plain.layers]
    assert sum(lr.output_error for lr in tuned.layers) < sum(lr.output_error for lr in plain.layers)


def test_fisher_refuses_bare_encoders_and_other_allocations():
    with pytest.raises(BudgetError, match="task head"):
        _compress(build_tiny_model("bert", task="base"), keep_flops=0.6, method="fisher")
    with pytest.raises(BudgetError, match="mask search"):
        _compress(build_tiny_model("bert"), keep_flops=0.6, method="fisher", allocation="uniform")
    with pytest.raises(BudgetError, match="still keeps"):
        _compress(build_tiny_model("bert"), keep_flops=0.1, method="fisher", prune=("heads",))


def test_cli_compress_and_sweep_accept_fisher(tiny_model_dir, calib_file, tmp_path):
    model_dir, calib = tiny_model_dir("bert"), calib_file(120)
    out = tmp_path / "pruned"
    args = ["compress", model_dir, "--data", calib, "--keep-flops", "0.7", "--method", "fisher"]
    assert main([str(a) for a in [*args, "--out", out, "--quiet"]]) == 0
    assert statprune.load_report(out).options["method"] == "fisher"
    assert parse_methods("stat,fisher") == ["stat", "fisher"]
    eval_path = tmp_path / "eval.jsonl"
    eval_path.write_text("\n".join(json.dumps({"text": t, "label": 0}) for t in tiny_texts(8, seed=3)))
    result = sweep(model_dir, calib, eval_path, budgets=[0.7], methods="stat,fisher", samples=60, log=None)
    assert [(r.method, r.error) for r in result.rows] == [("stat", None), ("fisher", None)]


def test_expected_fisher_labels_through_compress_and_cli(tmp_path):
    model = build_tiny_model("bert")
    _, report = _compress(model, keep_flops=0.6, method="fisher", fisher_labels="expected")
    assert report.options["fisher_labels"] == "expected" and 0.5 <= report.flops_kept <= 0.6
    with pytest.raises(ValueError, match="fisher_labels"):
        _compress(model, keep_flops=0.6, method="fisher", fisher_labels="argmax")
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    TOKENIZER.save_pretrained(folder)
    (tmp_path / "calib.txt").write_text("\n".join(tiny_texts(300)) + "\n")
    args = ["compress", folder, "--data", tmp_path / "calib.txt", "--keep-flops", "0.6", "--quiet"]
    out = tmp_path / "out"
    assert (
        main([*map(str, args), "--method", "fisher", "--fisher-labels", "expected", "--out", str(out)]) == 0
    )
    assert json.loads((out / "statprune.json").read_text())["options"]["fisher_labels"] == "expected"
