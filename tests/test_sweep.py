"""``statprune sweep``: results, table, plot, the --min-quality selection and --save-best.

One small sweep (tiny BERT classifier, 2 budgets x 2 methods) is shared by the output tests; the
selection rule is unit-tested on synthetic rows.
"""

from __future__ import annotations

import argparse
import json
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import _build_tiny_tokenizer, build_tiny_model, tiny_texts

import statprune
from statprune import sweep as sweep_module
from statprune.calibration import CalibrationWarning
from statprune.errors import BudgetError, OutputError
from statprune.sweep import (
    SweepRow,
    add_sweep_parser,
    meets,
    parse_budgets,
    parse_methods,
    parse_min_quality,
    run_sweep,
    select_best,
    sweep,
)

ROW_KEYS = {
    "model",
    "task",
    "method",
    "budget_kind",
    "budget",
    "achieved",
    "metric",
    "value",
    "dense_value",
    "seconds",
    "agreement",
    "kl",
    "perplexity_ratio",
}
BUDGETS = [0.8, 0.5]
METHODS = ["stat", "magnitude"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny BERT classifier folder, calibration texts, and labelled evaluation JSONL whose labels
    are the dense model's own predictions (so the dense accuracy is 1)."""
    import torch

    root = tmp_path_factory.mktemp("sweep")
    # larger random weights than the default, so that pruning visibly changes predictions
    model, tokenizer = build_tiny_model("bert", initializer_range=0.3), _build_tiny_tokenizer()
    model_dir = root / "tinybert"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    calib = root / "calib.txt"
    calib.write_text("\n".join(tiny_texts(60)) + "\n")
    texts = tiny_texts(24, seed=1)
    with torch.no_grad():
        labels = [int(model(**tokenizer(t, return_tensors="pt")).logits.argmax()) for t in texts]
    data = root / "eval.jsonl"
    records = [json.dumps({"text": t, "label": y}) for t, y in zip(texts, labels, strict=True)]
    data.write_text("\n".join(records) + "\n")
    return SimpleNamespace(root=root, model=model_dir, calib=calib, eval=data)


@pytest.fixture(scope="module")
def swept(assets):
    """The shared sweep through the Python API; ``--min-quality 0`` so every run qualifies."""
    out = assets.root / "out"
    lines: list[str] = []
    result = sweep_on(
        assets,
        budgets=BUDGETS,
        methods=METHODS,
        min_quality="0",
        save_best=True,
        out=out,
        log=lines.append,
    )
    return SimpleNamespace(result=result, out=out, lines=lines)


def sweep_on(assets, **settings):
    """``sweep`` of the shared tiny classifier on its data (60 calibration examples unless given)."""
    return sweep(assets.model, assets.calib, assets.eval, **{"samples": 60, **settings})


def cli(*argv) -> int:
    parser = argparse.ArgumentParser(prog="statprune")
    add_sweep_parser(parser.add_subparsers(dest="command", required=True))
    return run_sweep(parser.parse_args(["sweep", *map(str, argv)]))


def cli_on(assets, *argv) -> int:
    """``statprune sweep`` of the shared tiny classifier on its data, with ``argv``."""
    return cli(assets.model, "--data", assets.calib, "--eval", assets.eval, *argv)


# ------------------------------------------------------------------------------------- outputs


def test_results_json_rows_are_sane(swept):
    rows = json.loads((swept.out / "results.json").read_text())
    assert len(rows) == len(BUDGETS) * len(METHODS)
    assert {(r["method"], r["budget"]) for r in rows} == {(m, b) for m in METHODS for b in BUDGETS}
    for row in rows:
        assert set(row) >= ROW_KEYS
        assert row["model"] == "tinybert" and row["task"] == "classify"
        assert row["metric"] == "accuracy" and row["budget_kind"] == "flops"
        assert 0 < row["achieved"] <= row["budget"] + 1e-9
        assert row["achieved"] == row["flops_kept"]
        assert 0.0 <= row["value"] <= 1.0 and 0.0 <= row["agreement"] <= 1.0
        assert row["kl"] >= 0 and row["seconds"] > 0 and row["error"] is None
        assert row["perplexity_ratio"] is None
    assert {r["dense_value"] for r in rows} == {swept.result.dense_value}
    assert swept.result.dense_value == pytest.approx(1.0)  # labels are the dense predictions
    # accuracy against the dense predictions is the agreement with the dense model
    assert all(r["value"] == pytest.approx(r["agreement"]) for r in rows)


def test_progress_line_per_run(swept):
    runs = [line for line in swept.lines if line.startswith("[")]
    assert len(runs) == len(BUDGETS) * len(METHODS)
    assert runs[0].startswith("[1/4] stat") and "accuracy" in runs[0] and "kept" in runs[0]
    assert swept.lines[0].startswith("dense: accuracy 1.0000")
    assert swept.lines[-1].startswith("best: ")


def test_results_markdown_has_protocol_and_table(swept):
    text = (swept.out / "results.md").read_text()
    protocol = next(line for line in text.splitlines() if line.startswith("Protocol:"))
    for fragment in (
        "`tinybert`",
        "60 of 60 examples",
        "seq len 128",
        "24 examples",
        "accuracy",
        "budget kind: flops",
        "attention+FFN FLOPs",
    ):
        assert fragment in protocol, fragment
    assert "| keep FLOPs | stat | magnitude |" in text
    assert "| dense (100%) | 1.0000 | 1.0000 |" in text
    for budget in ("| 80% |", "| 50% |"):
        assert budget in text
    assert "Top-1 agreement with the dense model" in text
    best = swept.result.selection.best
    line = next(x for x in text.splitlines() if x.startswith(f"| {best.budget * 100:g}% |"))
    assert f"**{best.value:.4f} ({best.achieved:.1%})**" in line  # the selected cell is bold
    assert "Selection (`--min-quality 0`" in text


def test_plot_is_a_png(swept):
    from PIL import Image

    path = swept.out / "plot.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.size[0] >= 600 and image.size[1] >= 400


def test_best_is_smallest_and_saved_folder_loads(swept, assets):
    rows = swept.result.rows
    best = json.loads((swept.out / "best.json").read_text())
    smallest = min(r.achieved for r in rows)
    assert best["best"]["achieved"] == smallest and best["closest"] is None
    assert best["saved"] == "best" and best["saved_achieved"] == pytest.approx(smallest)
    assert best["command"].startswith("statprune compress") and "--method" in best["command"]
    model = statprune.load(swept.out / "best")
    assert type(model).__name__.endswith("BertForSequenceClassification")
    report = statprune.load_report(swept.out / "best")
    assert report.flops_kept == pytest.approx(smallest)
    assert report.options["method"] == best["best"]["method"]
    assert not [p for p in swept.out.parent.iterdir() if p.name.startswith(".out.")]  # no temp folders


def test_none_meets_the_bar_overwrite_and_cli(assets, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    code = cli_on(
        assets,
        "--budgets",
        "0.6",
        "--methods",
        "stat",
        "--samples",
        "60",
        "--min-quality",
        "100%",
        "--out",
        out,
        "--overwrite",
        "--quiet",
        "--name",
        "mine",
    )
    stdout = capsys.readouterr().out
    assert code == 0
    assert "no configuration reaches accuracy >= 1.0000 (100% of dense 1.0000); closest: stat" in stdout
    best = json.loads((out / "best.json").read_text())
    assert best["best"] is None and best["closest"]["method"] == "stat" and best["saved"] is None
    assert not (out / "old.txt").exists() and not (out / "best").exists()
    assert json.loads((out / "results.json").read_text())[0]["model"] == "mine"


def test_save_best_recompresses_large_models(assets, tmp_path, monkeypatch):
    monkeypatch.setattr(sweep_module, "KEEP_IN_MEMORY_BYTES", 0)
    lines: list[str] = []
    result = sweep_on(
        assets,
        budgets="0.7",
        methods="flap",
        min_quality="1%",
        save_best=True,
        out=tmp_path / "out",
        log=lines.append,
    )
    assert any(line.startswith("re-compressing") for line in lines)
    report = statprune.load_report(tmp_path / "out" / "best")
    assert report.flops_kept == pytest.approx(result.rows[0].achieved)
    statprune.load(tmp_path / "out" / "best")


def test_save_best_with_bench_copies_the_measured_candidate(assets, tmp_path, monkeypatch):
    """--bench saved every candidate to measure it: the best one is copied into best/, not
    compressed again (minutes to hours for an LLM)."""
    from statprune import driver

    monkeypatch.setattr(sweep_module, "KEEP_IN_MEMORY_BYTES", 0)  # as for a large model
    calls: list[str] = []
    real = driver.compress
    monkeypatch.setattr(driver, "compress", lambda *a, **k: calls.append(k["method"]) or real(*a, **k))
    out, lines = tmp_path / "out", []
    result = _bench_sweep(assets, out, lines, bench_memory=False, save_best=True)
    assert len(calls) == 2 and not any(line.startswith("re-compressing") for line in lines)
    best = result.selection.best
    report = statprune.load_report(out / "best")
    assert report.flops_kept == pytest.approx(best.achieved) and report.source_model == str(
        assets.model.resolve()
    )
    statprune.load(out / "best")


def test_a_rerun_never_loses_best_and_an_identical_one_redoes_nothing(assets, swept, tmp_path, monkeypatch):
    """best/ stays when it is still the selection (not compressed again, its files untouched, the
    report kept), and stays when a rerun selects another model without --save-best; --save-best
    replaces it, saying so."""
    import shutil

    from statprune import driver

    out = tmp_path / "out"
    shutil.copytree(swept.out, out)
    (out / "report.html").write_text("made from these results")
    weights = next((out / "best").glob("*.safetensors"))
    stamp = weights.stat().st_mtime_ns
    calls: list[str] = []
    real = driver.compress
    monkeypatch.setattr(driver, "compress", lambda *a, **k: calls.append(k["method"]) or real(*a, **k))
    common = {"budgets": BUDGETS, "methods": METHODS, "min_quality": "0", "out": out}
    lines: list[str] = []
    sweep_on(assets, **common, save_best=True, log=lines.append)  # the very same command again
    assert calls == [] and not any("re-compressing" in line for line in lines)
    assert weights.stat().st_mtime_ns == stamp and (out / "report.html").exists()
    held = statprune.load_report(out / "best")
    # another bar without --save-best: another selection, best/ kept and said so
    lines.clear()
    sweep_on(assets, **{**common, "min_quality": "100%"}, log=lines.append)
    assert any(line.startswith("kept best/ from the earlier run (") for line in lines), lines
    assert statprune.load_report(out / "best").budget == held.budget
    assert not (out / "report.html").exists()  # the selection changed: the report is stale


def test_unreachable_budget_is_recorded_as_failed(assets, tmp_path, monkeypatch):
    # heads only: the FFN FLOPs alone exceed 20 %, so that run fails while 90 % succeeds
    lines: list[str] = []
    result = sweep_on(
        assets,
        budgets=[0.9, 0.2],
        methods=["stat"],
        out=tmp_path / "out",
        log=lines.append,
        prune=("heads",),
    )
    failed = [r for r in result.rows if r.error]
    assert [r.budget for r in failed] == [0.2] and failed[0].value is None and failed[0].achieved is None
    # the floor from the model's shapes: FFN FLOPs / attention+FFN FLOPs (seq len 128)
    from statprune.allocation import share, smallest_budget
    from statprune.flops import dense_counts, model_shapes, total_cost

    model = statprune.load(assets.model)
    shapes = model_shapes(statprune.adapters.adapter_for(model.config), model.base_model)
    floor = total_cost(shapes, [(0, s.ffn_width) for s in shapes], "flops", 128) / total_cost(
        shapes, dense_counts(shapes), "flops", 128
    )
    assert failed[0].error.startswith("--budgets 0.2 is below what can be reached: removing every attention")
    assert f"still keeps {share(floor)} of the dense model's attention+FFN FLOPs" in failed[0].error
    assert f"give --budgets {smallest_budget(floor):g} or more" in failed[0].error
    assert "let neurons go too with prune=('heads', 'neurons')" in failed[0].error  # the API's spelling
    assert any("keep 0.2 flops cannot be met; it is skipped" in line for line in lines)
    assert "| 20% | failed |" in (tmp_path / "out" / "results.md").read_text()
    assert not (tmp_path / "out" / "best.json").exists()  # no --min-quality, no selection
    # every run out of reach: refused from the model's shapes, before the dense model is evaluated
    # and before any calibration
    from statprune import driver, evaluate

    def no_work(*args, **kwargs):
        raise AssertionError("the sweep evaluated or compressed before refusing the budgets")

    monkeypatch.setattr(evaluate, "evaluate", no_work)
    monkeypatch.setattr(driver, "compress", no_work)
    lines.clear()
    with pytest.raises(BudgetError, match=r"every run is out of reach; --budgets 0\.2 is below"):
        sweep_on(
            assets,
            budgets=[0.2, 0.1],
            methods=["stat", "magnitude"],
            out=tmp_path / "out2",
            log=lines.append,
            prune=("heads",),
        )
    assert not (tmp_path / "out2").exists() and not any(line.startswith("dense:") for line in lines)


# ------------------------------------------------------------------------------------- refusals


def test_existing_out_is_refused(assets, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="exists and is not empty; pass --overwrite"):
        cli_on(assets, "--out", out)
    assert (out / "keep.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--budgets", "0.9,abc"), "'abc' is not a number"),
        (("--budgets", "0.9,1.5"), "outside (0, 1]"),
        (("--methods", "stat,pruneall"), "unknown method 'pruneall'"),
        (("--min-quality", "good"), "is not a number"),
        (("--min-quality", "0%"), "above 0%"),
        (("--save-best",), "--save-best needs --min-quality"),
    ],
)
def test_bad_arguments_fail_before_any_work(assets, tmp_path, extra, message):
    out = tmp_path / "out"
    with pytest.raises(BudgetError) as info:
        cli_on(assets, "--out", out, *extra)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not out.exists()


