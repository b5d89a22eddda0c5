"""End-to-end properties of STAT compression on tiny random-weight models of every family."""

import contextlib
import warnings

import pytest
import torch
from conftest import DECODER_FAMILIES, TINY_FAMILIES, _build_tiny_tokenizer, build_tiny_model, tiny_texts

import statprune
from statprune.adapters import adapter_for
from statprune.calibration import batches_from_tensors, tokenize_examples
from statprune.flops import model_shapes, total_cost

TOKENIZER = _build_tiny_tokenizer()


def _inputs(family, n=24, seed=1):
    enc = TOKENIZER(tiny_texts(n, seed=seed), return_tensors="pt", padding=True)
    if family in DECODER_FAMILIES or family in ("distilbert", "mpnet", "roberta"):
        enc.pop("token_type_ids", None)
    return dict(enc)


def _output(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    if hasattr(out, "logits"):
        return out.logits
    return out.last_hidden_state


def _rel_error(a, b):
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()


def _compress(model, **kwargs):
    kwargs.setdefault("progress", False)
    return statprune.compress(model, TOKENIZER, tiny_texts(300), **kwargs)


def _linear_params(model):
    """Parameters of every attention/FFN projection, counted from the modules themselves."""
    adapter = adapter_for(model.config)
    total = 0
    for layer in adapter.layers(model.base_model):
        attn, ffn = adapter.attention(layer), adapter.ffn(layer)
        paths = [*ffn.inputs, ffn.output, attn.o]
        if attn.n_heads:
            paths += [attn.q, attn.k, attn.v]
        else:
            block = layer.get_submodule(attn.block)
            total += 0 if block.bias is None else block.bias.numel()
        for path in paths:
            with contextlib.suppress(AttributeError):
                total += sum(p.numel() for p in layer.get_submodule(path).parameters())
    return total


def test_keep_everything_changes_nothing():
    model = build_tiny_model("bert")
    inputs = _inputs("bert")
    pruned, report = _compress(model, keep_flops=1.0)
    assert torch.equal(_output(pruned, inputs), _output(model, inputs))
    assert report.flops_kept == 1.0 and report.params_kept == 1.0
    assert not pruned.config.statprune_ops


def test_input_model_is_not_modified():
    model = build_tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _compress(model, keep_flops=0.5)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize(("kind", "budget"), [("flops", 0.7), ("flops", 0.4), ("params", 0.6)])
def test_budget_is_met_for_every_family(family, kind, budget):
    model = build_tiny_model(family)
    inputs = _inputs(family)
    pruned, report = _compress(model, **{f"keep_{kind}": budget})
    achieved = report.flops_kept if kind == "flops" else report.params_kept
    assert achieved <= budget + 1e-12
    assert achieved >= budget - 0.1, "allocation left far more slack than one unit"
    # the report's accounting agrees with the modules actually in the model
    assert report.params_after == _linear_params(pruned)
    assert _linear_params(pruned) < _linear_params(model)
    out = _output(pruned, inputs)
    assert torch.isfinite(out).all()
    assert _rel_error(out, _output(model, inputs)) < 0.5


def _duplicate_neurons(model):
    """Make each layer's FFN neurons come in exact pairs (n, n + width/2)."""
    adapter = adapter_for(model.config)
    with torch.no_grad():
        for layer in adapter.layers(model.base_model):
            ffn = adapter.ffn(layer)
            half = ffn.width // 2
            for path in ffn.inputs:
                lin = layer.get_submodule(path)
                lin.weight[half:] = lin.weight[:half]
                if lin.bias is not None:
                    lin.bias[half:] = lin.bias[:half]


def _duplicate_heads(model):
    """Make heads h and h + H/2 compute identical outputs (same Q, K, V rows)."""
    adapter = adapter_for(model.config)
    with torch.no_grad():
        for layer in adapter.layers(model.base_model):
            attn = adapter.attention(layer)
            half = attn.n_heads // 2 * attn.head_dim
            for path in (attn.q, attn.k, attn.v):
                lin = layer.get_submodule(path)
                lin.weight[half:] = lin.weight[:half]
                if lin.bias is not None:
                    lin.bias[half:] = lin.bias[:half]


def _half_budget(model, what):
    adapter = adapter_for(model.config)
    shapes = model_shapes(adapter, model.base_model)
    dense = [(s.n_heads, s.ffn_width) for s in shapes]
    if what == "neurons":
        half = [(s.n_heads, s.ffn_width // 2) for s in shapes]
    else:
        half = [(s.n_heads // 2, s.ffn_width) for s in shapes]
    return total_cost(shapes, half, "flops", 128) / total_cost(shapes, dense, "flops", 128)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_duplicate_neurons_are_removed_exactly(family):
    model = build_tiny_model(family)
    _duplicate_neurons(model)
    budget = _half_budget(model, "neurons")
    pruned, report = _compress(model, keep_flops=budget, prune=("neurons",))
    assert all(len(lr.neurons_kept) == lr.neurons_total // 2 for lr in report.layers)
    inputs = _inputs(family)
    assert _rel_error(_output(pruned, inputs), _output(model, inputs)) < 1e-5


def test_duplicate_heads_are_removed_exactly():
    model = build_tiny_model("bert")  # multi-head attention: K and V go with Q
    _duplicate_heads(model)
    budget = _half_budget(model, "heads")
    pruned, report = _compress(model, keep_flops=budget, prune=("heads",))
    assert all(len(lr.heads_kept) == lr.heads_total // 2 for lr in report.layers)
    inputs = _inputs("bert")
    assert _rel_error(_output(pruned, inputs), _output(model, inputs)) < 1e-5


@pytest.mark.parametrize("family", ["bert", "llama", "mpnet"])
def test_correction_beats_plain_removal_of_the_same_units(family):
    model = build_tiny_model(family)
    inputs = _inputs(family, seed=7)  # held-out sentences
    reference = _output(model, inputs)
    common = {"keep_flops": 0.5, "activations": "original"}
    corrected, rep_c = _compress(model, **common)
    plain, rep_p = _compress(model, correction=False, **common)
    assert [lr.neurons_kept for lr in rep_c.layers] == [lr.neurons_kept for lr in rep_p.layers]
    assert [lr.heads_kept for lr in rep_c.layers] == [lr.heads_kept for lr in rep_p.layers]
    assert _rel_error(_output(corrected, inputs), reference) < _rel_error(_output(plain, inputs), reference)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_a_huge_correction_ridge_is_plain_removal_and_a_zero_one_the_exact_correction(family):
    model = build_tiny_model(family)
    inputs = _inputs(family, seed=7)
    common = {"keep_flops": 0.5, "activations": "original", "bias_compensation": False}
    plain, rep_p = _compress(model, correction=False, **common)
    damped, rep_d = _compress(model, correction_ridge=1e9, **common)
    exact, _ = _compress(model, **common)
    zero, rep_z = _compress(model, correction_ridge=0.0, **common)
    assert [lr.neurons_kept for lr in rep_d.layers] == [lr.neurons_kept for lr in rep_p.layers]
    assert [lr.heads_kept for lr in rep_d.layers] == [lr.heads_kept for lr in rep_p.layers]
    assert rep_d.options["correction_ridge"] == 1e9 and rep_z.options["correction_ridge"] == 0.0
    assert _rel_error(_output(damped, inputs), _output(plain, inputs)) < 1e-6
    assert _rel_error(_output(zero, inputs), _output(exact, inputs)) == 0.0
    assert _rel_error(_output(exact, inputs), _output(plain, inputs)) > 1e-3


def test_thin_calibration_data_warns_that_the_corrections_may_overfit():
    model = build_tiny_model("llama")
    shapes = model_shapes(adapter_for(model.config), model.base_model)
    widest = max(max(s.n_heads * s.head_dim, s.ffn_width) for s in shapes)
    gen = torch.Generator().manual_seed(0)

    def run(tokens, **kwargs):
        ids = torch.randint(5, model.config.vocab_size, (tokens // 16, 16), generator=gen)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            batches = batches_from_tensors(ids)
            statprune.compress(model, data=batches, keep_flops=0.5, progress=False, **kwargs)
        return [str(w.message) for w in caught if "may overfit" in str(w.message)]

    thin = run(2 * widest)
    assert len(thin) == 1 and "--correction-ridge" in thin[0]
    assert run(2 * widest, correction_ridge=0.1) == []  # already damped
    assert run(5 * widest) == []


@pytest.mark.parametrize("ridge", [-0.1, float("nan"), float("inf")])
def test_bad_correction_ridges_are_rejected(ridge):
    with pytest.raises(statprune.StatpruneError, match="correction-ridge"):
        _compress(build_tiny_model("bert"), keep_flops=0.5, correction_ridge=ridge)


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_grouped_query_attention_keeps_equal_groups_and_generates(family):
    model = build_tiny_model(family, num_attention_heads=8, num_key_value_heads=2)
    pruned, report = _compress(model, keep_flops=0.5)
    adapter = adapter_for(pruned.config)
    for lr, layer in zip(report.layers, adapter.layers(pruned.base_model), strict=True):
        groups = {h // 4 for h in lr.heads_kept}
        per_group = [sum(1 for h in lr.heads_kept if h // 4 == g) for g in range(2)]
        assert len(set(per_group)) == 1, f"unequal heads per KV group: {per_group}"
        if lr.heads_kept:
            attn = layer.self_attn
            assert groups == {0, 1}
            assert attn.k_proj.out_features == 2 * attn.head_dim  # KV heads stay
            assert attn.num_key_value_groups == len(lr.heads_kept) // 2
    ids = torch.tensor([[5, 6, 7, 8]])
    out = pruned.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 10)
    # the cache path agrees with a full forward pass
    with torch.no_grad():
        full = pruned(out[:, :-1]).logits[0, -1].argmax()
    assert full.item() == out[0, -1].item()


@pytest.mark.parametrize("family", ["bert", "distilbert", "mpnet", "llama"])
def test_layers_can_lose_every_head(family):
    model = build_tiny_model(family)
    adapter = adapter_for(model.config)
    shapes = model_shapes(adapter, model.base_model)
    ffn_only = [(0, s.ffn_width) for s in shapes]
    dense = [(s.n_heads, s.ffn_width) for s in shapes]
    budget = total_cost(shapes, ffn_only, "flops", 128) / total_cost(shapes, dense, "flops", 128)
    pruned, report = _compress(model, keep_flops=budget, prune=("heads",))
    assert all(not lr.heads_kept for lr in report.layers)
    out = _output(pruned, _inputs(family))
    assert torch.isfinite(out).all()
    if family == "llama":
        pruned.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False, pad_token_id=0)


def test_layers_can_lose_every_neuron():
    model = build_tiny_model("bert")
    adapter = adapter_for(model.config)
    shapes = model_shapes(adapter, model.base_model)
    attn_only = [(s.n_heads, 0) for s in shapes]
    dense = [(s.n_heads, s.ffn_width) for s in shapes]
    budget = total_cost(shapes, attn_only, "flops", 128) / total_cost(shapes, dense, "flops", 128)
    pruned, report = _compress(model, keep_flops=budget, prune=("neurons",))
    assert all(not lr.neurons_kept for lr in report.layers)
    assert torch.isfinite(_output(pruned, _inputs("bert"))).all()


def test_padding_never_enters_the_statistics():
    model = build_tiny_model("bert")
    texts = tiny_texts(120)
    padded = tokenize_examples(TOKENIZER, texts, batch_size=16)
    single = tokenize_examples(TOKENIZER, texts, batch_size=1)
    # garbage in the padded positions must not matter
    for batch in padded:
        ids = batch.inputs["input_ids"]
        ids[~batch.token_mask] = 7
    _, rep_a = statprune.compress(model, data=padded, keep_flops=0.5, progress=False)
    _, rep_b = statprune.compress(model, data=single, keep_flops=0.5, progress=False)
    assert rep_a.calibration_tokens == rep_b.calibration_tokens
    assert [lr.neurons_kept for lr in rep_a.layers] == [lr.neurons_kept for lr in rep_b.layers]
    assert [lr.heads_kept for lr in rep_a.layers] == [lr.heads_kept for lr in rep_b.layers]


def test_tokenized_batches_are_accepted():
    model = build_tiny_model("llama")
    ids = torch.randint(4, 19, (40, 20))
    batches = batches_from_tensors(ids, batch_size=8)
    _pruned, report = statprune.compress(model, data=batches, keep_params=0.6, progress=False)
    assert report.calibration_tokens == 800
    assert report.params_kept <= 0.6


@pytest.mark.parametrize("activations", ["sequential", "original"])
@pytest.mark.parametrize("bias_compensation", [True, False])
def test_options_run_and_are_recorded(activations, bias_compensation):
    model = build_tiny_model("bert")
    _, report = _compress(model, keep_flops=0.6, activations=activations, bias_compensation=bias_compensation)
    assert report.options["activations"] == activations
    assert report.options["bias_compensation"] is bias_compensation
    if activations == "sequential":
        assert all(0.0 <= lr.output_error < 1.0 for lr in report.layers)
    else:  # the analysis statistics are reused: no second pass, so no measured output error
        assert all(lr.output_error is None for lr in report.layers)


@pytest.mark.parametrize(("family", "resolved"), [("bert", "original"), ("llama", "sequential")])
def test_auto_activations_are_sequential_for_decoders_original_for_encoders(family, resolved):
    _, report = _compress(build_tiny_model(family), keep_flops=0.7)
    assert report.options["activations"] == resolved
    _, explicit = _compress(build_tiny_model(family), keep_flops=0.7, activations=resolved)
    assert [lr.neurons_kept for lr in report.layers] == [lr.neurons_kept for lr in explicit.layers]


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_original_activations_reuse_equals_recomputation(tmp_path):
    """Reusing the analysis statistics gives the same model as collecting them again (which a
    checkpointed run does), while running no layer a second time."""
    model = build_tiny_model("bert")
    calls = []
    layer = adapter_for(model.config).layers(model.base_model)[1]
    handle = layer.register_forward_hook(lambda *a: calls.append(1))
    reused, _ = _compress(model, keep_flops=0.6, activations="original")
    runs_reused = len(calls)
    calls.clear()
    recomputed, _ = _compress(model, keep_flops=0.6, activations="original", checkpoint_dir=str(tmp_path))
    handle.remove()
    assert len(calls) > runs_reused > 0  # the reused run saw layer 1 only in its analysis pass
    a, b = _state(reused), _state(recomputed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


@pytest.mark.parametrize("activations", ["sequential", "original"])
def test_analysis_cache_reuses_the_analysis_across_budgets(activations):
    model = build_tiny_model("llama")
    cache = statprune.AnalysisCache()
    calls = []
    layer = adapter_for(model.config).layers(model.base_model)[0]
    handle = layer.register_forward_hook(lambda *a: calls.append(1))
    _compress(model, keep_flops=0.8, activations=activations, cache=cache)
    first = len(calls)
    calls.clear()
    cached, cached_report = _compress(model, keep_flops=0.5, activations=activations, cache=cache)
    second = len(calls)
    handle.remove()
    fresh, fresh_report = _compress(model, keep_flops=0.5, activations=activations)
    assert second < first  # the analysis pass was not run again
    assert [lr.neurons_kept for lr in cached_report.layers] == [lr.neurons_kept for lr in fresh_report.layers]
    a, b = _state(cached), _state(fresh)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    # another option (or another model) is a different analysis
    _, other = _compress(model, keep_flops=0.5, activations=activations, bias_compensation=False, cache=cache)
    assert other.options["bias_compensation"] is False


def test_correction_target_on_unpruned_inputs_is_the_interpolative_correction():
    # one layer: its inputs are the original ones, so each block's target is its own output
    model = build_tiny_model("llama", num_hidden_layers=1)
    plain, _ = _compress(model, keep_params=0.5, activations="sequential")
    fitted, report = _compress(model, keep_params=0.5, activations="sequential", correction_target="original")
    assert report.options["correction_target"] == "original"
    a, b = _state(plain), _state(fitted)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def _down_proj_io(model, batches):
    """The last layer's FFN activations (down projection input) and output on the real tokens."""
    down = adapter_for(model.config).layers(model.base_model)[-1].mlp.down_proj
    seen = {"in": [], "out": []}

    def record(module, args, out):
        seen["in"].append(args[0])
        seen["out"].append(out)

    handle = down.register_forward_hook(record)
    with torch.no_grad():
        for batch in batches:
            model(**batch.inputs)
    handle.remove()
    mask = torch.cat([b.token_mask.reshape(-1) for b in batches])
    return [torch.cat([t.reshape(-1, t.shape[-1]) for t in seen[k]])[mask].double() for k in ("in", "out")]


def test_original_target_fits_the_original_block_output_from_the_pruned_activations():
    """Neurons only, so the last FFN's statistics are exact: its refitted down projection is the
    least-squares map (with intercept) from the pruned model's kept activations to the original
    model's FFN output on the calibration tokens."""
    model = build_tiny_model("llama", num_hidden_layers=3, intermediate_size=96)
    enc = TOKENIZER(tiny_texts(200), return_tensors="pt", padding=True)
    batches = batches_from_tensors(enc["input_ids"], enc["attention_mask"])
    _, target = _down_proj_io(model, batches)
    pruned, _ = statprune.compress(
        model,
        data=batches,
        keep_params=0.5,
        prune=("neurons",),
        progress=False,
        correction_target="original",
        gram_dtype="float64",
    )
    kept, _ = _down_proj_io(pruned, batches)
    design = torch.cat([kept, torch.ones(kept.shape[0], 1, dtype=kept.dtype)], dim=1)
    solution = torch.linalg.lstsq(design, target).solution.T
    down = adapter_for(pruned.config).layers(pruned.base_model)[-1].mlp.down_proj
    torch.testing.assert_close(down.weight.double(), solution[:, :-1], rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(down.bias.double(), solution[:, -1], rtol=1e-3, atol=1e-4)


def test_correction_target_needs_sequential_activations():
    with pytest.raises(statprune.StatpruneError, match="sequential"):
        _compress(
            build_tiny_model("llama"), keep_params=0.5, activations="original", correction_target="original"
        )
    with pytest.raises(statprune.StatpruneError, match="correction target"):
        _compress(build_tiny_model("llama"), keep_params=0.5, correction_target="dense")


def test_uniform_allocation_keeps_equal_fractions():
    model = build_tiny_model("bert", num_hidden_layers=3)
    _, report = _compress(model, keep_flops=0.85, allocation="uniform", prune=("neurons",))
    assert len({len(lr.neurons_kept) for lr in report.layers}) == 1


def test_round_to_gives_multiples():
    model = build_tiny_model("llama")
    _, report = _compress(model, keep_flops=0.6, round_to=8)
    assert all(len(lr.neurons_kept) % 8 == 0 for lr in report.layers)


def test_bad_budgets_are_rejected():
    model = build_tiny_model("bert")
    for kwargs in ({"keep_flops": 0.0}, {"keep_flops": 1.5}, {}, {"keep_flops": 0.5, "keep_params": 0.5}):
        with pytest.raises(statprune.StatpruneError):
            _compress(model, **kwargs)
    with pytest.raises(statprune.StatpruneError, match="every head and neuron"):
        _compress(model, keep_flops=1e-4)
    with pytest.raises(statprune.StatpruneError, match="still keeps"):
        _compress(model, keep_flops=0.1, prune=("heads",))


@pytest.mark.parametrize("weighting", ["residual", "gradient"])  # auto differs: offload -> residual
def test_offloading_layers_gives_identical_results(weighting):
    model = build_tiny_model("llama")
    a, rep_a = _compress(model, keep_flops=0.5, layer_weighting=weighting)
    b, rep_b = _compress(model, keep_flops=0.5, offload=True, layer_weighting=weighting)
    assert rep_a.options["error_metric"] == rep_b.options["error_metric"]
    assert [lr.heads_kept for lr in rep_a.layers] == [lr.heads_kept for lr in rep_b.layers]
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    assert set(rep_b.stage_seconds) == {"capture", "analyse", "allocate", "prune"}


def _spike_first_token(layer, size=1e4):
    """Add a huge constant to the first token's output of ``layer``: an LLM's "massive activation"."""

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        hidden[:, 0, :] += size
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return layer.register_forward_hook(hook)


@pytest.mark.parametrize("rule", ["residual", "residual-mean"])
def test_layer_weighting_median_ignores_massive_activation_tokens(rule):
    """One token with 10⁸× the energy from layer 1 on leaves the median rule's allocation where it
    was; the mean rule then sees layers 2-3 as nearly free and prunes them far more."""
    model = build_tiny_model("llama", num_hidden_layers=4)
    _, plain = _compress(model, keep_params=0.6, layer_weighting=rule, activations="original")
    handle = _spike_first_token(adapter_for(model.config).layers(model.base_model)[1])
    try:
        _, spiked = _compress(model, keep_params=0.6, layer_weighting=rule, activations="original")
    finally:
        handle.remove()

    def late_kept(report):  # neurons kept in the layers after the spike
        return sum(len(lr.neurons_kept) for lr in report.layers[2:])

    if rule == "residual":
        assert abs(late_kept(spiked) - late_kept(plain)) <= 0.1 * late_kept(plain)
    else:
        assert late_kept(spiked) < 0.5 * late_kept(plain)
