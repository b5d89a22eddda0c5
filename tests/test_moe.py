"""Mixture-of-experts decoders (Mixtral, Qwen3-MoE, OLMoE): what the shared conformance test
(``tests/test_conformance.py``, which runs on them too) does not check.

Tiny random-weight models from ``tests/families.py``: 2 layers, 4 experts of 32 neurons, top-2.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import _build_tiny_tokenizer, assert_same_weights, interrupted_after, tiny_texts
from families import build

import statprune
from statprune.adapters import adapter_for
from statprune.calibration import CalibrationWarning
from statprune.flops import model_shapes, total_cost
from statprune.modeling_statprune import StatprunedExperts
from statprune.moe import ExpertGramAccumulator

TOKENIZER = _build_tiny_tokenizer()
TEXTS = tiny_texts(200)
CALIBRATION = {"samples": 64, "seq_len": 16, "progress": False}
MOE = ["mixtral", "qwen3_moe", "olmoe"]
IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [9, 10, 11, 12, 13, 14, 15, 16]])


def _compress(model, **kwargs):
    return statprune.compress(model, TOKENIZER, TEXTS, **{**CALIBRATION, **kwargs})


def _experts(model) -> list[StatprunedExperts]:
    return [layer.mlp.experts for layer in model.model.layers if hasattr(layer.mlp, "experts")]


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize("family", MOE)
def test_per_expert_widths_replace_the_fused_tensors_exactly(family):
    """The ``experts`` op alone (budget 1: nothing pruned) changes no output."""
    model = build(family, "ForCausalLM")
    same, _ = _compress(model, keep_params=1.0)
    assert all(isinstance(e, StatprunedExperts) and e.widths == [32] * 4 for e in _experts(same))
    assert [op["op"] for op in same.config.statprune_ops].count("experts") == len(_experts(same))
    torch.testing.assert_close(_logits(same), _logits(model), rtol=0, atol=1e-5)


def test_statistics_are_each_experts_routed_tokens_weighted_by_routing_weight():
    """Block e of the Gram is Σ over the tokens routed to e of w_e² z_e z_eᵀ, computed here
    from the stock fused tensors; blocks of different experts are not mixed."""
    model = build("mixtral", "ForCausalLM")
    block = model.model.layers[0].mlp
    x = torch.randn(200, 32)
    with torch.no_grad():
        _, weights, index = block.gate(x)
        width = block.experts.down_proj.shape[2]
        expected = []
        for e in range(4):
            tokens, slot = torch.where(index == e)
            gate, up = (x[tokens] @ block.experts.gate_up_proj[e].T).chunk(2, dim=-1)
            z = torch.nn.functional.silu(gate) * up * weights[tokens, slot, None]
            expected.append((z.double().T @ z.double(), len(tokens)))
        adapter = adapter_for(model.config)
        adapter.prepare(model.base_model)
        acc = ExpertGramAccumulator((width,) * 4, "cpu", torch.float64, "layer 0")
        acc.add_call(block.experts, (x, index, weights), torch.ones(200, dtype=torch.bool))
    stats = acc.finish()
    assert stats.count == 200 and acc.tokens == [n for _, n in expected]
    for e, (gram, _) in enumerate(expected):
        rows = slice(e * width, (e + 1) * width)
        torch.testing.assert_close(stats.gram[rows, rows], gram, rtol=1e-5, atol=1e-6)
        other = torch.ones(4 * width, dtype=torch.bool)
        other[rows] = False
        assert torch.count_nonzero(stats.gram[rows][:, other]) == 0


def _starve(expert: int, first: int = 0):
    """A router hook that routes to ``expert`` only the ``first`` tokens of each call (Mixtral's
    routing otherwise)."""

    def hook(module, args, out):
        logits = out[0].clone()
        logits[first:, expert] = -1e4
        logits[:first, expert] = 1e4
        probs = torch.softmax(logits.float(), dim=-1)
        top, index = torch.topk(probs, module.top_k, dim=-1)
        return out[0], (top / top.sum(dim=-1, keepdim=True)).to(out[1].dtype), index

    return hook


def test_an_expert_without_routed_tokens_keeps_its_neurons_with_a_warning():
    model = build("mixtral", "ForCausalLM")
    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(_starve(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruned, report = _compress(model, keep_params=0.6, prune=("neurons",))
    messages = [str(w.message) for w in caught if issubclass(w.category, CalibrationWarning)]
    for i in range(2):
        assert any(
            f"layer {i} expert 3 was routed only 0 calibration tokens for its 32 neurons" in m
            for m in messages
        ), messages
    for experts in _experts(pruned):
        assert experts.widths[3] == 32  # kept whole
        assert sum(experts.widths[:3]) < 96  # the others were pruned
    assert report.params_kept <= 0.6


def test_an_expert_with_fewer_tokens_than_neurons_keeps_them_all():
    """The threshold is the expert's width: below it its Gram is rank-deficient."""
    acc = ExpertGramAccumulator((4, 4), "cpu", torch.float64, "layer 7")
    z = torch.randn(6, 8)
    routed = torch.zeros(6, 2, dtype=torch.bool)
    routed[:, 0] = True
    routed[:3, 1] = True  # expert 1: 3 tokens for 4 neurons
    z[3:, 4:] = 0
    acc.add_routed(z, routed)
    with pytest.warns(
        CalibrationWarning, match="layer 7 expert 1 was routed only 3 calibration tokens for its 4"
    ):
        stats = acc.finish()
    assert acc.pinned.tolist() == [4, 5, 6, 7]
    assert torch.count_nonzero(stats.gram[4:]) == 0 and torch.count_nonzero(stats.total[4:]) == 0