def test_impossible_absolute_bar_is_refused(assets, tmp_path):
    with pytest.raises(BudgetError, match=r"not a possible accuracy \(0\.\.1\); did you mean 80%\?"):
        sweep_on(
            assets,
            budgets=[0.5],
            methods=["stat"],
            min_quality="80",
            out=tmp_path / "out",
            log=None,
        )
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ selection


def make_row(method: str, achieved: float, value: float | None, metric: str = "accuracy") -> SweepRow:
    return SweepRow("m", "classify", method, "flops", round(achieved, 1), achieved, metric, value, 0.9, 1.0)


def test_parse_min_quality():
    bar = parse_min_quality("0.80")
    assert (bar.value, bar.relative) == (0.80, False)
    assert bar.threshold(0.5, True) == 0.80
    bar = parse_min_quality(" 99 % ")
    assert bar.relative and bar.value == pytest.approx(0.99)
    assert bar.threshold(0.9, True) == pytest.approx(0.891)
    assert bar.threshold(20.0, False) == pytest.approx(20.0 / 0.99)  # perplexity: at most dense / 0.99
    for bad in ("abc", "nan", "inf", "-5%", "%"):
        with pytest.raises(BudgetError):
            parse_min_quality(bad)
    assert parse_min_quality("100%").value == 1.0  # no loss at all: strict, but possible


