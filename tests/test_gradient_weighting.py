"""``layer_weighting="gradient"``: the loss-gradient energy at each block's output, checked against
an independent autograd computation, and how it enters the allocation, the errors and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import _build_tiny_tokenizer, build_tiny_model, tiny_texts

import statprune
import statprune.driver
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


def _reference(model, batches, labels_of) -> dict[tuple[str, int], float]:
    """Σ‖∂loss/∂y‖² over tokens / real tokens, by retain_grad on the block outputs (the graph exists
    because the embeddings require grad), with the loss written out here."""
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
            tokens += int(mask.sum())
    finally:
        for h in handles:
            h.remove()
    return {key: value / tokens for key, value in energy.items()}


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_sensitivity_is_the_mean_squared_loss_gradient_at_each_block_output(family):
    model = build_tiny_model(family, num_hidden_layers=3)
    model.eval()
    batches = _batches(family)
    with torch.no_grad():
        predicted = {id(b): model(**b.inputs).logits.argmax(-1) for b in batches}
    got = output_sensitivity(model, adapter_for(model.config), batches, unlabelled="predicted")
    assert got.labels == ("next-token" if family == "llama" else "predicted")
    assert all(p.requires_grad for p in model.parameters())  # weights unfrozen again
    embeddings = model.get_input_embeddings().weight
    embeddings.requires_grad_(True)
    want = _reference(model, batches, lambda b: predicted[id(b)])
    for (kind, i), value in want.items():
        assert value > 0
        assert getattr(got, kind)[i] == pytest.approx(value, rel=1e-4)


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
        def sensitivity(model, adapter, batches, prune):
            neurons = [1.0] * layers
            neurons[1] = weight
            return OutputSensitivity(heads=[1.0] * layers, neurons=neurons, labels="next-token")

        return sensitivity

    monkeypatch.setattr(statprune.driver, "output_sensitivity", fake(1.0))
    _, even = _compress(model, keep_params=0.5, layer_weighting=rule)
    monkeypatch.setattr(statprune.driver, "output_sensitivity", fake(1e6))
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

    def equal(model, adapter, batches, prune):
        return OutputSensitivity(heads=[2.5] * 3, neurons=[2.5] * 3, labels="next-token")

    monkeypatch.setattr(statprune.driver, "output_sensitivity", equal)
    _, flat = _compress(model, keep_params=0.5, layer_weighting="gradient-only")
    _, plain = _compress(model, keep_params=0.5, layer_weighting="none")
    _, residual = _compress(model, keep_params=0.5, layer_weighting="residual")
    assert [lr.neurons_kept for lr in flat.layers] == [lr.neurons_kept for lr in plain.layers]
    assert [lr.heads_kept for lr in flat.layers] == [lr.heads_kept for lr in plain.layers]
    assert [len(lr.neurons_kept) for lr in residual.layers] != [len(lr.neurons_kept) for lr in plain.layers]


@pytest.mark.parametrize(
    ("model_kwargs", "compress_kwargs", "expected"),
    [
        ({"family": "bert"}, {}, "gradient"),
        ({"family": "llama"}, {}, "gradient"),
        ({"family": "bert", "task": "base"}, {}, "residual"),  # nothing to differentiate
        ({"family": "bert", "num_labels": 1}, {}, "residual"),  # regression: needs labels
        ({"family": "bert"}, {"offload": True}, "residual"),  # the model is not on the device
        ({"family": "bert"}, {"method": "flap"}, "none"),  # baselines weigh no block
    ],
)
def test_auto_layer_weighting(model_kwargs, compress_kwargs, expected):
    model = build_tiny_model(**model_kwargs)
    _, report = _compress(model, keep_flops=0.7, **compress_kwargs)
    assert report.options["layer_weighting"] == expected


@pytest.mark.parametrize(("stage", "measured_again"), [("analyse", True), ("prune", False)])
def test_resume_measures_sensitivity_only_while_layers_are_left_to_analyse(
    tmp_path, monkeypatch, stage, measured_again
):
    """The saved curves are already weighted: a run resumed after its analysis pass skips the
    backward pass, one resumed inside it runs it again; both match an uninterrupted run."""
    from statprune.checkpoint import Checkpoint

    model = build_tiny_model("llama", num_hidden_layers=3)
    options = {"keep_params": 0.5, "layer_weighting": "gradient"}
    reference, _ = _compress(model, **options)
    save, measure = Checkpoint.save, statprune.driver.output_sensitivity
    calls = []

    def save_then_stop(self, name, layer, data, inputs):
        save(self, name, layer, data, inputs)
        if name == stage and layer == 0:
            raise KeyboardInterrupt

    def counted(*args, **kwargs):
        calls.append(1)
        return measure(*args, **kwargs)

    monkeypatch.setattr(Checkpoint, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        _compress(model, checkpoint_dir=tmp_path / "ckpt", **options)
    monkeypatch.setattr(Checkpoint, "save", save)
    monkeypatch.setattr(statprune.driver, "output_sensitivity", counted)
    resumed, _ = _compress(model, checkpoint_dir=tmp_path / "ckpt", resume=True, **options)
    assert len(calls) == (1 if measured_again else 0)
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
