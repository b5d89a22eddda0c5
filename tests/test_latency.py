"""Latency budgets: the lookup-table fit, the allocation under a latency cost model, the JSON
cache and its key, the measurement on tiny models and the bad inputs. No timing assertions
(speed targets live in benchmarks/latency_budget.py): timed values are only checked for shape."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import re

import pytest
import torch
from conftest import _build_tiny_tokenizer, build_tiny_model, tiny_texts

import statprune
from statprune import latency
from statprune.allocation import allocate, check_reachable, curve_from_errors
from statprune.errors import BudgetError, OptionsError, StatpruneError
from statprune.flops import LayerShape
from statprune.latency import (
    BlockTable,
    LatencyCost,
    LatencyTable,
    LayerTable,
    fit_block,
    grid,
    load_cached,
    save_cached,
)

SHAPE = LayerShape(
    hidden=32,
    n_heads=4,
    n_kv_heads=4,
    head_dim=8,
    ffn_width=64,
    gated=False,
    qkv_bias=True,
    o_bias=True,
    ffn_in_bias=True,
    ffn_out_bias=True,
)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test gets its own latency cache folder."""
    monkeypatch.setenv("STATPRUNE_CACHE", str(tmp_path / "cache"))


# ----------------------------------------------------------------------------------- the fit


def test_fit_interpolates_exactly_at_grid_points_and_monotonically_between():
    widths, ms = [0, 16, 32, 48, 64], [0.0, 0.5, 2.0, 2.25, 4.0]
    table = fit_block(widths, ms)
    assert [table(w) for w in widths] == ms
    values = [table(w) for w in range(0, 65)]
    assert all(b >= a for a, b in itertools.pairwise(values))
    assert table(8) == pytest.approx(0.25) and table(40) == pytest.approx(2.125)  # linear inside


def test_fit_makes_noisy_measurements_non_decreasing():
    table = fit_block([32, 0, 64, 16], [1.0, 0.0, 3.0, 1.5])  # unsorted; 16 slower than 32 (noise)
    assert table.widths == (0, 16, 32, 64)
    assert table.ms == (0.0, 1.5, 1.5, 3.0)


def test_grid_spans_zero_to_full_width_on_multiples_of_the_step():
    assert grid(64, 1, 5) == [0, 16, 32, 48, 64]
    heads = grid(12, 2, 5)
    assert heads[0] == 0 and heads[-1] == 12 and all(h % 2 == 0 for h in heads)
    assert grid(3, 1, 5) == [0, 1, 2, 3]


def test_the_unaligned_probe_sits_between_the_last_grid_points_off_the_alignment():
    neuron_grid = grid(3072, latency.ALIGN, 5)
    assert all(n % latency.ALIGN == 0 for n in neuron_grid)
    probe = latency.unaligned_probe(neuron_grid)
    assert neuron_grid[-2] < probe < neuron_grid[-1] and probe % latency.ALIGN
    assert latency.unaligned_probe([0, 1, 2, 3]) is None  # too fine to hold one


def test_unaligned_ffn_widths_are_priced_by_the_measured_factor_and_allocation_avoids_them():
    table = synthetic_table(attention_ms=1.0, ffn_ms=3.0)
    layer = table.layers[0]
    layer.unaligned = 1.2
    assert layer.cost(4, 40) == pytest.approx(layer.base + 1.0 + 3.0 * 40 / 64)  # 40: a multiple of 8
    assert layer.cost(4, 41) == pytest.approx(layer.base + 1.0 + 1.2 * 3.0 * 41 / 64)
    assert layer.cost(4, 41) > layer.cost(4, 48)  # dearer than the aligned width above it
    model = LatencyCost(table)
    for keep in (0.9, 0.7, 0.5):
        counts = allocate_under(table, keep)
        assert all(n % latency.ALIGN == 0 for _, n in counts), counts
        assert model.total([SHAPE] * 2, counts) <= keep * table.dense_ms + 1e-9


# ------------------------------------------------------------------------------ allocation