@pytest.mark.parametrize(
    ("bar", "message"),
    [
        ("150%", "--min-quality 150% asks every candidate to beat the dense model"),
        ("100.5%", "a share of the dense quality is at most 100%"),
        ("-3", "--min-quality -3 is below every metric's range"),
    ],
)
def test_impossible_bars_are_refused_when_parsed(assets, tmp_path, bar, message, monkeypatch):
    """A bar no metric can meet is refused before the model is even read, in one line."""
    with pytest.raises(BudgetError) as info:
        parse_min_quality(bar)
    assert message in str(info.value) and "\n" not in str(info.value)
    monkeypatch.setattr(sweep_module, "_read_inputs", lambda *a: pytest.fail("the sweep started reading"))
    with pytest.raises(BudgetError, match=re.escape(message)):
        cli_on(
            assets,
            "--out",
            tmp_path / "out",
            "--min-quality",
            bar,
        )
    assert not (tmp_path / "out").exists()


def test_select_absolute_prefers_smallest_across_methods():
    rows = [
        make_row("stat", 0.8, 0.88),
        make_row("stat", 0.6, 0.85),
        make_row("stat", 0.4, 0.70),
        make_row("flap", 0.5, 0.81),
        make_row("flap", 0.4, 0.60),
        make_row("magnitude", 0.3, None),
    ]
    best, _ = select_best(rows, parse_min_quality("0.80").threshold(0.9, True), True)
    assert (best.method, best.achieved) == ("flap", 0.5)
    best, _ = select_best(rows, parse_min_quality("0.84").threshold(0.9, True), True)
    assert (best.method, best.achieved) == ("stat", 0.6)


def test_select_relative_and_ties():
    rows = [make_row("magnitude", 0.6, 0.89), make_row("stat", 0.6, 0.891), make_row("flap", 0.6, 0.891)]
    threshold = parse_min_quality("99%").threshold(0.9, True)  # 0.891
    best, _ = select_best(rows, threshold, True)
    assert best.method == "stat"  # tie on size and metric: the method listed first
    best, _ = select_best(rows, threshold, True, methods=["flap", "stat"])
    assert best.method == "flap"
    rows.append(make_row("wanda-sp", 0.6, 0.895))
    assert select_best(rows, threshold, True)[0].method == "wanda-sp"  # tie on size: better metric
    assert meets(0.891, threshold, True)  # 0.9 * 0.99 is 0.8910000000000001 in floating point


def test_select_perplexity_lower_is_better():
    rows = [
        make_row("stat", 0.8, 20.1, "perplexity"),
        make_row("stat", 0.6, 20.3, "perplexity"),
        make_row("flap", 0.5, 25.0, "perplexity"),
        make_row("flap", 0.4, 19.0, "perplexity"),
    ]
    threshold = parse_min_quality("99%").threshold(20.0, False)  # at most 20.202
    best, _ = select_best(rows, threshold, False)
    assert (best.method, best.achieved) == ("flap", 0.4)
    best, _ = select_best(rows[:3], threshold, False)
    assert (best.method, best.achieved) == ("stat", 0.8)
    best, _ = select_best(rows[:3], parse_min_quality("21").threshold(20.0, False), False)
    assert best.achieved == 0.6


