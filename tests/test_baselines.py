"""Baseline rankings (magnitude, Wanda-sp, FLAP) against hand computations, and end to end.

The fisher baseline's own linear algebra is tested in test_fisher.py."""

import pytest
import torch
from conftest import DECODER_FAMILIES, _build_tiny_tokenizer, build_tiny_model, tiny_texts

import statprune
from statprune.linalg import GramAccumulator
from statprune.linalg.baselines import channel_scores, head_ranking, neuron_ranking


def _stats(z):
    acc = GramAccumulator(z.shape[1], compute_dtype=torch.float64)
    acc.add_batch(z)
    return acc.finish()


def test_channel_scores_match_their_definitions():
    torch.manual_seed(0)
    z = torch.randn(50, 6, dtype=torch.float64) * torch.arange(1, 7) + 2.0
    w = torch.randn(4, 6, dtype=torch.float64)
    w_in = torch.randn(6, 3, dtype=torch.float64)
    stats = _stats(z)
    torch.testing.assert_close(channel_scores("magnitude", stats, w, w_in), w.norm(dim=0) * w_in.norm(dim=1))
    torch.testing.assert_close(channel_scores("wanda-sp", stats, w), w.abs().sum(0) * z.norm(dim=0))
    torch.testing.assert_close(channel_scores("flap", stats, w), z.var(dim=0) * (w**2).sum(0))
    with pytest.raises(ValueError, match="unknown baseline"):
        channel_scores("nope", stats, w)


def test_neuron_ranking_orders_by_score_and_prices_truncations():
    scores = torch.tensor([0.5, 3.0, 1.0, 2.0], dtype=torch.float64)
    ranking = neuron_ranking(scores)
    assert ranking.order.tolist() == [1, 3, 2, 0]
    assert ranking.errors.tolist() == [6.5, 3.5, 1.5, 0.5, 0.0]
    kept, dropped = ranking.keep(2)
    assert kept.tolist() == [1, 3] and dropped.tolist() == [0, 2]


def test_head_ranking_respects_groups():
    channel = torch.tensor([1.0, 1.0, 5.0, 5.0, 2.0, 2.0, 0.1, 0.1], dtype=torch.float64)  # 4 heads x 2
    sel = head_ranking(channel, n_heads=4, head_dim=2, groups=2)
    kept, _ = sel.keep(1, 4)
    assert kept == [1, 2]  # the best head of group {0, 1} and of group {2, 3}
    assert sel.errors[0] > sel.errors[1] > sel.errors[2] == 0.0


@pytest.mark.parametrize("method", ["magnitude", "wanda-sp", "flap", "fisher"])
@pytest.mark.parametrize("family", ["bert", DECODER_FAMILIES[0]])
def test_baselines_meet_the_budget_and_are_recorded(method, family):
    model = build_tiny_model(family)
    pruned, report = statprune.compress(
        model, _build_tiny_tokenizer(), tiny_texts(300), keep_params=0.6, method=method, progress=False
    )
    assert report.params_kept <= 0.6
    assert report.options["method"] == method
    expected = {"magnitude": "uniform", "wanda-sp": "uniform", "fisher": "mask-search"}.get(method, "greedy")
    assert report.options["allocation"] == expected
    if method in ("magnitude", "wanda-sp"):  # uniform allocation: every layer keeps the same
        assert len({len(lr.neurons_kept) for lr in report.layers}) == 1
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.isfinite(pruned(input_ids=ids).logits).all()


def test_magnitude_reads_no_activations():
    """magnitude scores weights alone: any calibration data gives the same model, and no
    transformer layer runs (only the capture of the first layer's inputs)."""
    model = build_tiny_model(DECODER_FAMILIES[0], num_hidden_layers=3)
    tokenizer = _build_tiny_tokenizer()
    layers = model.base_model.layers
    calls = []
    handles = [layer.register_forward_hook(lambda *a: calls.append(1)) for layer in layers]
    kwargs = {"keep_params": 0.6, "method": "magnitude", "progress": False}
    try:
        first, _ = statprune.compress(model, tokenizer, tiny_texts(200, seed=1), **kwargs)
        second, _ = statprune.compress(model, tokenizer, tiny_texts(120, seed=7), **kwargs)
    finally:
        for h in handles:
            h.remove()
    assert not calls
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_new_method_is_one_class():
    """A method defined and registered here (one class, as one file under statprune/methods/
    would be) runs through compress, the CLI's choices and sweep's method list, with nothing
    else to change: it keeps the lowest-indexed units of every layer."""
    from statprune.cli import build_parser
    from statprune.methods import get_method, method_names, register, unregister
    from statprune.methods.base import ChannelRanking
    from statprune.sweep import parse_methods

    @register
    class KeepFirst(ChannelRanking):
        name = "keep-first"
        order = 99
        uses_activations = False
        corrects = False
        default_allocation = "uniform"

        def channel_scores(self, stats, w_out, w_in_rows=None):
            return torch.arange(w_out.shape[1], 0, -1, dtype=torch.float64)

    try:
        assert method_names()[-1] == "keep-first" and isinstance(get_method("keep-first"), KeepFirst)
        assert parse_methods("stat,keep-first") == ["stat", "keep-first"]
        argv = ["compress", "m", "--data", "d", "--out", "o", "--method", "keep-first"]
        assert build_parser().parse_args(argv).method == "keep-first"
        model = build_tiny_model("bert", num_hidden_layers=3)
        kwargs = {"keep_params": 0.5, "method": "keep-first", "progress": False}
        _, report = statprune.compress(model, _build_tiny_tokenizer(), tiny_texts(200), **kwargs)
        assert report.options["method"] == "keep-first" and report.options["allocation"] == "uniform"
        assert report.params_kept <= 0.5
        for lr in report.layers:
            assert lr.heads_kept == list(range(len(lr.heads_kept)))
            assert lr.neurons_kept == list(range(len(lr.neurons_kept))) and len(lr.neurons_kept) < 64
    finally:
        unregister("keep-first")
    assert "keep-first" not in method_names()
    with pytest.raises(statprune.StatpruneError, match="unknown method 'keep-first'"):
        statprune.compress(
            build_tiny_model("bert"),
            _build_tiny_tokenizer(),
            tiny_texts(50),
            keep_params=0.5,
            method="keep-first",
            progress=False,
        )