def synthetic_table(attention_ms: float, ffn_ms: float, base: float = 0.5, rest: float = 1.0, layers=2):
    """A latency table over SHAPE: attention and FFN linear in the width up to the given ms."""
    layer = LayerTable(
        SHAPE,
        base,
        BlockTable((0, 4), (0.0, attention_ms)),
        BlockTable((0, 64), (0.0, ffn_ms)),
    )
    dense = rest + layers * (base + attention_ms + ffn_ms)
    return LatencyTable(key={"batch": 2, "seq_len": 8}, layers=[layer], dense_ms=dense, rest=rest)


def curves_with_equal_error_per_unit(layers=2):
    """Removing any head or any neuron adds the same error (1 per unit)."""
    cost = None
    curves = []
    for i in range(layers):
        heads = torch.arange(4, -1, -1, dtype=torch.float64)  # errors[c] = 4 - c
        neurons = torch.arange(64, -1, -1, dtype=torch.float64)
        curves.append((i, "heads", heads))
        curves.append((i, "neurons", neurons))
    return curves, cost


def allocate_under(table, keep, layers=2):
    model = LatencyCost(table)
    curves = [
        curve_from_errors(i, kind, SHAPE, errors, 1.0, model, 8)
        for i, kind, errors in curves_with_equal_error_per_unit(layers)[0]
    ]
    return allocate([SHAPE] * layers, curves, model, keep, 8)


def test_latency_allocation_removes_the_costly_block_first():
    # heads nearly free, neurons costly: the same error buys far more latency in the FFN
    counts = allocate_under(synthetic_table(attention_ms=0.01, ffn_ms=4.0), keep=0.6)
    assert all(h == 4 for h, _ in counts)
    assert all(n < 64 for _, n in counts)
    # and the other way round
    counts = allocate_under(synthetic_table(attention_ms=4.0, ffn_ms=0.01), keep=0.6)
    assert all(n == 64 for _, n in counts)
    assert all(h < 4 for h, _ in counts)


def test_latency_allocation_meets_the_budget_under_the_cost_model():
    table = synthetic_table(attention_ms=1.0, ffn_ms=3.0)
    model = LatencyCost(table)
    for keep in (0.9, 0.7, 0.5):
        counts = allocate_under(table, keep)
        assert model.total([SHAPE] * 2, counts) <= keep * table.dense_ms + 1e-9


def test_latency_budget_below_the_floor_names_the_reachable_floor():
    table = synthetic_table(attention_ms=1.0, ffn_ms=3.0, base=0.5, rest=1.0)
    floor = (1.0 + 2 * 0.5) / table.dense_ms  # everything but the embeddings/base removed
    message = (
        rf"keep_latency=0\.15 is below what can be reached: removing every attention head and FFN "
        rf"neuron still keeps {floor:.1%} of the dense model's latency \(2\.0 of 10\.0 ms by the lookup "
        rf"tables at batch 2 x 8 tokens: embeddings, task head and each layer's norms and residuals\); the "
        rf"smallest reachable budget is {floor:.1%}: give keep_latency=0\.2 or more$"
    )
    with pytest.raises(BudgetError, match=message):
        allocate_under(table, keep=floor - 0.05)
    # the same floor from the shapes alone (before any calibration), and the same message
    with pytest.raises(BudgetError, match=message):
        check_reachable([SHAPE] * 2, LatencyCost(table), floor - 0.05, 8, ("heads", "neurons"))
    assert check_reachable([SHAPE] * 2, LatencyCost(table), floor + 0.02, 8, ("heads", "neurons")) == floor
    allocate_under(table, keep=floor + 0.02)  # just above: fine


