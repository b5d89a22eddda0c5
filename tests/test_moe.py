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
from torch.utils._python_dispatch import TorchDispatchMode

import statprune
from statprune.adapters import adapter_for
from statprune.calibration import CalibrationWarning
from statprune.flops import model_shapes, total_cost
from statprune.linalg import GramStats
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


def _three_experts():
    """Experts of 4, 4 and 2 neurons on 6 tokens of width 3, top-2: expert 0 gets every token,
    expert 1 the first 3 (fewer than its 4 neurons), expert 2 the last 3."""
    torch.manual_seed(0)
    module = StatprunedExperts(3, [4, 4, 2], "silu")
    index = torch.tensor([[0, 1]] * 3 + [[0, 2]] * 3)
    weights = torch.rand(6, 2, dtype=torch.float32)
    return module, (torch.randn(6, 3), index, weights)


def test_an_expert_with_fewer_tokens_than_neurons_keeps_them_all():
    """The threshold is the expert's width: below it its Gram is rank-deficient."""
    module, args = _three_experts()
    acc = ExpertGramAccumulator((4, 4, 2), "cpu", torch.float64, "layer 7")
    with torch.no_grad():
        acc.add_call(module, args, torch.ones(6, dtype=torch.bool))
    with pytest.warns(
        CalibrationWarning, match="layer 7 expert 1 was routed only 3 calibration tokens for its 4"
    ):
        stats = acc.finish()
    assert acc.tokens == [6, 3, 3] and acc.pinned.tolist() == [4, 5, 6, 7]
    assert torch.count_nonzero(stats.gram[4:8]) == 0 and torch.count_nonzero(stats.gram[8:, 8:]) == 4


def test_a_starved_experts_target_statistics_are_zeroed_with_its_gram():
    """Else the refit toward the original model would solve its zero Gram rows against nonzero
    ``ZᵀΔ`` rows (a division by the ridge)."""
    module, args = _three_experts()
    acc = ExpertGramAccumulator((4, 4, 2), "cpu", torch.float64, "layer 2")
    acc.track_targets(5)
    with torch.no_grad():
        acc.add_call(module, args, torch.ones(6, dtype=torch.bool), torch.randn(6, 5))
    with pytest.warns(CalibrationWarning, match="layer 2 expert 1"):
        acc.finish()
    cross = acc.targets.finish().cross
    assert torch.count_nonzero(cross[4:8]) == 0
    assert torch.count_nonzero(cross[:4]) == 20 and torch.count_nonzero(cross[8:]) == 10


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


@pytest.mark.parametrize(
    ("family", "options"), [("olmoe", {"keep_params": 0.5}), ("qwen2_moe", {"keep_flops": 0.5})]
)
def test_a_killed_run_resumes_to_identical_outputs(tmp_path, family, options):
    """The resumed run converts the experts again before replaying the saved surgery ops; for
    Qwen2-MoE it allocates again from the saved curves (their ``shared`` splits) and ends with
    the same widths and weights."""
    model = build(family, "ForCausalLM")
    reference, _ = _compress(model, **options)
    with interrupted_after(tmp_path / "ckpt", "prune", 0):
        _compress(model, checkpoint_dir=tmp_path / "ckpt", **options)
    resumed, _ = _compress(model, checkpoint_dir=tmp_path / "ckpt", resume=True, **options)
    assert resumed.config.statprune_ops == reference.config.statprune_ops
    assert_same_weights(reference, resumed)


# ----------------------------------------------------------- block-wise statistics (statprune.linalg.blocks)


