"""``layer_weighting="gradient"`` and ``error_metric="fisher"``: the loss-gradient energy and
covariance at each block's output, checked against an independent autograd computation, and how
they enter the allocation, the selections, the errors and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    _build_tiny_tokenizer,
    assert_same_weights,
    build_tiny_model,
    interrupted_after,
    tiny_texts,
)

import statprune
import statprune.pipeline.stages
from statprune.adapters import adapter_for
from statprune.calibration import CalibrationBatch, tokenize_examples
from statprune.cli import main
from statprune.errors import BudgetError
from statprune.fisher_grads import OutputSensitivity, output_sensitivity

TOKENIZER = _build_tiny_tokenizer()


def _batches(family: str, n: int = 6, batch_size: int = 3) -> list[CalibrationBatch]:
    batches = tokenize_examples(TOKENIZER, tiny_texts(n, seed=3), seq_len=32, batch_size=batch_size)
    if family == "llama":
        for b in batches:
            b.inputs.pop("token_type_ids", None)
    return batches


def _reference(model, batches, labels_of):
    """Σ‖∂loss/∂y‖² over tokens / real tokens, and Σ g gᵀ over tokens, by retain_grad on the block
    outputs (the graph exists because the embeddings require grad), with the loss written out here."""
    adapter = adapter_for(model.config)
    outputs: dict[tuple[str, int], torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(adapter.layers(model.base_model)):
        for kind, path in (("heads", adapter.attention(layer).o), ("neurons", adapter.ffn(layer).output)):

            def hook(module, args, output, key=(kind, i)):
                output.retain_grad()
                outputs[key] = output

            handles.append(layer.get_submodule(path).register_forward_hook(hook))
    energy = dict.fromkeys(
        ((k, i) for i in range(len(adapter.layers(model.base_model))) for k in ("heads", "neurons")), 0.0
    )
    covariance: dict[tuple[str, int], torch.Tensor] = {}
    tokens = 0
    try:
        for batch in batches:
            mask = batch.token_mask
            logits = model(**batch.inputs).logits
            if adapter.is_decoder:
                targets = batch.inputs["input_ids"].masked_fill(~mask, -100)[:, 1:]
                per_token = F.cross_entropy(
                    logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="none"
                )
                loss = (per_token.sum(dim=1) / (targets != -100).sum(dim=1)).sum()
            else:
                loss = F.cross_entropy(logits, labels_of(batch), reduction="sum")
            model.zero_grad()
            loss.backward()
            for key, out in outputs.items():
                assert out.grad[~mask].abs().max() == 0  # padding never reaches the loss
                energy[key] += float(out.grad.double().square().sum())
                rows = out.grad.double().reshape(-1, out.shape[-1])
                covariance[key] = covariance.get(key, 0) + rows.T @ rows
            tokens += int(mask.sum())
    finally:
        for h in handles:
            h.remove()
    return {key: value / tokens for key, value in energy.items()}, covariance


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_sensitivity_is_the_mean_squared_loss_gradient_at_each_block_output(family):
    model = build_tiny_model(family, num_hidden_layers=3)
    model.eval()
    batches = _batches(family)
    with torch.no_grad():
        predicted = {id(b): model(**b.inputs).logits.argmax(-1) for b in batches}
    got = output_sensitivity(
        model, adapter_for(model.config), batches, unlabelled="predicted", covariance=True
    )
    assert got.labels == ("next-token" if family == "llama" else "predicted")
    assert all(p.requires_grad for p in model.parameters())  # weights unfrozen again
    embeddings = model.get_input_embeddings().weight
    embeddings.requires_grad_(True)
    want, covariance = _reference(model, batches, lambda b: predicted[id(b)])
    for (kind, i), value in want.items():
        assert value > 0
        assert getattr(got, kind)[i] == pytest.approx(value, rel=1e-4)
        want_c = covariance[kind, i]  # summed in float32 by the probe
        torch.testing.assert_close(
            got.covariance[kind, i].double(), want_c, rtol=1e-4, atol=1e-5 * float(want_c.abs().max())
        )
    assert output_sensitivity(model, adapter_for(model.config), batches).covariance is None


def test_a_causal_lm_samples_its_own_next_tokens():
    """The expected Fisher of an LM draws each next token from the model (seeded)."""
    model = build_tiny_model("llama", num_hidden_layers=2)
    model.eval()
    adapter = adapter_for(model.config)
    batches = _batches("llama")
    text = output_sensitivity(model, adapter, batches, unlabelled="predicted")
    sampled = output_sensitivity(model, adapter, batches)
    assert (text.labels, sampled.labels) == ("next-token", "sampled")
    assert output_sensitivity(model, adapter, batches).heads == sampled.heads
    assert all(a != pytest.approx(b, rel=1e-3) for a, b in zip(text.heads, sampled.heads, strict=True))


def test_sampled_next_tokens_follow_the_distribution_and_the_label_layout():
    from statprune.fisher_grads import _sampled_next_tokens

    certain = torch.tensor([[1, 2, 3, 4], [0, 0, 2, 1]])
    logits = torch.full((2, 4, 5), -1e4).scatter(2, certain[:, :, None], 0.0)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]).bool()
    labels = _sampled_next_tokens(logits, mask, certain, seed=1)
    # position t + 1 holds what position t predicts; the first and padded positions hold -100
    assert labels.tolist() == [[-100, 1, 2, 3], [-100, 0, 0, -100]]
    p = torch.tensor([0.7, 0.2, 0.1])
    logits = p.log().expand(1, 20001, 3)
    ids = torch.zeros(1, 20001, dtype=torch.long)
    drawn = _sampled_next_tokens(logits, torch.ones(1, 20001).bool(), ids, seed=2)
    frequency = torch.bincount(drawn[0, 1:], minlength=3) / 20000
    torch.testing.assert_close(frequency, p, atol=0.015, rtol=0)


def test_metric_factor_is_a_root_of_the_normalized_covariance():
    g = torch.randn(5, 8, dtype=torch.float64)  # fewer gradients than dimensions: singular
    covariance = g.T @ g
    s = OutputSensitivity(heads=[1.0], neurons=[None], labels="x", covariance={("heads", 0): covariance})
    factor = s.metric_factor("heads", 0)
    normalized = covariance * 8 / torch.trace(covariance)
    torch.testing.assert_close(factor.T @ factor, normalized + 1e-6 * torch.eye(8))
    assert s.metric_factor("neurons", 0) is None
    zero = OutputSensitivity([1.0], [None], "x", {("heads", 0): torch.zeros(3, 3, dtype=torch.float64)})
    assert torch.equal(zero.metric_factor("heads", 0), torch.eye(3, dtype=torch.float64))


@pytest.mark.parametrize("classes", [2, 3])
def test_expected_sensitivity_averages_the_classes_by_the_model_probabilities(classes):
    """Without labels a classifier uses E_{y~p}‖g_y‖²: per-class energies weighted by p(y|x)."""
    model = build_tiny_model("bert", num_labels=classes)
    model.eval()
    batches = _batches("bert", n=4, batch_size=1)  # one example per batch: one p per batch
    adapter = adapter_for(model.config)
    got = output_sensitivity(model, adapter, batches)  # "expected" is the default
    assert got.labels == "expected"
    want = {"heads": [0.0, 0.0], "neurons": [0.0, 0.0]}
    tokens = sum(b.num_tokens for b in batches)
    for b in batches:
        with torch.no_grad():
            probs = model(**b.inputs).logits.softmax(-1)[0]
        for c in range(classes):
            labelled = CalibrationBatch({**b.inputs, "labels": torch.tensor([c])})
            one = output_sensitivity(model, adapter, [labelled])
            for kind in want:
                for i in range(2):
                    want[kind][i] += float(probs[c]) * getattr(one, kind)[i] * b.num_tokens / tokens
    for kind in want:
        assert getattr(got, kind) == pytest.approx(want[kind], rel=1e-4)


def _compress(model, **kwargs):
    return statprune.compress(model, TOKENIZER, tiny_texts(300), progress=False, **kwargs)


@pytest.mark.parametrize("rule", ["gradient", "gradient-only"])
def test_the_allocation_spares_the_block_the_loss_is_sensitive_to(monkeypatch, rule):
    """A block made a million times more sensitive than the others keeps every unit; with equal
    sensitivities it is cut like the rest."""
    model = build_tiny_model("llama", num_hidden_layers=3)
    layers = 3

    def fake(weight):
        def sensitivity(model, adapter, batches, prune, **_):
            neurons = [1.0] * layers
            neurons[1] = weight
            return OutputSensitivity(heads=[1.0] * layers, neurons=neurons, labels="next-token")

        return sensitivity

    monkeypatch.setattr(statprune.pipeline.stages, "output_sensitivity", fake(1.0))
    _, even = _compress(model, keep_params=0.5, layer_weighting=rule)
    monkeypatch.setattr(statprune.pipeline.stages, "output_sensitivity", fake(1e6))
    _, spared = _compress(model, keep_params=0.5, layer_weighting=rule)
    assert len(even.layers[1].neurons_kept) < even.layers[1].neurons_total
    assert len(spared.layers[1].neurons_kept) == spared.layers[1].neurons_total
    assert spared.params_kept <= 0.5 and even.params_kept <= 0.5


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_gradient_weighting_meets_the_budget_and_is_recorded(family, tmp_path):
    model = build_tiny_model(family)
    pruned, report = _compress(model, keep_flops=0.6, layer_weighting="gradient")
    assert 0.5 <= report.flops_kept <= 0.6
    assert report.options["layer_weighting"] == "gradient"
    assert all(p.requires_grad for p in model.parameters())  # the input model is left as it was
    statprune.save(pruned, tmp_path / "out", tokenizer=TOKENIZER, report=report)
    saved = json.loads((tmp_path / "out" / "statprune.json").read_text())
    assert saved["options"]["layer_weighting"] == "gradient"


def test_gradient_weighting_needs_a_task_head():
    with pytest.raises(BudgetError, match="task head"):
        _compress(build_tiny_model("bert", task="base"), keep_flops=0.6, layer_weighting="gradient")


def test_cli_layer_weighting_gradient(tiny_model_dir, calib_file, tmp_path, capsys):
    model_dir, calib = tiny_model_dir("bert"), calib_file(120)
    out = tmp_path / "pruned"
    args = ["compress", model_dir, "--data", calib, "--keep-flops", "0.7", "--layer-weighting", "gradient"]
    assert main([str(a) for a in [*args, "--out", out, "--quiet"]]) == 0
    assert json.loads((out / "statprune.json").read_text())["options"]["layer_weighting"] == "gradient"
    bare = tiny_model_dir("bert", name="bare", task="base")
    args[1] = bare
    assert main([str(a) for a in [*args, "--out", tmp_path / "bare-out", "--quiet"]]) != 0
    err = capsys.readouterr().err
    assert "task head" in err and "Traceback" not in err
    assert not (tmp_path / "bare-out").exists()


def test_gradient_only_with_equal_sensitivities_is_no_weighting(monkeypatch):
    model = build_tiny_model("llama", num_hidden_layers=3)

    def equal(model, adapter, batches, prune, **_):
        return OutputSensitivity(heads=[2.5] * 3, neurons=[2.5] * 3, labels="next-token")

    monkeypatch.setattr(statprune.pipeline.stages, "output_sensitivity", equal)
    _, flat = _compress(model, keep_params=0.5, layer_weighting="gradient-only")
    _, plain = _compress(model, keep_params=0.5, layer_weighting="none")
    _, residual = _compress(model, keep_params=0.5, layer_weighting="residual")
    assert [lr.neurons_kept for lr in flat.layers] == [lr.neurons_kept for lr in plain.layers]
    assert [lr.heads_kept for lr in flat.layers] == [lr.heads_kept for lr in plain.layers]
    assert [len(lr.neurons_kept) for lr in residual.layers] != [len(lr.neurons_kept) for lr in plain.layers]


@pytest.mark.parametrize(
    ("model_kwargs", "compress_kwargs", "expected", "metric"),
    [
        ({"family": "bert"}, {}, "gradient", "fisher"),
        ({"family": "llama"}, {}, "gradient", "fisher"),
        ({"family": "bert", "task": "base"}, {}, "residual", "euclidean"),  # nothing to differentiate
        ({"family": "bert", "num_labels": 1}, {}, "residual", "euclidean"),  # regression: needs labels
        ({"family": "bert"}, {"offload": True}, "residual", "euclidean"),  # the model is not on the device
        ({"family": "bert"}, {"method": "flap"}, "none", "euclidean"),  # baselines weigh no block
        ({"family": "bert"}, {"layer_weighting": "residual"}, "residual", "euclidean"),
    ],
)
def test_auto_layer_weighting_and_error_metric(model_kwargs, compress_kwargs, expected, metric):
    model = build_tiny_model(**model_kwargs)
    _, report = _compress(model, keep_flops=0.7, **compress_kwargs)
    assert report.options["layer_weighting"] == expected
    assert report.options["error_metric"] == metric


def test_fisher_metric_is_for_stat():
    with pytest.raises(BudgetError, match="error-metric fisher"):
        _compress(build_tiny_model("bert"), keep_flops=0.7, method="flap", error_metric="fisher")


def _fake_covariance(monkeypatch, make):
    """Replace the measured covariance of every block by ``make(hidden)``."""
    measure = statprune.pipeline.stages.output_sensitivity

    def fake(*args, **kwargs):
        got = measure(*args, **kwargs)
        got.covariance = {key: make(c.shape[0]) for key, c in (got.covariance or {}).items()}
        return got

    monkeypatch.setattr(statprune.pipeline.stages, "output_sensitivity", fake)


@pytest.mark.parametrize("activations", ["original", "sequential"])
def test_isotropic_gradients_make_the_fisher_metric_euclidean(monkeypatch, activations):
    model = build_tiny_model("bert", num_hidden_layers=3)
    options = {"keep_flops": 0.5, "layer_weighting": "residual", "activations": activations}
    euclidean, _ = _compress(model, error_metric="euclidean", **options)
    _fake_covariance(monkeypatch, lambda d: 7.0 * torch.eye(d, dtype=torch.float64))
    fisher, report = _compress(model, error_metric="fisher", **options)
    assert report.options["error_metric"] == "fisher"
    for (name, a), b in zip(euclidean.state_dict().items(), fisher.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("activations", ["original", "sequential"])
def test_the_fisher_metric_keeps_what_the_loss_sees(monkeypatch, activations):
    """With gradients along one direction u, the selection changes and the pruned FFN's output
    error along u shrinks (other directions are free to grow)."""
    model = build_tiny_model("llama", num_hidden_layers=2)
    u = torch.randn(32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    u /= u.norm()
    options = {"keep_params": 0.5, "prune": ("neurons",), "layer_weighting": "residual"}
    options["activations"] = activations
    euclidean, plain = _compress(model, error_metric="euclidean", **options)
    _fake_covariance(monkeypatch, lambda d: torch.outer(u, u))
    fisher, aimed = _compress(model, error_metric="fisher", **options)
    assert aimed.layers[0].neurons_kept != plain.layers[0].neurons_kept

    def ffn_output(m):  # layer 0's down projection output on the calibration texts
        got = []
        module = m.model.layers[0].mlp.down_proj
        handle = module.register_forward_hook(lambda mod, args, out: got.append(out.double()))
        batch = TOKENIZER(tiny_texts(40, seed=11), padding=True, return_tensors="pt")
        batch.pop("token_type_ids", None)
        with torch.no_grad():
            m(**batch)
        handle.remove()
        return got[0][batch["attention_mask"].bool()]

    dense = ffn_output(model)
    along = {
        name: float(((ffn_output(m) - dense) @ u).square().sum())
        for name, m in (("euclidean", euclidean), ("fisher", fisher))
    }
    assert along["fisher"] < 0.5 * along["euclidean"]


@pytest.mark.parametrize(
    ("stage", "metric", "measured_again"),
    [("analyse", "euclidean", True), ("prune", "euclidean", False), ("prune", "fisher", True)],
)
def test_resume_measures_sensitivity_only_while_it_is_needed(
    tmp_path, monkeypatch, stage, metric, measured_again
):
    """The saved curves are already weighted: a run resumed after its analysis pass skips the
    backward pass unless its pruning pass selects under the fisher metric, one resumed inside it
    runs it again; all match an uninterrupted run."""
    model = build_tiny_model("llama", num_hidden_layers=3)
    options = {"keep_params": 0.5, "layer_weighting": "gradient", "error_metric": metric}
    reference, _ = _compress(model, **options)
    measure = statprune.pipeline.stages.output_sensitivity
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return measure(*args, **kwargs)

    with interrupted_after(tmp_path / "ckpt", stage, 0):
        _compress(model, checkpoint_dir=tmp_path / "ckpt", **options)
    monkeypatch.setattr(statprune.pipeline.stages, "output_sensitivity", counted)
    resumed, _ = _compress(model, checkpoint_dir=tmp_path / "ckpt", resume=True, **options)
    assert len(calls) == (1 if measured_again else 0)
    assert_same_weights(reference, resumed)