def test_floor_messages_are_exact_for_tiny_floors_and_restricted_pruning():
    """The reachable floor is printed with the digits that tell it apart (never "0% ... 0.0%"),
    with the smallest budget to give and the other way out (--prune, --no-bias-compensation)."""
    from statprune.allocation import floor_error, share, smallest_budget
    from statprune.guards import cli_option_names

    assert [share(x) for x in (0.632, 0.0569, 0.0069, 0.00031, 0.0)] == [
        "63.2%",
        "5.69%",
        "0.69%",
        "0.031%",
        "0%",
    ]
    assert [smallest_budget(x) for x in (0.632, 0.25, 0.00691, 0.00031)] == [0.64, 0.25, 0.007, 0.00031]
    with cli_option_names():
        heads_only = str(floor_error("flops", 0.1, 0.632, {"heads"}))
        biases = str(floor_error("params", 0.005, 0.0069, {"heads", "neurons"}, reserve=0.0069))
    assert heads_only == (
        "--keep-flops 0.1 is below what can be reached: removing every attention head (the FFN "
        "neurons stay) still keeps 63.2% of the dense model's attention+FFN FLOPs; the smallest "
        "reachable budget is 63.2%: give --keep-flops 0.64 or more, or let neurons go too with "
        "--prune heads,neurons"
    )
    assert biases == (
        "--keep-params 0.005 is below what can be reached: removing every attention head and FFN "
        "neuron still keeps 0% of the dense model's attention+FFN parameters, and bias compensation "
        "adds 0.69% (a bias for each pruned block without one); the smallest reachable budget is "
        "0.69%: give --keep-params 0.0069 or more, or --no-bias-compensation"
    )


def test_impossible_budgets_fail_before_any_calibration(monkeypatch):
    """Heads-only FLOPs budgets below the FFNs' share, params budgets below the biases bias
    compensation adds (a Llama has none to reuse) and latency budgets below the embeddings-only
    floor are refused from the shapes (and the lookup table) before the layer inputs are captured."""
    from statprune.allocation import share
    from statprune.flops import dense_counts, model_shapes, total_cost
    from statprune.pipeline import stages

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibration started before the budget was checked")

    monkeypatch.setattr(stages, "capture_inputs", no_calibration)
    tokenize = stages.prepare_calibration
    monkeypatch.setattr(stages, "prepare_calibration", no_calibration)  # FLOPs/params: not even tokenized
    monkeypatch.setattr(latency, "measure_table", synthetic_measure)
    tokenizer, texts = _build_tiny_tokenizer(), tiny_texts(80)
    bert = build_tiny_model("bert")
    shapes = model_shapes(statprune.adapters.adapter_for(bert.config), bert.base_model)
    ffn = total_cost(shapes, [(0, s.ffn_width) for s in shapes], "flops", 128)
    floor = ffn / total_cost(shapes, dense_counts(shapes), "flops", 128)
    with pytest.raises(
        BudgetError, match=rf"still keeps {re.escape(share(floor))} of the dense model's attention"
    ):
        statprune.compress(bert, tokenizer, texts, keep_flops=floor - 0.01, prune=("heads",), progress=False)
    with pytest.raises(BudgetError, match=r"bias compensation adds .* bias_compensation=False$"):
        statprune.compress(build_tiny_model("llama"), tokenizer, texts, keep_params=0.001, progress=False)
    monkeypatch.setattr(stages, "prepare_calibration", tokenize)  # latency: the tables come first
    kwargs = {"samples": 64, "progress": False, "bench_batch": 2, "bench_seq_len": 8}
    with pytest.raises(
        BudgetError,
        match=r"keep_latency=0\.05 is below .* \(0\.4 of 6\.4 ms by the lookup tables at batch 2 x 8 "
        r"tokens on cpu: embeddings",
    ):
        statprune.compress(bert, tokenizer, texts, keep_latency=0.05, **kwargs)
    # a second time the table comes from the cache: the message names the file to delete
    with pytest.raises(BudgetError) as info:
        statprune.compress(bert, tokenizer, texts, keep_latency=0.05, **kwargs)
    assert re.search(
        r"; cached in \S+\.json: delete it to measure again if this machine's load", str(info.value)
    )


def test_flops_accounting_prices_blocks_as_before():
    curve = curve_from_errors(0, "neurons", SHAPE, torch.zeros(65), 1.0, "flops", 8)
    assert curve.costs[-1] == SHAPE.cost(0, 64, "flops", 8) - SHAPE.cost(0, 0, "flops", 8)


# ----------------------------------------------------------------------------------- cache