@pytest.mark.parametrize("family", MOE)
def test_duplicated_neurons_inside_each_expert_are_removed_exactly(family):
    """The second half of every expert's neurons copies its first half: each expert keeps half
    (its own correction absorbs the copies) and the outputs do not move."""
    model = build(family, "ForCausalLM")
    adapter = adapter_for(model.config)
    adapter.prepare(model.base_model)
    with torch.no_grad():
        for layer in adapter.layers(model.base_model):
            ffn = adapter.ffn(layer)
            runs = [(sum(ffn.experts[:e]), w // 2) for e, w in enumerate(ffn.experts)] if ffn.experts else []
            runs = runs or [(0, ffn.width // 2)]
            for path in ffn.inputs:
                weight = layer.get_submodule(path).weight
                for a, h in runs:
                    weight[a + h : a + 2 * h] = weight[a : a + h]
    shapes = model_shapes(adapter, model.base_model)
    half = [(s.n_heads, s.ffn_width // 2) for s in shapes]
    dense = [(s.n_heads, s.ffn_width) for s in shapes]
    budget = total_cost(shapes, half, "flops", 16) / total_cost(shapes, dense, "flops", 16)
    pruned, _ = _compress(model, keep_flops=budget, prune=("neurons",))
    assert all(e.widths == [16] * 4 for e in _experts(pruned))
    reference = _logits(model)
    assert torch.linalg.vector_norm(_logits(pruned) - reference) / torch.linalg.vector_norm(reference) < 1e-5


@pytest.mark.parametrize("family", MOE)
def test_the_router_is_untouched_and_experts_get_uneven_widths(family):
    model = build(family, "ForCausalLM")
    pruned, report = _compress(model, keep_flops=0.6)
    for before, after in zip(model.model.layers, pruned.model.layers, strict=True):
        if hasattr(before.mlp, "gate"):
            assert torch.equal(before.mlp.gate.weight, after.mlp.gate.weight)
    assert all(e.down_linear.bias is None for e in _experts(pruned))  # no bias compensation here
    widths = [w for e in _experts(pruned) for w in e.widths]
    assert len(set(widths)) > 1, widths  # the allocation spread the cut by error, not uniformly
    for lr, experts in zip(report.layers[-len(_experts(pruned)) :], _experts(pruned), strict=True):
        assert len(lr.neurons_kept) == sum(experts.widths)


def test_flops_count_the_active_experts_and_parameters_all_of_them():
    model = build("mixtral", "ForCausalLM")
    adapter = adapter_for(model.config)
    shape = model_shapes(adapter, model.base_model)[0]
    assert shape.ffn_width == 4 * 32 and shape.ffn_active == (2, 4)
    s, d = 16, 32
    assert shape.ffn_macs(128, s) == 2 * 32 * s * d * 3  # top-2 experts of 32 neurons per token
    assert shape.ffn_params(128) == 4 * 32 * d * 3  # every expert


def test_a_dense_layer_of_a_moe_model_is_pruned_as_a_dense_ffn():
    """Qwen3-MoE's ``mlp_only_layers`` (layer 0 in the tiny config)."""
    model = build("qwen3_moe", "ForCausalLM")
    pruned, report = _compress(model, keep_params=0.5, prune=("neurons",))
    dense = pruned.model.layers[0].mlp
    assert not hasattr(dense, "experts")
    assert dense.up_proj.out_features == len(report.layers[0].neurons_kept) < 64


def test_fisher_refuses_routed_experts():
    model = build("olmoe", "ForCausalLM")
    with pytest.raises(statprune.StatpruneError, match="does not prune mixture-of-experts"):
        _compress(model, keep_flops=0.6, method="fisher")


@pytest.mark.parametrize("family", MOE)
def test_correction_beats_plain_removal(family):
    """On held-out texts of the calibration's kind, at two budgets. (On random token ids with
    special tokens, the conformance test's inputs, the per-expert corrections extrapolate: at 50 %
    FLOPs OLMoE's corrected model was 0.017 from the dense one against 0.016 for plain removal.)"""
    model = build(family, "ForCausalLM")
    held = TOKENIZER(tiny_texts(40, seed=5), return_tensors="pt", padding=True, return_token_type_ids=False)
    mask = held["attention_mask"].bool()
    with torch.no_grad():
        reference = model(**held, use_cache=False).logits[mask]
    for prune, budget in ((("neurons",), 0.75), (("heads", "neurons"), 0.5)):
        errors = []
        for correction in (True, False):
            pruned, _ = _compress(
                model,
                keep_flops=budget,
                prune=prune,
                activations="original",
                samples=200,
                correction=correction,
            )
            with torch.no_grad():
                out = pruned(**held, use_cache=False).logits[mask]
            errors.append(
                float(torch.linalg.vector_norm(out - reference) / torch.linalg.vector_norm(reference))
            )
        assert errors[0] < errors[1], (prune, errors)


def test_a_starved_expert_is_left_as_it_was_when_correcting_toward_the_original_model():
    model = build("mixtral", "ForCausalLM")
    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(_starve(0, first=4))  # 16 tokens in 4 batches
    with pytest.warns(CalibrationWarning, match="expert 0 was routed only 16 calibration tokens"):
        pruned, _ = _compress(model, keep_params=0.6, prune=("neurons",), correction_target="original")
    for before, after in zip(model.model.layers, _experts(pruned), strict=True):
        assert after.widths[0] == 32
        fused = before.mlp.experts.down_proj[0]  # expert 0's down projection, (H, I), untouched
        torch.testing.assert_close(after.down_linear.weight[:, :32], fused, rtol=0, atol=0)
    logits = _logits(pruned)
    assert torch.isfinite(logits).all()
    reference = _logits(model)
    assert torch.linalg.vector_norm(logits - reference) / torch.linalg.vector_norm(reference) < 0.5


def test_a_starved_experts_target_statistics_are_zeroed_with_its_gram():
    """Else the refit toward the original model would solve its zero Gram rows against nonzero
    ``ZᵀΔ`` rows (a division by the ridge)."""
    from statprune.linalg import CrossAccumulator

    acc = ExpertGramAccumulator((4, 4), "cpu", torch.float64, "layer 2")
    acc.targets = CrossAccumulator(8, 3, "cpu", torch.float64)
    z, routed = torch.randn(6, 8), torch.ones(6, 2, dtype=torch.bool)
    routed[2:, 1] = False  # expert 1: 2 tokens for 4 neurons
    z[2:, 4:] = 0
    acc.add_routed(z, routed)
    acc.targets.add_batch(z, torch.randn(6, 3))
    with pytest.warns(CalibrationWarning, match="layer 2 expert 1"):
        acc.finish()
    cross = acc.targets.finish().cross
    assert torch.count_nonzero(cross[4:]) == 0 and torch.count_nonzero(cross[:4]) == 12


def test_a_killed_run_resumes_to_identical_outputs(tmp_path):
    """The resumed run converts the experts again before replaying the saved surgery ops."""
    model = build("olmoe", "ForCausalLM")
    options = {"keep_params": 0.5}
    reference, _ = _compress(model, **options)
    with interrupted_after(tmp_path / "ckpt", "prune", 0):
        _compress(model, checkpoint_dir=tmp_path / "ckpt", **options)
    resumed, _ = _compress(model, checkpoint_dir=tmp_path / "ckpt", resume=True, **options)
    assert resumed.config.statprune_ops == reference.config.statprune_ops
    assert_same_weights(reference, resumed)