class SquareFloat64(TorchDispatchMode):
    """Records the shapes of the float64 tensors (the statistics' dtype) that ops return with two
    dimensions of at least ``size`` (batches of activations have one such dimension at most:
    tokens × hidden, or float32 tokens × neurons)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size, self.found = size, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            square = isinstance(t, torch.Tensor) and sum(d >= self.size for d in t.shape) >= 2
            if square and t.dtype == torch.float64:
                self.found.add(tuple(t.shape))
        return out


def _dense_statistics(monkeypatch):
    """The former path: ``finish`` hands the pipeline the dense (E·I)² Gram (``GramStats``)."""
    blockwise = ExpertGramAccumulator.finish

    def dense(self):
        stats = blockwise(self)
        return GramStats(gram=stats.gram, total=stats.total, count=stats.count)

    monkeypatch.setattr(ExpertGramAccumulator, "finish", dense)


@pytest.mark.parametrize(
    "family, options",
    [
        ("mixtral", {"keep_flops": 0.6}),
        ("olmoe", {"keep_params": 0.5, "prune": ("neurons",), "correction_ridge": 0.05}),
        ("qwen3_moe", {"keep_flops": 0.5, "activations": "sequential", "correction_target": "original"}),
        ("olmoe", {"keep_flops": 0.6, "method": "flap"}),
        ("mixtral", {"keep_flops": 0.6, "method": "wanda-sp"}),
    ],
)
def test_blockwise_statistics_give_the_dense_grams_results(family, options, monkeypatch):
    """Same kept neurons and weights (float64 model, to 1e-10) as the dense Gram gave."""
    model = build(family, "ForCausalLM").double()
    blockwise, report = _compress(model, **options)
    with monkeypatch.context() as patch:
        _dense_statistics(patch)
        dense, dense_report = _compress(model, **options)
    assert [r.neurons_kept for r in report.layers] == [r.neurons_kept for r in dense_report.layers]
    assert [e.widths for e in _experts(blockwise)] == [e.widths for e in _experts(dense)]
    for (name, a), b in zip(blockwise.state_dict().items(), dense.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)


def test_a_starved_expert_gets_the_dense_grams_results(monkeypatch):
    model = build("mixtral", "ForCausalLM").double()
    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(_starve(2))
    options = {"keep_params": 0.6, "prune": ("neurons",)}
    with pytest.warns(CalibrationWarning):
        blockwise, _ = _compress(model, **options)
    with monkeypatch.context() as patch, pytest.warns(CalibrationWarning):
        _dense_statistics(patch)
        dense, _ = _compress(model, **options)
    assert [e.widths for e in _experts(blockwise)] == [e.widths for e in _experts(dense)]
    for (name, a), b in zip(blockwise.state_dict().items(), dense.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)


@pytest.mark.parametrize("target", ["activations", "original"])
def test_no_statistic_of_the_dense_experts_size_is_allocated(target, monkeypatch):
    """4 experts of 32 neurons: no float64 tensor of 128 × 128 or more in a whole compression
    (the per-expert blocks are 32 × 32, the cross statistics 128 × 32); the dense path has some."""
    model = build("mixtral", "ForCausalLM")
    options = {"keep_flops": 0.6, "correction_target": target, "activations": "sequential"}
    with SquareFloat64(4 * 32) as probe:
        _compress(model, **options)
    assert not probe.found, probe.found
    _dense_statistics(monkeypatch)
    with SquareFloat64(4 * 32) as probe:
        _compress(model, **options)
    assert (4 * 32, 4 * 32) in probe.found


def test_the_memory_table_in_the_docs_is_the_functions():
    from pathlib import Path

    from statprune.moe import EXPERT_BLOCK_ROWS, memory_table, statistics_memory

    doc = (Path(__file__).parent.parent / "docs" / "MOE.md").read_text()
    assert memory_table() in doc
    olmoe = statistics_memory(2048, 64, 1024, 8)
    assert olmoe["dense"] == 3 * 8 * 65536**2 and olmoe["blockwise"] == 8 * (64 + 2) * 1024**2
    assert olmoe["rows_per_1k_tokens"] == 4 * 1000 * 65536  # z~: every expert's neurons
    assert olmoe["expert_rows_per_1k_tokens"] == 4 * 1000 * 8 // 64 * 1024  # one expert's k/E share
    assert olmoe["buffers"] == 4 * 65536 * max(EXPERT_BLOCK_ROWS, 1024) < olmoe["buffers_before"]
    acc = ExpertGramAccumulator((32, 2048), "cpu", torch.float32)  # what the buffers formula assumes
    assert [b.block_rows for b in acc.blocks] == [EXPERT_BLOCK_ROWS, 2048]


# ------------------------------------------- statistics expert by expert, never the dense z~ (N × Σ widths)


def _dense_z(module, hidden, index, weights, shared=None):
    """Reference (the former ``StatprunedExperts.activations``): ``z~`` built dense, (N, Σ widths),
    zero for the experts a token was not routed to; and which experts each token got (N, E + shared)."""
    w, routed = module._weights(hidden, index, weights, shared)
    out = hidden.new_zeros(hidden.shape[0], sum(module.widths))
    for e, rows in enumerate(module._slices()):
        tokens = torch.nonzero(routed[:, e]).flatten()
        if rows.stop > rows.start and tokens.numel():
            z = module._neurons(hidden[tokens], rows)
            out[tokens, rows] = z * w[tokens, e, None].to(z.dtype)
    return out, routed


def _dense_add_call(self, module, args, mask, shift=None):
    """Reference (the former ``ExpertGramAccumulator.add_call`` and ``CrossAccumulator``): each
    expert's columns sliced out of the real tokens' dense ``z~``, ``ZᵀΔ`` one product of those rows."""
    z, routed = _dense_z(module, *args)
    z, routed = z[mask], routed[mask]
    self._count += z.shape[0]
    start = 0
    for e, (acc, width) in enumerate(zip(self.blocks, self.widths, strict=True)):
        self.tokens[e] += int(routed[:, e].sum())
        if width:
            acc.add_batch(z[routed[:, e], start : start + width])
        start += width
    if shift is not None:
        self.targets.add_shifts(shift)
        self.targets._cross += (z.to(self.dtype).T @ shift.to(self.dtype)).double()


def test_expert_by_expert_statistics_are_the_dense_rows_statistics():
    """Qwen2-MoE's experts (routed and the gated shared one) on 200 tokens of which about 150 are real:
    the same Gram blocks, token counts and ``ZᵀΔ`` as from the dense ``z~`` (float64)."""
    model = build("qwen2_moe", "ForCausalLM").double()
    adapter_for(model.config).prepare(model.base_model)
    block = model.model.layers[0].mlp
    torch.manual_seed(1)
    x, mask, shift = torch.randn(200, 32, dtype=torch.float64), torch.rand(200) < 0.75, None
    with torch.no_grad():
        _, weights, index = block.gate(x)
        args = (x, index, weights, torch.sigmoid(block.shared_expert_gate(x)))
        shift = torch.randn(int(mask.sum()), 32, dtype=torch.float64)
        results = []
        for add_call in (ExpertGramAccumulator.add_call, _dense_add_call):
            acc = ExpertGramAccumulator(tuple(block.experts.widths), "cpu", torch.float64, "layer 0")
            acc.track_targets(32)
            add_call(acc, block.experts, args, mask, shift)
            results.append((acc, acc.finish(), acc.targets.finish()))
    (sparse, gram, cross), (dense, dense_gram, dense_cross) = results
    assert sparse.count == dense.count == int(mask.sum()) and sparse.tokens == dense.tokens
    assert sparse.tokens[4] == sparse.count and not sparse.starved()  # shared: every real token
    for a, b in zip(gram.blocks, dense_gram.blocks, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    torch.testing.assert_close(cross.cross, dense_cross.cross, rtol=0, atol=1e-12)
    torch.testing.assert_close(cross.total, shift.sum(0), rtol=0, atol=1e-12)
    assert cross.count == dense_cross.count == sparse.count


@pytest.mark.parametrize(
    "family, options",
    [
        ("mixtral", {"keep_flops": 0.6}),
        ("olmoe", {"keep_params": 0.5, "prune": ("neurons",), "activations": "original"}),
        ("qwen2_moe", {"keep_flops": 0.5, "activations": "sequential", "correction_target": "original"}),
        ("qwen3_moe", {"keep_flops": 0.5, "activations": "sequential", "correction_target": "original"}),
        ("olmoe", {"keep_flops": 0.6, "method": "flap"}),
    ],
)
def test_expert_by_expert_statistics_give_the_dense_rows_results(family, options, monkeypatch):
    """Same kept neurons and weights (float64 model and statistics, to 1e-10) as the former
    dense ``z~`` rows gave, on padded calibration batches (only real tokens count)."""
    model = build(family, "ForCausalLM").double()
    options = {**options, "gram_dtype": "float64"}
    sparse, report = _compress(model, **options)
    with monkeypatch.context() as patch:
        patch.setattr(ExpertGramAccumulator, "add_call", _dense_add_call)
        dense, dense_report = _compress(model, **options)
    assert [r.neurons_kept for r in report.layers] == [r.neurons_kept for r in dense_report.layers]
    assert [e.widths for e in _experts(sparse)] == [e.widths for e in _experts(dense)]
    for (name, a), b in zip(sparse.state_dict().items(), dense.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)


@pytest.mark.parametrize("target", ["activations", "original"])
def test_a_starved_expert_gets_the_dense_rows_results(target, monkeypatch):
    model = build("mixtral", "ForCausalLM").double()
    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(_starve(2, first=2))
    options = {"keep_params": 0.6, "prune": ("neurons",), "gram_dtype": "float64"}
    options["correction_target"] = target
    with pytest.warns(CalibrationWarning, match="expert 2 was routed only 8 calibration tokens"):
        sparse, _ = _compress(model, **options)
    with monkeypatch.context() as patch, pytest.warns(CalibrationWarning):
        patch.setattr(ExpertGramAccumulator, "add_call", _dense_add_call)
        dense, _ = _compress(model, **options)
    assert [e.widths[2] for e in _experts(sparse)] == [32, 32]
    for (name, a), b in zip(sparse.state_dict().items(), dense.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)


class RowsOfWidth(TorchDispatchMode):
    """Records the shapes of the tensors that ops return with a dimension of ``width`` and at
    least ``rows`` × ``width`` elements (``z~`` of a batch: real tokens × Σ widths)."""

    def __init__(self, width: int, rows: int) -> None:
        super().__init__()
        self.width, self.rows, self.found = width, rows, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and self.width in t.shape and t.numel() >= self.rows * self.width:
                self.found.add(tuple(t.shape))
        return out


@pytest.mark.parametrize("target", ["activations", "original"])
@pytest.mark.parametrize(("family", "width"), [("mixtral", 4 * 32), ("qwen2_moe", 4 * 32 + 16)])
def test_no_tensor_of_the_batch_tokens_times_all_neurons_is_allocated(family, width, target, monkeypatch):
    """In a whole compression, nothing of 40 or more rows × Σ widths (every calibration batch has
    at least 16 × 5 real tokens; the hidden size, 32, is under 40: ``ZᵀΔ`` and the weights, Σ widths
    × 32, do not count); the former dense rows are found."""
    model = build(family, "ForCausalLM")
    options = {"keep_flops": 0.6, "correction_target": target, "activations": "sequential"}
    with RowsOfWidth(width, 40) as probe:
        _compress(model, **options)
    assert not probe.found, probe.found
    monkeypatch.setattr(ExpertGramAccumulator, "add_call", _dense_add_call)
    with RowsOfWidth(width, 40) as probe:
        _compress(model, **options)
    assert any(shape[1] == width and shape[0] >= 80 for shape in probe.found), probe.found


# ------------------------------------------------------------------- Qwen2-MoE: the shared expert


def _balanced(module, args, out):
    """Router hook: token t goes to experts t mod 4 and t + 1 mod 4 (weights 0.7, 0.3), so each of
    the 4 experts gets exactly k/E = 1/2 of the tokens (the balance the FLOPs count assumes)."""
    n = out[0].shape[0]
    first = torch.arange(n) % 4
    index = torch.stack([first, (first + 1) % 4], dim=1)
    weights = torch.tensor([0.7, 0.3], dtype=out[1].dtype).expand(n, 2)
    return out[0], weights, index


def _shared_blocks(model):
    return [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "shared_expert_gate")]


def test_qwen2_moe_shared_expert_joins_the_experts_module_exactly():
    """The ``shared_experts`` op alone (budget 1): the routed experts' neurons then the shared
    expert's in one module, the router and the shared expert's gate the stock modules."""
    from statprune.modeling_statprune import StatprunedSharedMoeBlock

    model = build("qwen2_moe", "ForCausalLM")
    same, _ = _compress(model, keep_params=1.0)
    for before, after in zip(model.model.layers, same.model.layers, strict=True):
        assert isinstance(after.mlp, StatprunedSharedMoeBlock)
        assert after.mlp.experts.widths == [32] * 4 + [16] and after.mlp.experts.shared == 1
        assert after.mlp.experts.num_experts == 4
        assert type(after.mlp.gate) is type(before.mlp.gate)
        assert torch.equal(after.mlp.gate.weight, before.mlp.gate.weight)
        assert torch.equal(after.mlp.shared_expert_gate.weight, before.mlp.shared_expert_gate.weight)
        shared = after.mlp.experts.down_linear.weight[:, 128:]
        assert torch.equal(shared, before.mlp.shared_expert.down_proj.weight)
    torch.testing.assert_close(_logits(same), _logits(model), rtol=0, atol=1e-5)


def test_qwen2_moe_shared_block_is_weighted_by_its_sigmoid_gate_on_every_token():
    """The shared expert's Gram block is Σ over ALL tokens of σ(g·x)² z zᵀ (from the stock
    module); the routed blocks stay as for the other families; no cross terms."""
    model = build("qwen2_moe", "ForCausalLM")
    block = model.model.layers[0].mlp
    x = torch.randn(200, 32)
    with torch.no_grad():
        shared = block.shared_expert
        z = torch.nn.functional.silu(shared.gate_proj(x)) * shared.up_proj(x)
        z = z * torch.sigmoid(block.shared_expert_gate(x))
        expected = z.double().T @ z.double()
        _, weights, index = block.gate(x)
        adapter = adapter_for(model.config)
        adapter.prepare(model.base_model)
        new = model.model.layers[0].mlp
        acc = ExpertGramAccumulator(tuple(new.experts.widths), "cpu", torch.float64, "layer 0")
        gate = torch.sigmoid(new.shared_expert_gate(x))
        acc.add_call(new.experts, (x, index, weights, gate), torch.ones(200, dtype=torch.bool))
    stats = acc.finish()
    assert acc.tokens[4] == 200 and sum(acc.tokens[:4]) == 400  # top-2 of the routed experts
    torch.testing.assert_close(stats.gram[128:, 128:], expected, rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(stats.gram[128:, :128]) == 0


def test_qwen2_moe_shared_expert_is_pruned_and_its_gate_and_the_router_untouched():
    model = build("qwen2_moe", "ForCausalLM")
    for kind in ("flops", "params"):
        pruned, report = _compress(model, **{f"keep_{kind}": 0.5}, prune=("neurons",))
        assert (report.flops_kept if kind == "flops" else report.params_kept) <= 0.5
        widths = [e.widths for e in _experts(pruned)]
        assert any(w[4] < 16 for w in widths), widths  # the shared expert lost neurons
        assert len({w for ws in widths for w in ws[:4]}) > 1  # routed experts: their own widths
        for before, after, lr in zip(model.model.layers, pruned.model.layers, report.layers, strict=True):
            assert torch.equal(after.mlp.gate.weight, before.mlp.gate.weight)
            assert torch.equal(after.mlp.shared_expert_gate.weight, before.mlp.shared_expert_gate.weight)
            assert after.mlp.experts.down_linear.bias is None
            assert len(lr.neurons_kept) == sum(after.mlp.experts.widths)


def test_qwen2_moe_uneven_widths_reload_exactly(tmp_path):
    """Saved, then rebuilt by the folder's own code from the stock Qwen2-MoE classes."""
    import transformers

    model = build("qwen2_moe", "ForCausalLM")
    pruned, _ = _compress(model, keep_flops=0.6)
    folder = statprune.save(pruned, tmp_path / "out", tokenizer=TOKENIZER)
    remote = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(remote).__module__.endswith("modeling_statprune")
    assert [e.widths for e in _experts(remote)] == [e.widths for e in _experts(pruned)]
    torch.testing.assert_close(_logits(remote), _logits(pruned), rtol=0, atol=1e-6)