def test_select_none_meets_reports_closest():
    rows = [
        make_row("stat", 0.8, 0.70),
        make_row("flap", 0.5, 0.75),
        make_row("flap", 0.4, 0.75),
        make_row("stat", 0.3, None),
    ]
    best, closest = select_best(rows, 0.80, True)
    assert best is None and (closest.method, closest.achieved) == ("flap", 0.4)
    rows = [make_row("stat", 0.8, 30.0, "perplexity"), make_row("flap", 0.5, 25.0, "perplexity")]
    best, closest = select_best(rows, 20.0, False)
    assert best is None and closest.value == 25.0
    assert select_best([make_row("stat", 0.5, None)], 0.5, True) == (None, None)


def test_parse_budgets_and_methods():
    assert parse_budgets("0.5, 0.9,0.7,0.9") == [0.9, 0.7, 0.5]
    assert parse_methods("flap, stat,flap") == ["flap", "stat"]
    for bad in ("", "0", "1.01", "x"):
        with pytest.raises(BudgetError):
            parse_budgets(bad)
    with pytest.raises(BudgetError, match="choose from stat,magnitude,wanda-sp,flap"):
        parse_methods("stat,obs")


def test_results_path_types(swept):
    assert isinstance(swept.result.out, Path)
    rank = {m: i for i, m in enumerate(METHODS)}
    expected = min(swept.result.rows, key=lambda r: (r.achieved, -r.value, rank[r.method]))
    assert swept.result.selection.best is expected


def test_cli_passes_the_shared_compression_options(assets, tmp_path):
    """sweep's --prune, --round-to and --correction-ridge (defined once in statprune.options, like
    compress's) reach every run."""
    out = tmp_path / "out"
    code = cli_on(
        assets,
        "--budgets",
        "0.8",
        "--methods",
        "stat",
        "--samples",
        "60",
        "--prune",
        "neurons",
        "--round-to",
        "8",
        "--correction-ridge",
        "0.1",
        "--min-quality",
        "0",
        "--save-best",
        "--out",
        out,
        "--quiet",
    )
    assert code == 0
    row = json.loads((out / "results.json").read_text())[0]
    assert row["error"] is None and row["achieved"] <= 0.8
    report = statprune.load_report(out / "best")
    assert (report.options["prune"], report.options["round_to"]) == (["neurons"], 8)
    assert report.options["correction_ridge"] == 0.1
    assert all(len(lr.heads_kept) == lr.heads_total for lr in report.layers)
    assert all(len(lr.neurons_kept) % 8 == 0 for lr in report.layers)


def test_bad_compression_options_fail_before_any_work(assets, tmp_path):
    with pytest.raises(BudgetError, match="layer weighting"):  # an OptionsError
        sweep_on(
            assets,
            budgets=[0.8],
            methods=["stat"],
            out=tmp_path / "out",
            log=None,
            layer_weighting="loudest",
        )
    with pytest.raises(BudgetError, match="unknown option"):
        sweep_on(
            assets,
            budgets=[0.8],
            methods=["stat"],
            out=tmp_path / "out",
            log=None,
            keep_everything=True,
        )
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------- --bench, --objective


@pytest.fixture(scope="module")
def benched(assets, tmp_path_factory):
    """A latency-budget sweep measured with --bench (no peak memory: a child process per model).
    The latency lookup table is a synthetic one (a tiny model's timings are all overhead and
    noise; the measured tables are tested in test_latency.py)."""
    from statprune import latency

    def synthetic(model, adapter, shapes, **_):
        layer = latency.LayerTable(
            shapes[0], 0.1, latency.BlockTable((0, 4), (0.0, 1.0)), latency.BlockTable((0, 64), (0.0, 2.0))
        )
        return latency.LatencyTable(key={}, layers=[layer], dense_ms=6.4, rest=0.2)

    out = assets.root / "benched"
    lines: list[str] = []
    cache = tmp_path_factory.mktemp("latency-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STATPRUNE_CACHE", str(cache))
        patch.setattr(latency, "measure_table", synthetic)
        result = sweep_on(
            assets,
            budgets=[0.9, 0.6],
            methods=METHODS,
            budget_kind="latency",
            bench=True,
            bench_memory=False,
            bench_trials=2,
            bench_batch=2,
            bench_seq_len=8,
            min_quality="0",
            out=out,
            log=lines.append,
        )
    return SimpleNamespace(result=result, out=out, lines=lines, synthetic=synthetic, cache=cache)


BENCH_KEYS = {"latency_ms", "latency_p90_ms", "throughput", "unit", "peak_memory_mb", "latency_fraction"}


def test_bench_rows_and_dense_row(benched):
    rows = json.loads((benched.out / "results.json").read_text())
    dense, runs = rows[0], rows[1:]
    assert dense["method"] == "dense" and dense["latency_fraction"] == 1.0 and dense["achieved"] == 1.0
    assert len(runs) == len(METHODS) * 2
    for row in rows:
        assert set(row) >= BENCH_KEYS
        assert row["latency_ms"] > 0 and row["latency_p90_ms"] >= row["latency_ms"]
        assert row["unit"] == "seq/s"
        assert row["throughput"] == pytest.approx(2 / row["latency_ms"] * 1e3, rel=1e-3)
        assert row["peak_memory_mb"] is None  # bench_memory=False
    for row in runs:  # the latency budget: achieved is the cost model's prediction
        assert row["budget_kind"] == "latency" and row["achieved"] == row["predicted_latency_fraction"]
        assert row["achieved"] <= row["budget"] + 1e-9
        assert row["latency_fraction"] == pytest.approx(row["latency_ms"] / dense["latency_ms"], rel=1e-3)