def test_cache_round_trip_and_invalidation(tmp_path):
    table = synthetic_table(1.0, 3.0)
    table.key = {"config": {"hidden_size": 32}, "batch": 2, "seq_len": 8, "torch": torch.__version__}
    path = save_cached(table, tmp_path)
    assert path is not None and json.loads(path.read_text())["format"] == latency.FORMAT  # plain JSON
    loaded = load_cached(table.key, tmp_path)
    assert loaded is not None and loaded.source == "cache"
    assert loaded.to_dict() == table.to_dict()
    assert loaded.layer(SHAPE).cost(4, 64) == table.layer(SHAPE).cost(4, 64)
    for change in ({"batch": 4}, {"seq_len": 16}, {"torch": "0.0"}, {"config": {"hidden_size": 64}}):
        assert load_cached(table.key | change, tmp_path) is None
    path.write_text("{not json")
    assert load_cached(table.key, tmp_path) is None


def test_table_key_depends_on_shape_batch_seq_len_and_device():
    model = build_tiny_model("bert")
    key = latency.table_key(model, device="cpu", backend="torch", batch=2, seq_len=8, kind="forward")
    assert key["torch"] == torch.__version__ and key["backend"] == "torch"
    other = build_tiny_model("bert", intermediate_size=48)
    assert latency.key_hash(key) != latency.key_hash(
        latency.table_key(other, device="cpu", backend="torch", batch=2, seq_len=8, kind="forward")
    )
    for change in ({"batch": 4}, {"seq_len": 16}, {"device": "cuda"}):
        kwargs = {"device": "cpu", "backend": "torch", "batch": 2, "seq_len": 8, "kind": "forward"} | change
        assert latency.key_hash(latency.table_key(model, **kwargs)) != latency.key_hash(key)


# ------------------------------------------------------------------------------- measuring


@pytest.mark.parametrize("family", ["bert", "mpnet", "llama"])
def test_measured_table_covers_every_width_with_the_real_layers(family, tmp_path):
    from statprune.adapters import adapter_for
    from statprune.flops import model_shapes

    model = build_tiny_model(family)
    adapter = adapter_for(model.config)
    shapes = model_shapes(adapter, model.base_model)
    table = latency.latency_table(model, adapter, shapes, batch=2, seq_len=8, directory=tmp_path)
    assert table.source == "measured" and len(table.layers) == 1  # both layers share one shape
    layer = table.layers[0]
    assert layer.attention.widths[0] == 0 and layer.attention.widths[-1] == shapes[0].n_heads
    assert layer.ffn.widths[-1] == shapes[0].ffn_width and layer.unaligned >= 1.0
    for block in (layer.attention, layer.ffn):
        assert block.ms[0] == 0.0 and list(block.ms) == sorted(block.ms)
    assert table.dense_ms > 0 and table.rest >= 0
    again = latency.latency_table(model, adapter, shapes, batch=2, seq_len=8, directory=tmp_path)
    assert again.source == "cache" and again.to_dict()["layers"] == table.to_dict()["layers"]


def test_layer_variant_has_the_asked_widths():
    from statprune.adapters import adapter_for

    model = build_tiny_model("llama")  # grouped-query attention: 4 query heads in 2 groups
    adapter = adapter_for(model.config)
    layer = adapter.layers(model.base_model)[0]
    cut = latency.layer_variant(adapter, layer, heads=2, neurons=16)
    assert adapter.attention(cut).n_heads == 2 and adapter.ffn(cut).width == 16
    assert adapter.attention(layer).n_heads == 4  # the model's own layer is untouched


def synthetic_measure(model, adapter, shapes, **_):
    """A fixed table for the tiny models' shape (their real timings are overhead and noise; the
    measurement itself is tested above)."""
    layer = LayerTable(shapes[0], 0.1, BlockTable((0, 4), (0.0, 1.0)), BlockTable((0, 64), (0.0, 2.0)))
    return LatencyTable(key={}, layers=[layer], dense_ms=6.4, rest=0.2)