def _counted_flops(model, seq_len: int = 16) -> int:
    """torch's FLOP counter over one forward of ``seq_len`` tokens with balanced routing (eager
    attention and experts), less the LM head, the routers and the shared experts' gates (not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    model.config._attn_implementation = "eager"
    model.config._experts_implementation = "eager"  # the stock experts' loop of matrix products
    handles = [layer.mlp.gate.register_forward_hook(_balanced) for layer in model.model.layers]
    ids = torch.randint(3, 19, (1, seq_len))
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    head = model.get_output_embeddings()
    routers = sum(2 * seq_len * 32 * (4 + 1) for _ in model.model.layers)  # gate (E x H), shared gate (1 x H)
    return counter.get_total_flops() - 2 * seq_len * head.in_features * head.out_features - routers


def test_qwen2_moe_accounting_equals_torchs_flop_count_and_the_parameters():
    """Dense and pruned (uneven routed widths, a narrower shared expert): FLOPs as torch counts
    them under balanced routing (a shared neuron E/k = 2 routed ones), parameters as held."""
    from torch import nn

    model = build("qwen2_moe", "ForCausalLM")
    adapter = adapter_for(model.config)
    shape = model_shapes(adapter, model.base_model)[0]
    assert (shape.ffn_width, shape.ffn_shared, shape.ffn_active) == (144, 16, (2, 4))
    assert shape.ffn_macs(144, 16) == 16 * 32 * 3 * (16 + 128 // 2)
    pruned, report = _compress(model, keep_flops=0.45)
    assert any(e.widths[4] < 16 for e in _experts(pruned))
    assert any(len(lr.heads_kept) < 4 for lr in report.layers)
    for m in (model, pruned):
        shapes = model_shapes(adapter, m.base_model)
        dense = [(s.n_heads, s.ffn_width) for s in shapes]
        assert total_cost(shapes, dense, "flops", 16) == _counted_flops(m)
        held = sum(
            p.numel()
            for layer in m.model.layers
            for name, module in layer.named_modules()
            if isinstance(module, nn.Linear) and not name.endswith(("mlp.gate", "shared_expert_gate"))
            for p in module.parameters(recurse=False)
        )
        fused = sum(
            p.numel() for layer in m.model.layers for p in layer.mlp.experts.parameters(recurse=False)
        )
        assert total_cost(shapes, dense, "params", 16) == held + fused
    assert report.flops_after == _counted_flops(pruned)


def test_qwen2_moe_duplicated_neurons_inside_each_expert_are_removed_exactly():
    """Half of each routed expert's neurons and of the shared expert's copy the other half: at
    the FLOPs of half of each, every expert keeps half and the outputs do not move."""
    model = build("qwen2_moe", "ForCausalLM")
    adapter = adapter_for(model.config)
    adapter.prepare(model.base_model)
    with torch.no_grad():
        for layer in adapter.layers(model.base_model):
            ffn = adapter.ffn(layer)
            for e, w in enumerate(ffn.experts):
                a, h = sum(ffn.experts[:e]), w // 2
                for path in ffn.inputs:
                    weight = layer.get_submodule(path).weight
                    weight[a + h : a + 2 * h] = weight[a : a + h]
    shapes = model_shapes(adapter, model.base_model)
    half = total_cost(shapes, [(s.n_heads, s.ffn_width // 2) for s in shapes], "flops", 16)
    budget = half / total_cost(shapes, [(s.n_heads, s.ffn_width) for s in shapes], "flops", 16)
    pruned, report = _compress(model, keep_flops=budget, prune=("neurons",))
    assert all(e.widths == [16] * 4 + [8] for e in _experts(pruned))
    assert report.flops_kept <= budget
    reference = _logits(model)
    assert torch.linalg.vector_norm(_logits(pruned) - reference) / torch.linalg.vector_norm(reference) < 1e-5


def test_qwen2_moe_correction_beats_plain_removal():
    test_correction_beats_plain_removal("qwen2_moe")


def test_qwen2_moe_dense_layers_are_pruned_as_dense_ffns():
    """``decoder_sparse_step=2``: layer 0 is a plain SwiGLU MLP (no shared expert), layer 1 sparse."""
    import transformers
    from families import FAMILIES

    config = transformers.Qwen2MoeConfig(**{**FAMILIES["qwen2_moe"].fields, "decoder_sparse_step": 2})
    torch.manual_seed(0)
    model = transformers.Qwen2MoeForCausalLM(config).eval()
    pruned, report = _compress(model, keep_flops=0.6, prune=("neurons",))
    dense = pruned.model.layers[0].mlp
    assert not hasattr(dense, "experts") and dense.up_proj.out_features == len(report.layers[0].neurons_kept)
    assert dense.up_proj.out_features < 64 and report.flops_kept <= 0.6
    assert pruned.model.layers[1].mlp.experts.shared == 1


def test_shared_and_routed_neurons_are_merged_by_error_per_unit_of_cost():
    """``merge_by_price``: the groups' own error reductions re-merged by reduction / price; the
    allocation's ``SplitCount`` then keeps that split whatever order the selection has."""
    from statprune.allocation import SplitCount, merge_by_price
    from statprune.linalg.interpolative import InterpolativeDecomposition

    # order: routed 0 (drop 5), shared 3 (drop 4), routed 1 (drop 2), shared 4 (drop 1), routed 2 (1)
    errors = torch.tensor([13.0, 8.0, 4.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    is_shared = torch.tensor([False, True, False, True, False])
    merged, shared = merge_by_price(errors, is_shared, shared_price=2.0, routed_price=1.0)
    # per cost: routed 5, 2, 1; shared 2, 0.5 -> routed 0, routed 1 and shared 3 (tie: routed first)
    assert merged.tolist() == [13.0, 8.0, 6.0, 2.0, 1.0, 0.0]
    assert shared == [0, 0, 0, 1, 1, 2]
    selection = InterpolativeDecomposition(order=torch.tensor([0, 3, 1, 4, 2]), errors=errors, rank=5)
    kept, dropped = selection.keep(SplitCount(3, shared=1, first=3))
    assert kept.tolist() == [0, 1, 3] and dropped.tolist() == [2, 4]
    assert selection.keep(3)[0].tolist() == [0, 1, 3]  # a plain count: the selection's own prefix
    assert selection.keep(SplitCount(2, shared=0, first=3))[0].tolist() == [0, 1]


def test_a_cost_model_by_count_refuses_shared_experts():
    from statprune.allocation import CostModel, check_reachable

    class ByCount(CostModel):
        kind = "latency"

        def layer_cost(self, shape, heads, neurons):
            return float(heads + neurons)

    model = build("qwen2_moe", "ForCausalLM")
    shapes = model_shapes(adapter_for(model.config), model.base_model)
    with pytest.raises(statprune.StatpruneError, match="--keep-flops or --keep-params"):
        check_reachable(shapes, ByCount(), 0.5, 16, ("heads", "neurons"))


@pytest.mark.parametrize("budget", [0.45, 0.55, 0.65])
def test_qwen2_moe_flops_budget_is_met_when_the_pruning_pass_selects_again(budget):
    """Sequential activations (the decoders' default) select each layer's neurons again on the
    pruned model's inputs: the count alone would keep another shared/routed split than the one
    the allocation priced (measured: 1.4 to 1.8 points over these budgets); the split it hands on
    is kept."""
    model = build("qwen2_moe", "ForCausalLM")
    _, report = _compress(model, keep_flops=budget, prune=("neurons",), activations="sequential")
    assert budget - 0.01 <= report.flops_kept <= budget