def test_bench_markdown_plot_and_latency_selection(benched):
    text = (benched.out / "results.md").read_text()
    assert "Measured (forward, batch 2 x 8 tokens, torch on cpu" in text
    assert "| dense (100%) | " in text.split("Measured")[1]
    png = (benched.out / "plot_latency.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    selection = benched.result.selection
    assert selection.objective == "latency" and "measured latency" in selection.rule
    fastest = min(benched.result.rows, key=lambda r: r.latency_ms)
    assert selection.best is fastest
    best = json.loads((benched.out / "best.json").read_text())
    assert best["objective"] == "latency" and "--keep-latency" in best["command"]


def make_measured(method, achieved, value, latency, memory, params):
    row = make_row(method, achieved, value)
    row.flops_kept, row.params_kept, row.latency_ms, row.peak_memory_mb = achieved, params, latency, memory
    return row


def test_objective_picks_the_best_by_its_measure():
    rows = [
        make_measured("stat", 0.5, 0.85, latency=30.0, memory=300.0, params=0.7),
        make_measured("stat", 0.6, 0.86, latency=20.0, memory=310.0, params=0.4),
        make_measured("flap", 0.7, 0.87, latency=25.0, memory=200.0, params=0.6),
        make_measured("flap", 0.4, 0.70, latency=10.0, memory=100.0, params=0.2),  # below the bar
    ]
    threshold = 0.80
    picks = {
        obj: select_best(rows, threshold, True, METHODS, obj)[0]
        for obj in (None, "flops", "latency", "memory", "params")
    }
    assert picks[None] is rows[0] and picks["flops"] is rows[0]
    assert picks["latency"] is rows[1] and picks["params"] is rows[1]
    assert picks["memory"] is rows[2]
    rows[1].latency_ms = None  # not measured: not a candidate for the latency objective
    assert select_best(rows, threshold, True, METHODS, "latency")[0] is rows[2]
    assert sweep_module.default_objective(rows) == "latency"
    assert sweep_module.default_objective([make_row("stat", 0.5, 0.9)]) is None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--objective", "latency", "--min-quality", "0"), "--objective latency needs --bench"),
        (("--objective", "flops"), "--objective needs --min-quality"),
        (("--keep-latency", "0.5", "--budgets", "0.5"), "--keep-latency F is one latency budget"),
        (("--budget-kind", "latency", "--methods", "fisher"), "fisher"),
    ],
)
def test_bench_and_objective_bad_arguments(assets, tmp_path, extra, message):
    out = tmp_path / "out"
    with pytest.raises(BudgetError) as info:  # OptionsError
        cli_on(assets, "--out", out, *extra)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not out.exists()


def test_bench_with_a_missing_onnxruntime_names_the_package(assets, tmp_path, monkeypatch):
    import importlib.util

    from statprune.errors import StatpruneError

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a)
    )
    with pytest.raises(StatpruneError, match="needs the onnxruntime package"):
        cli_on(
            assets,
            "--out",
            tmp_path / "out",
            "--bench",
            "--backend",
            "onnxruntime",
        )
    assert not (tmp_path / "out").exists()


def test_bench_measures_causal_lms_by_prefill(tiny_model_dir, calib_file, tmp_path):
    model = tiny_model_dir("llama", name="lm")
    calib = calib_file(60)
    out = tmp_path / "out"
    result = sweep(
        model,
        calib,
        calib,
        budgets=[0.8],
        methods=["stat"],
        samples=40,
        pack=True,
        seq_len=16,
        bench=True,
        bench_memory=False,
        bench_trials=2,
        bench_batch=2,
        bench_seq_len=8,
        out=out,
        log=None,
    )
    assert result.task == "lm" and result.bench["kind"] == "prefill"
    rows = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in rows] == ["dense", "stat"]
    assert all(r["latency_ms"] > 0 for r in rows)
    assert "Measured (prefill, batch 2 x 8 tokens" in (out / "results.md").read_text()


# ------------------------------------------------------------------- --bench failures, resuming

FAST_BENCH = {"bench": True, "bench_trials": 2, "bench_batch": 2, "bench_seq_len": 8}


def _bench_sweep(assets, out, lines=None, **extra):
    settings = {
        "budgets": [0.8, 0.5],
        "methods": ["magnitude"],
        "min_quality": "0",
        "out": out,
        "log": None if lines is None else lines.append,
        **FAST_BENCH,
        **extra,
    }
    return sweep_on(assets, **settings)


def _dying_python(tmp_path, pattern: str) -> str:
    """``sys.executable`` whose child process is SIGKILLed (as by the OOM killer) when its arguments
    match ``pattern``; other commands run the real interpreter."""
    import sys

    script = tmp_path / "python"
    script.write_text(f'#!/bin/sh\ncase "$*" in *{pattern}*) kill -9 $$;; esac\nexec {sys.executable} "$@"\n')
    script.chmod(0o755)
    return str(script)


def test_a_dying_memory_child_keeps_every_candidate_and_a_rerun_measures_only_it(
    assets, tmp_path, monkeypatch
):
    import sys

    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(sys, "executable", _dying_python(tmp_path, "magnitude-0.5"))
        result = _bench_sweep(assets, out)
    rows = {r["method"] + str(r["budget"]): r for r in json.loads((out / "results.json").read_text())}
    assert set(rows) == {"dense1.0", "magnitude0.8", "magnitude0.5"}
    failed, kept = rows["magnitude0.5"], rows["magnitude0.8"]
    assert failed["value"] is not None and kept["value"] is not None  # the evaluations are kept
    assert "killed by signal 9" in failed["bench_error"] and failed["peak_memory_mb"] is None
    assert failed["latency_ms"] > 0  # only its memory was lost
    assert kept["bench_error"] is None and kept["peak_memory_mb"] > 0
    assert rows["dense1.0"]["peak_memory_mb"] > 0
    for row in rows.values():  # the weights, exact, next to every peak
        assert row["weight_mb"] > 0
    assert kept["weight_mb"] < rows["dense1.0"]["weight_mb"]
    text = (out / "results.md").read_text()
    assert "Not measured (or measured in part):" in text
    assert "- magnitude at keep 0.5 flops: its peak memory" in text
    assert result.bench["memory_noise_mb"] is not None and "Peak-memory noise:" in text

    lines: list[str] = []  # the same command again: only the missing measurement is redone
    again = _bench_sweep(assets, out, lines)
    assert sum("compressed again to measure it" in line for line in lines) == 1
    assert any(line.endswith("keep 0.80 flops: done in the earlier run (kept)") for line in lines)
    new = {r["method"] + str(r["budget"]): r for r in json.loads((out / "results.json").read_text())}
    assert new["magnitude0.5"]["peak_memory_mb"] > 0 and new["magnitude0.5"]["bench_error"] is None
    assert new["magnitude0.8"] == kept and new["dense1.0"] == rows["dense1.0"]  # not measured again
    assert new["magnitude0.5"]["value"] == failed["value"]
    assert again.bench["resumed"]["measured_again"] == ["magnitude at keep 0.5 flops"]
    text = (out / "results.md").read_text()
    assert "Resumed: magnitude at keep 0.5 flops measured in a second session" in text