def test_compress_to_a_latency_budget_reports_predicted_and_measured(monkeypatch):
    monkeypatch.setattr(latency, "measure_table", synthetic_measure)
    model, tokenizer = build_tiny_model("bert"), _build_tiny_tokenizer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _pruned, report = statprune.compress(
        model,
        tokenizer,
        tiny_texts(80),
        keep_latency=0.8,
        samples=64,
        progress=False,
        bench_batch=2,
        bench_seq_len=8,
    )
    lat = report.latency
    assert report.budget_kind == "latency" and lat["kind"] == "forward"
    assert lat["batch"] == 2 and lat["seq_len"] == 8
    assert lat["predicted_fraction"] <= 0.8 + 1e-9
    assert lat["floor_fraction"] < 0.8
    assert lat["measured_ms"] > 0 and math.isfinite(lat["measured_fraction"])
    assert report.options["bench_batch"] == 2 and "keep_latency" not in report.options
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input unchanged
    assert "latency" in report.summary()
    flops = statprune.compress(model, tokenizer, tiny_texts(80), keep_flops=0.8, samples=64, progress=False)[
        1
    ]
    assert "latency" not in flops.to_dict() and "bench_batch" not in flops.options


def test_latency_budget_bad_inputs_are_one_line_errors(monkeypatch):
    model, tokenizer = build_tiny_model("bert"), _build_tiny_tokenizer()
    kwargs = {"samples": 64, "progress": False, "bench_batch": 2, "bench_seq_len": 8}
    # real timings of a tiny model: mostly overhead, so its floor may be the whole latency
    with pytest.raises(BudgetError, match=r"smallest reachable budget|no budget below the dense model"):
        statprune.compress(model, tokenizer, tiny_texts(80), keep_latency=0.01, **kwargs)
    with pytest.raises(BudgetError, match="exactly one budget"):
        statprune.compress(model, tokenizer, tiny_texts(80), keep_latency=0.5, keep_flops=0.5, **kwargs)
    with pytest.raises(OptionsError, match="fisher"):
        statprune.compress(model, tokenizer, tiny_texts(80), keep_latency=0.5, method="fisher", **kwargs)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a)
    )
    with pytest.raises(StatpruneError, match=r"needs the onnxruntime package: pip install") as caught:
        statprune.compress(
            model, tokenizer, tiny_texts(80), keep_latency=0.5, backend="onnxruntime", **kwargs
        )
    assert "\n" not in str(caught.value)


def test_cli_latency_budget_errors(tmp_path, tiny_model_dir, calib_file, capsys, monkeypatch):
    from statprune.cli import main

    model, calib = tiny_model_dir("bert"), calib_file(80)
    base = [
        "compress",
        str(model),
        "--data",
        str(calib),
        "--out",
        str(tmp_path / "out"),
        "--samples",
        "64",
        "--bench-batch",
        "2",
        "--bench-seq-len",
        "8",
        "--quiet",
    ]
    assert main([*base, "--keep-latency", "0.01"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --keep-latency 0.01 is below what can be reached")
    # the tiny model's real timings are mostly overhead: its floor may be the whole latency
    reachable = "the smallest reachable budget is" in err[-1] and "give --keep-latency " in err[-1]
    assert reachable or err[-1].endswith("no budget below the dense model can be met")
    assert not (tmp_path / "out").exists()
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a)
    )
    assert main([*base, "--keep-latency", "0.5", "--backend", "onnxruntime"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "onnxruntime package" in err[0]


def test_a_table_that_mispredicts_this_machine_is_flagged():
    """A cached table measured under other load predicts 50 % but the model measures 8 %: a
    warning that names the table and what to do, also kept in the report's notes."""
    import warnings

    from statprune.latency import LatencyReport, LatencyWarning, _check_prediction

    def report(measured):
        return LatencyReport(
            "torch",
            "cpu",
            32,
            128,
            "forward",
            100.0,
            50.0,
            0.5,
            0.1,
            "t.json",
            "cache",
            measured_fraction=measured,
        )

    far = report(0.08)
    with pytest.warns(
        LatencyWarning,
        match=r"measured latency is 8% of dense but the cache table t.json "
        r"predicted 50%.*delete it and rerun",
    ):
        _check_prediction(far)
    assert any("delete it" in n for n in far.notes)
    close = report(0.55)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_prediction(close)
    assert close.notes == []