def test_a_model_the_backend_cannot_run_is_recorded_and_nothing_measured_is_an_error(
    assets, tmp_path, monkeypatch
):
    from statprune import bench as bench_module
    from statprune.sweep import MeasurementError

    real = bench_module._load_one

    def broken_for(pattern):
        def load(i, path, *args):
            if pattern in str(path):
                raise RuntimeError("unsupported operator aten::fancy\nsecond line")
            return real(i, path, *args)

        return load

    out = tmp_path / "out"
    monkeypatch.setattr(bench_module, "_load_one", broken_for("magnitude-0.8"))
    _bench_sweep(assets, out, bench_memory=False)
    rows = json.loads((out / "results.json").read_text())
    failed = next(r for r in rows if r["budget"] == 0.8)
    assert failed["value"] is not None and failed["latency_ms"] is None and failed["throughput"] is None
    assert failed["bench_error"] == "it could not be loaded for torch (unsupported operator aten::fancy)"
    assert all(r["latency_ms"] > 0 for r in rows if r is not failed)
    assert "| 80% | not measured |" in (out / "results.md").read_text()

    out2 = tmp_path / "out2"  # nothing can be measured: written, then a one-line error
    monkeypatch.setattr(bench_module, "_load_one", broken_for(""))
    with pytest.raises(MeasurementError) as info:
        _bench_sweep(assets, out2, bench_memory=False)
    message = str(info.value)
    assert message.startswith("--bench measured nothing: dense failed: it could not be loaded for torch")
    assert "\n" not in message and "rerun the same command" in message
    # true of a rerun: the evaluations are kept, the candidates are compressed again to be measured
    assert "not compressed again" not in message and "compressed again to be measured" in message
    rows = json.loads((out2 / "results.json").read_text())
    assert len(rows) == 3 and all(r["value"] is not None and r["latency_ms"] is None for r in rows)
    assert not (out2 / "plot_latency.png").exists() and (out2 / "plot.png").is_file()


def test_ctrl_c_while_measuring_keeps_the_finished_work_and_a_rerun_resumes(
    assets, tmp_path, monkeypatch, capsys
):
    from statprune import bench as bench_module

    def interrupt(*_args, **_kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(bench_module, "time_calls", interrupt)
        code = cli_on(
            assets,
            "--budgets",
            "0.8,0.5",
            "--methods",
            "magnitude",
            "--samples",
            "60",
            "--min-quality",
            "0",
            "--out",
            out,
            "--bench",
            "--bench-trials",
            "2",
            "--bench-batch",
            "2",
            "--bench-seq-len",
            "8",
            "--bench-no-memory",
            "--quiet",
        )
    assert code == 130
    # nothing was measured: the selection says it ranked by FLOPs instead of latency, and why
    message = json.loads((out / "best.json").read_text())["message"]
    assert "the smallest model by FLOPs kept with accuracy >= " in message
    assert message.endswith(
        "(--bench measured nothing, so not by latency: rerun the same command to measure)"
    )
    assert "rerun the same command" in message
    stderr = capsys.readouterr().err
    assert (
        "interrupted while measuring; the compressed candidates and their evaluations were written to "
        f"{out}" in stderr
    )
    rows = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in rows] == ["dense", "magnitude", "magnitude"]
    assert all(r["bench_error"] == "interrupted while measuring (Ctrl-C)" for r in rows)
    assert all(r["value"] is not None for r in rows)
    (out / "notes.txt").write_text("mine")  # not the sweep's own: kept by the rerun
    (out / "report.html").write_text("made from the earlier results")  # `statprune report`'s: stale
    lines: list[str] = []
    _bench_sweep(assets, out, lines, bench_memory=False, dtype="float32")  # the CLI's settings, by the API
    assert (out / "notes.txt").read_text() == "mine" and not (out / "report.html").exists()
    assert f"removed report.html (made from the earlier results): run `statprune report {out}` again" in lines
    assert sum("compressed again to measure it" in line for line in lines) == 2
    resumed = json.loads((out / "results.json").read_text())
    assert all(r["latency_ms"] > 0 and r["bench_error"] is None for r in resumed)
    assert [r["value"] for r in resumed] == [r["value"] for r in rows]
    with pytest.raises(OutputError, match=r"other settings \(--seq-len was 128, now 64\)"):  # not the same
        _bench_sweep(assets, out, bench_memory=False, dtype="float32", seq_len=64)


# ------------------------------------------------- interrupted or killed while compressing / evaluating


def _interrupt_evaluation(patch, at: int, error: type[BaseException] = KeyboardInterrupt) -> None:
    """Make the ``at``-th call of ``evaluate`` (1: the dense model's) raise ``error``."""
    from statprune import evaluate as evaluate_module

    real, calls = evaluate_module.evaluate, []

    def evaluate(*args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            raise error("stopped")
        return real(*args, **kwargs)

    patch.setattr(evaluate_module, "evaluate", evaluate)


def _sweep_argv(out, *extra):
    return (
        "--budgets",
        ",".join(map(str, BUDGETS)),
        "--methods",
        ",".join(METHODS),
        "--samples",
        "60",
        "--out",
        out,
        "--quiet",
        *extra,
    )


def _values(out: Path) -> dict:
    return {(r["method"], r["budget"]): r["value"] for r in json.loads((out / "results.json").read_text())}


def test_ctrl_c_while_compressing_keeps_the_finished_runs_and_a_rerun_resumes_them(
    assets, swept, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        _interrupt_evaluation(patch, at=4)  # dense, two runs, then Ctrl-C in the third run
        assert cli_on(assets, *_sweep_argv(out)) == 130
    stderr = capsys.readouterr().err
    partial = out / sweep_module.PARTIAL
    assert f"interrupted; the 2 finished runs are saved in {partial}: rerun the same command" in stderr
    assert "Traceback" not in stderr
    assert sorted(p.name for p in out.iterdir()) == [sweep_module.PARTIAL]  # no half-written results
    saved = json.loads(partial.read_text())["rows"]
    assert [(r["method"], r["budget"]) for r in saved] == [("stat", 0.8), ("stat", 0.5)]

    assert cli_on(assets, *_sweep_argv(out)) == 0  # the same command: the two finished runs are kept
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "dense: accuracy 1.0000 on 24 examples (evaluated in the earlier run)"  # same inputs
    assert lines[1] == f"resuming: 2 finished runs from {partial} (delete it to start over)"
    assert sum(line.endswith("done in the earlier run (kept)") for line in lines) == 2
    assert sum(" -> " in line for line in lines) == 2  # only the magnitude runs were compressed
    assert not partial.exists()
    assert _values(out) == _values(swept.out)  # what an uninterrupted sweep finds


def test_a_second_signal_while_the_first_is_handled_still_names_the_checkpoint(
    assets, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"

    def interrupted_twice(*_args, **_kwargs):
        out.mkdir()
        (out / sweep_module.PARTIAL).write_text("{}")  # the first signal's checkpoint is there
        raise KeyboardInterrupt  # not SweepInterrupted: the second signal struck first

    monkeypatch.setattr(sweep_module, "_sweep_from_args", interrupted_twice)
    assert cli_on(assets, *_sweep_argv(out)) == 130
    assert (
        f"interrupted; the finished runs are saved in {out / sweep_module.PARTIAL}" in capsys.readouterr().err
    )


def test_a_crash_keeps_the_checkpoint_and_other_settings_are_refused(assets, tmp_path, monkeypatch):
    out = tmp_path / "out"
    common = {"budgets": BUDGETS, "methods": ["magnitude"], "out": out, "log": None}
    with monkeypatch.context() as patch:  # not Ctrl-C: anything that ends the process (a bug, OOM)
        _interrupt_evaluation(patch, at=3, error=MemoryError)
        with pytest.raises(MemoryError):
            sweep_on(assets, **common)
    partial = out / sweep_module.PARTIAL
    assert [r["budget"] for r in json.loads(partial.read_text())["rows"]] == [0.8]
    with pytest.raises(OutputError) as info:  # a checkpoint of other settings is never mixed in
        sweep_on(assets, **common, seq_len=64)
    message = str(info.value)
    assert "holds an unfinished sweep with other settings (--seq-len was 128, now 64)" in message
    assert f"pass --overwrite (or delete {partial}) to start over" in message
    lines: list[str] = []
    result = sweep_on(assets, **{**common, "log": lines.append})  # the same settings: resumed
    assert sum("done in the earlier run (kept)" in line for line in lines) == 1
    assert [r.budget for r in result.rows] == BUDGETS and not partial.exists()


def test_overwrite_starts_over_from_a_checkpoint_of_other_settings(assets, tmp_path, monkeypatch):
    out = tmp_path / "out"
    common = {"budgets": BUDGETS, "methods": ["magnitude"], "out": out, "log": None}
    with monkeypatch.context() as patch:
        _interrupt_evaluation(patch, at=3)
        with pytest.raises(KeyboardInterrupt):
            sweep_on(assets, **common)
    lines: list[str] = []
    sweep_on(assets, **{**common, "log": lines.append}, seq_len=64, overwrite=True)
    assert not any("earlier run" in line for line in lines) and sum(" -> " in line for line in lines) == 2
    assert json.loads((out / "sweep.json").read_text())["settings"]["runs"]["seq_len"] == 64


def test_inputs_changed_in_place_are_not_mixed_with_the_earlier_runs(assets, tmp_path, monkeypatch):
    """Same paths, other contents (an edited evaluation file, a model saved again): the earlier
    runs do not count, and the message says which input changed."""
    import shutil

    data, model = tmp_path / "eval.jsonl", tmp_path / "model"
    shutil.copy(assets.eval, data)
    shutil.copytree(assets.model, model)
    out = tmp_path / "out"
    common = {"budgets": BUDGETS, "methods": ["magnitude"], "out": out, "log": None}
    with monkeypatch.context() as patch:
        _interrupt_evaluation(patch, at=3)
        with pytest.raises(KeyboardInterrupt):
            sweep(model, assets.calib, data, samples=60, **common)
    lines = data.read_text().splitlines()
    data.write_text("\n".join(lines[1:] + lines[:1]) + "\n")  # the same records, in another order
    with pytest.raises(OutputError, match=r"other settings \(the contents of --eval changed since then\)"):
        sweep(model, assets.calib, data, samples=60, **common)
    shutil.copy(assets.eval, data)  # back as it was: resumed
    weights = next(model.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + bytes(8))  # the last weights changed
    with pytest.raises(OutputError, match=r"\(the contents of MODEL changed since then\)"):
        sweep(model, assets.calib, data, samples=60, **common)


def test_overwrite_resumes_its_own_checkpoint_not_the_old_results(assets, swept, tmp_path, monkeypatch):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(swept.out, out)  # a finished sweep of other settings
    common = {"budgets": [0.8], "methods": ["magnitude", "stat"], "out": out, "log": None}
    with monkeypatch.context() as patch:
        _interrupt_evaluation(patch, at=3)
        with pytest.raises(KeyboardInterrupt):
            sweep_on(assets, **common, seq_len=64, overwrite=True)
    assert (out / "results.json").read_text() == (swept.out / "results.json").read_text()  # untouched
    lines: list[str] = []
    common["log"] = lines.append
    sweep_on(assets, **common, seq_len=64, overwrite=True)
    assert sum("done in the earlier run (kept)" in line for line in lines) == 1
    assert set(_values(out)) == {("magnitude", 0.8), ("stat", 0.8)}
    assert not (out / "best").exists() and not (out / sweep_module.PARTIAL).exists()


def test_a_sweep_where_every_run_fails_leaves_no_checkpoint(assets, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(BudgetError, match="every run failed"):
        sweep_on(
            assets,
            budgets=[0.0001],
            methods=["magnitude"],
            out=out,
        )
    assert not out.exists()


# ------------------------------------------------------------------ labels, memory, messages


def test_a_latency_budget_is_labelled_predicted_next_to_the_measured_share(benched):
    runs = [line for line in benched.lines if " -> " in line]
    assert len(runs) == 4 and all("% predicted " in line and "% kept" not in line for line in runs)
    message = benched.result.selection.message
    best = benched.result.selection.best
    assert "achieved" not in message
    assert f"predicted {best.achieved:.1%} of dense latency; measured {best.latency_ms:.1f} ms" in message
    assert f"({best.latency_fraction:.1%} of dense)" in message
    text = (benched.out / "results.md").read_text()
    assert f"({best.achieved:.1%} predicted)" in text
    assert "fraction of the dense latency kept as predicted by the lookup tables" in text
    assert "achieved fraction" not in text


def _memory_rows(peaks, weights):
    rows = []
    for i, (peak, weight) in enumerate(zip(peaks, weights, strict=True)):
        row = make_measured("stat", 0.9 - 0.1 * i, 0.9, latency=10.0, memory=peak, params=0.9 - 0.1 * i)
        row.weight_mb = weight
        rows.append(row)
    return rows


def test_objective_memory_ranks_by_weights_when_every_peak_is_within_noise():
    from statprune.sweep import QualityBar, _selection

    dense = make_measured("dense", 1.0, 0.9, latency=12.0, memory=500.0, params=1.0)
    # peaks above dense or below it by noise only: the lowest peak (499) is not the smallest model
    rows = _memory_rows(peaks=[499.0, 503.0, 501.0], weights=[30.0, 20.0, 10.0])
    bar = QualityBar(0.5, False, "0.5")
    selection = _selection(rows, bar, "accuracy", 0.9, ["stat"], "memory", dense, noise_mb=4.0)
    assert selection.objective == "weights" and selection.best is rows[2]
    assert (
        "no candidate's peak memory is below the dense model's by more than the measurement noise"
        in selection.message
        and "model weights" in selection.rule
    )
    # one real saving: ranked by peak memory, and a pick with a peak above dense would say so
    rows = _memory_rows(peaks=[400.0, 503.0, 501.0], weights=[30.0, 20.0, 10.0])
    selection = _selection(rows, bar, "accuracy", 0.9, ["stat"], "memory", dense, noise_mb=4.0)
    assert selection.objective == "memory" and selection.best is rows[0]
    assert "its peak memory" not in selection.message


def test_a_broken_backend_package_is_named_with_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    problem = sweep_module._backend_problem("onnxruntime")
    assert "onnxruntime package cannot be imported" in problem
    assert "pip install 'statprune[onnx]'" in problem
    assert sweep_module._backend_problem("torch") is None


def test_a_resume_with_other_settings_names_the_flags_and_values():
    old = {"seq_len": 128, "compress_options": {"bench_batch": 8}}
    new = {"seq_len": 128, "compress_options": {}}
    assert sweep_module._setting_changes(old, new) == ["--bench-batch was 8, now 32"]
    new = {"seq_len": 64, "compress_options": {"bench_batch": 8, "prune": ["heads"]}}
    assert sweep_module._setting_changes(old, new) == [
        "--seq-len was 128, now 64",
        "--prune was heads,neurons, now heads",
    ]


def test_help_shows_the_bench_defaults():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    text = add_sweep_parser(sub).format_help()
    assert re.search(r"--bench-batch.*\(default: 32\)", " ".join(text.split()))
    assert re.search(r"--bench-seq-len.*\(default: --seq-len\)", " ".join(text.split()))


def test_a_latency_budget_below_the_floor_stops_before_any_work(assets, benched, tmp_path, monkeypatch):
    from statprune import latency

    monkeypatch.setenv("STATPRUNE_CACHE", str(benched.cache))
    monkeypatch.setattr(latency, "measure_table", benched.synthetic)
    lines: list[str] = []
    out = tmp_path / "out"
    with pytest.raises(BudgetError) as info:
        sweep_on(
            assets,
            budgets=[0.01],
            methods=["magnitude"],
            budget_kind="latency",
            bench_batch=2,
            bench_seq_len=8,
            out=out,
            log=lines.append,
        )
    message = str(info.value)
    assert "is below what can be reached" in message and "smallest reachable budget" in message
    assert message.startswith("every run is out of reach; --budgets 0.01 is below")
    assert re.search(r"give --budgets 0\.\d+ or more", message)  # the flag the sweep was given
    assert "every run failed" not in message and "\n" not in message
    assert not any(line.startswith("dense:") for line in lines)  # the dense model was not evaluated
    assert not out.exists()


def test_too_little_calibration_data_stops_before_the_dense_evaluation(assets, tmp_path):
    from statprune.errors import DataError

    lines: list[str] = []
    with pytest.raises(DataError) as info:
        sweep_on(assets, budgets=[0.5], methods=["stat"], samples=1, out=tmp_path / "out", log=lines.append)
    assert lines == []  # neither the dense model nor any run was evaluated
    message = str(info.value)
    assert re.match(
        r"calibration data has only \d+ tokens; a meaningful factorization needs at least", message
    )
    wanted = int(
        re.search(r"samples=(\d+) \(\d+ tokens per example\)", message).group(1)
    )  # the API's spelling
    assert "--pack" not in message  # an encoder's examples are not joined into windows
    # the number it names is enough: no error, no thin-data warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationWarning)
        sweep_on(assets, budgets=[0.5], methods=["stat"], samples=wanted, out=tmp_path / "out2", log=None)
    # a file that holds fewer examples than asked for: more data, not a larger --samples
    small = tmp_path / "small.txt"
    small.write_text("\n".join(assets.calib.read_text().splitlines()[:2]) + "\n")
    with pytest.raises(
        DataError, match="the data gave only 2 examples: give a larger file or longer examples"
    ):
        sweep(assets.model, small, assets.eval, budgets=[0.5], methods=["stat"], samples=60, log=None)
    # a method that reads the weights only needs no calibration tokens
    sweep_on(assets, budgets=[0.5], methods=["magnitude"], samples=1, log=None)
