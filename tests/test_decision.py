"""``statprune report``: the decision page from a real (tiny) sweep, its numbers, errors, and a real browser.

One small sweep (tiny BERT classifier, 2 budgets x 2 methods, ``--min-quality`` and ``--save-best``)
is shared by the tests. The browser test renders the page in headless Chromium (``make browser``
installs it where apt works); it is skipped, saying so, when no Chromium is installed.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import _build_tiny_tokenizer, build_tiny_model, tiny_texts

from statprune.cli import main
from statprune.decision import build_report, render_html, render_markdown, write_report
from statprune.errors import DataError, OptionsError, OutputError
from statprune.evaluate import wilson_interval
from statprune.sweep import sweep


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    import torch

    root = tmp_path_factory.mktemp("decision")
    model, tokenizer = build_tiny_model("bert", initializer_range=0.3), _build_tiny_tokenizer()
    model_dir = root / "tinybert"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    calib = root / "calib.txt"
    calib.write_text("\n".join(tiny_texts(60)) + "\n")
    texts = tiny_texts(40, seed=1)
    with torch.no_grad():
        labels = [int(model(**tokenizer(t, return_tensors="pt")).logits.argmax()) for t in texts]
    rng = random.Random(0)  # a dense accuracy below 1, so intervals have width
    labels = [y if rng.random() < 0.8 else (y + 1) % 3 for y in labels]
    data = root / "eval.jsonl"
    data.write_text(
        "\n".join(json.dumps({"text": t, "label": y}) for t, y in zip(texts, labels, strict=True))
    )
    out = root / "sweep"
    result = sweep(
        model_dir,
        calib,
        data,
        budgets=[0.8, 0.5],
        methods=["stat", "magnitude"],
        min_quality="90%",
        save_best=True,
        out=out,
        log=None,
    )
    return SimpleNamespace(root=root, model=model_dir, out=out, result=result)


def bench_file(path: Path, entries: dict[Path, tuple[float, float]], batch: int = 8, p90: float = 1.05):
    """A ``statprune bench --json`` file: folder -> (latency ms, throughput seq/s) at ``batch``."""
    rows = []
    for folder, (latency, throughput) in entries.items():
        for b, scale in ((1, 0.2), (batch, 1.0)):
            rows.append(
                {
                    "model": str(folder),
                    "label": folder.name,
                    "backend": "torch",
                    "device": "cpu",
                    "kind": "forward",
                    "batch": b,
                    "seq_len": 128,
                    "new_tokens": 0,
                    "params": 1,
                    "latency_ms": latency * scale,
                    "latency_p90_ms": latency * scale * p90,
                    "throughput": throughput,
                    "unit": "seq/s",
                    "peak_memory_mb": 50.0,
                    "memory_method": "rss",
                    "speedup": 1.0,
                    "params_ratio": 1.0,
                    "trials": 10,
                    "threads": 2,
                }
            )
    path.write_text(json.dumps({"environment": {}, "rows": rows}))
    return path


def test_report_numbers_follow_the_sweep(swept):
    report = build_report(swept.out, plots=False)
    chosen = json.loads((swept.out / "best.json").read_text())
    best = chosen["best"]
    rows = json.loads((swept.out / "results.json").read_text())
    meta = json.loads((swept.out / "sweep.json").read_text())
    assert f"Protocol: {report.protocol}" == meta["protocol"]  # under its own heading on the page
    assert report.protocol.startswith("model `tinybert`")
    assert [c.name for c in report.candidates] == ["dense"] + [
        f"{r['method']} @ {r['budget']:.0%}" for r in rows
    ]
    rec = report.recommended
    assert rec is not None and rec.recommended
    assert (rec.method, rec.budget) == (best["method"], best["budget"])
    assert [c.recommended for c in report.candidates].count(True) == 1
    n = meta["eval_examples"]
    for cand, row in zip(report.candidates[1:], rows, strict=True):
        assert cand.interval == wilson_interval(round(row["value"] * n), n)
        assert cand.change == pytest.approx(row["value"] - row["dense_value"])
        assert list(cand.change_interval) == row["change_interval"]
        assert cand.meets_bar == (row["value"] >= chosen["threshold"] - 1e-12)
    # sizes: measured for the dense folder and best/, estimated (smaller, by params kept) for the rest
    dense_bytes = (swept.model / "model.safetensors").stat().st_size
    assert report.candidates[0].size_bytes == dense_bytes and report.candidates[0].size_measured
    assert rec.size_measured and rec.size_bytes == (swept.out / "best" / "model.safetensors").stat().st_size
    for cand in report.candidates[1:]:
        assert cand.size_bytes < dense_bytes
        if not cand.recommended:
            assert not cand.size_measured
    assert not report.measured
    assert report.reason.startswith(f"{rec.name} is the smallest (keeps {rec.achieved:.1%} of the FLOPs)")
    assert report.reason.count(report.bar) == 1 and report.rule not in report.reason


def test_recommendation_is_written_once_and_says_why_the_others_lose(swept):
    report = build_report(swept.out, plots=False)
    rec, reason = report.recommended, report.reason
    others = [c for c in report.candidates[1:] if c is not rec]
    for cand in others:  # each other candidate is named once, with what loses it the pick
        assert reason.count(f"{cand.name} (") == 1
        why = (
            f"{cand.name} (keeps {cand.achieved:.1%} of the FLOPs)"
            if cand.meets_bar
            else f"{cand.name} (accuracy {cand.value:.4f})"
        )
        assert why in reason
    assert "meet the bar but cost more" in reason or "miss the bar" in reason
    html = render_html(report)
    assert html.count(report.rule.split(";")[0]) == 1  # the rule: once, in the protocol
    assert reason.split(".")[0] in render_markdown(report)


def test_markdown_fragments_render_as_html(swept):
    """The protocol, reasons and warnings carry Markdown (`code`): the HTML page shows it as
    <code>, never as literal backticks (markdown-it-py); raw HTML in them is escaped."""
    report = build_report(swept.out, plots=False)
    report.warnings.append("a <b>bold</b> claim about `statprune bench`")
    html = render_html(report)
    assert "`" not in html
    assert '<p id="protocol">model <code>tinybert</code>' in html
    assert "about <code>statprune bench</code>" in html and "&lt;b&gt;bold&lt;/b&gt;" in html
    assert "\nmodel `tinybert` (" in render_markdown(report)  # the twin keeps its Markdown


def test_markdown_twin_holds_the_table_and_how_to_measure(swept):
    report = build_report(swept.out, plots=False)
    md = render_markdown(report)
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(report.candidates)  # header + one row per candidate
    assert f"**Recommended: {report.recommended.name}.**" in md
    assert f"| **{report.recommended.name}** ★ |" in md
    assert "**not measured**" in md and f"statprune bench {swept.model.resolve()}" in md
    assert "--price-per-hour P" in md


def test_cost_per_million_requests_from_measured_throughput(swept, tmp_path):
    best_dir = swept.out / "best"
    bench = bench_file(tmp_path / "bench.json", {swept.model: (40.0, 200.0), best_dir: (25.0, 320.0)})
    report = build_report(swept.out, bench=bench, price_per_hour=3.0, requests_per_day=2e6)
    dense, rec = report.candidates[0], report.recommended
    assert (dense.latency_ms, dense.throughput, dense.peak_memory_mb) == (40.0, 200.0, 50.0)
    assert (rec.latency_ms, rec.throughput) == (25.0, 320.0)
    assert dense.cost_per_million == pytest.approx(3.0 * 1e6 / (200.0 * 3600))
    assert rec.cost_per_million == pytest.approx(3.0 * 1e6 / (320.0 * 3600))
    assert rec.cost_per_day == pytest.approx(rec.cost_per_million * 2.0)
    others = [c for c in report.candidates[1:] if not c.recommended]
    assert all(c.latency_ms is None and c.cost_per_million is None for c in others)
    assert report.measured and "batch 8" in report.bench_setting and not report.warnings
    assert "speed-up 1.60×" in report.reason
    assert len(report.plots) == 2  # quality vs size, and vs measured latency
    md = render_markdown(report)
    assert "throughput in requests/s × 3600" in md
    assert f"{rec.cost_per_million:,.{report.cost_decimals}f}" in md
    # batch 1 was measured too: its rows are used when asked for
    assert build_report(swept.out, bench=bench, bench_batch=1, plots=False).recommended.latency_ms == 5.0


def test_a_bench_file_older_than_best_is_not_shown_for_it(swept, tmp_path):
    """A later sweep saved another model into best/: the measurements of the earlier one are not
    put on it (the dense model's still are)."""
    import os

    sweep_dir = tmp_path / "sweep"
    shutil.copytree(swept.out, sweep_dir)
    best_dir = sweep_dir / "best"
    bench = bench_file(sweep_dir / "bench.json", {swept.model: (40.0, 200.0), best_dir: (25.0, 320.0)})
    assert build_report(sweep_dir, plots=False).recommended.latency_ms == 25.0  # measured after best/
    newer = bench.stat().st_mtime + 60
    weights = next(best_dir.glob("*.safetensors"))
    os.utime(weights, (newer, newer))  # best/ rewritten after the measurement
    report = build_report(sweep_dir, plots=False)
    assert report.recommended.latency_ms is None and report.candidates[0].latency_ms == 40.0
    assert any("bench.json is older than best/" in w and "statprune bench" in w for w in report.warnings)


def measured_copy(swept, tmp_path, *, throughput=None, peak=None, weights=None, failed=None, noise=None):
    """A copy of the shared sweep as if ``sweep --bench`` had measured it: per row (in results.json
    order) ``throughput`` (seq/s), ``peak`` and ``weights`` (MiB); the dense model gets index -1.
    ``failed``: {row index: reason}, a failed measurement (no latency, no memory)."""
    measured = tmp_path / "sweep"
    shutil.copytree(swept.out, measured)
    rows = json.loads((measured / "results.json").read_text())
    n = len(rows)
    throughput = throughput or {i: 100.0 + 10 * i for i in range(-1, n)}
    peak, weights, failed = peak or {}, weights or {}, failed or {}

    def fields(i):
        if i in failed:
            return {
                "latency_ms": None,
                "latency_p90_ms": None,
                "throughput": None,
                "peak_memory_mb": None,
                "bench_error": failed[i],
            }
        return {
            "latency_ms": 1e3 / throughput[i],
            "latency_p90_ms": 1.05e3 / throughput[i],
            "throughput": throughput[i],
            "unit": "seq/s",
            "peak_memory_mb": peak.get(i),
            "weight_mb": weights.get(i),
            "bench_error": None,
        }

    for i, row in enumerate(rows):
        row.update(fields(i))
    (measured / "results.json").write_text(json.dumps(rows))
    meta = json.loads((measured / "sweep.json").read_text())
    meta["dense_bench"] = fields(-1)
    meta["bench"] = {"memory_noise_mb": noise}
    meta["bench_setting"] = "batch 8 x 128 tokens, torch on cpu"
    (measured / "sweep.json").write_text(json.dumps(meta))
    return measured


def _decimals(cell: str) -> int:
    return len(cell.split(".")[1]) if "." in cell else 0


def test_money_has_one_precision_per_column(swept, tmp_path):
    """Costs of different magnitudes (here 0.93 to 12.3 per 1M requests) print with the same
    number of decimals in every row, the smallest with 3 significant figures; HTML and Markdown
    agree, and the reason quotes the same figures."""
    n = len(json.loads((swept.out / "results.json").read_text()))
    throughputs = {-1: 22.5, **{i: 300.0 * (i + 1) for i in range(n)}}
    report = build_report(
        measured_copy(swept, tmp_path, throughput=throughputs),
        price_per_hour=1.0,
        requests_per_day=3e5,
        plots=False,
    )
    costs = [c.cost_per_million for c in report.candidates]
    assert max(costs) / min(costs) > 10  # magnitudes that ".4g" printed with mixed decimals
    md = render_markdown(report)
    rows = [line.split("|")[1:-1] for line in md.splitlines() if line.startswith("| ") and "---" not in line]
    header, body = [c.strip() for c in rows[0]], rows[1:]
    for column in ("cost / 1M requests", "cost / day", "latency (ms)"):
        cells = [r[header.index(column)].strip() for r in body]
        assert len({_decimals(c) for c in cells}) == 1, cells
        smallest = min(cells, key=lambda c: float(c.replace(",", "")))
        assert len(smallest.replace(",", "").replace(".", "").lstrip("0")) >= 3, smallest
    html = render_html(report)
    for cand in report.candidates:
        text = f"<td>{cand.cost_per_million:,.{report.cost_decimals}f}</td>"
        assert text in html, text
    assert report.cost_decimals == 3 and "| 12.346 |" in md  # dense: 1e6 / (22.5 * 3600)
    assert "Serving cost at 1.00 per machine-hour and 300,000 requests per day" in md
    sizes = [re.search(r"[\d,]+\.(\d+) MiB", r[header.index("size on disk")]) for r in body]
    assert all(sizes) and len({len(m.group(1)) for m in sizes}) == 1  # one precision for the column
    assert report.latency_decimals == 3  # the fastest: 1000 / 1200 = 0.833 ms
    assert f"Measured latency {report.recommended.latency_ms:.3f} ms against 44.444 ms dense" in report.reason
    cheap = build_report(measured_copy(swept, tmp_path / "p"), price_per_hour=0.045, plots=False)
    assert cheap.price_decimals == 3 and "Serving cost at 0.045 per machine-hour" in render_markdown(cheap)


def test_memory_that_shows_no_saving_is_flagged_not_silent(swept, tmp_path):
    """A pruned candidate whose peak RSS comes out above the dense one's (tiny models: the runtime's
    own allocations dominate), or below it by less than the noise, is marked ‡ with a note; the
    weights are shown next to the peak; a real saving is not marked."""
    n = len(json.loads((swept.out / "results.json").read_text()))
    peak = {-1: 40.0, 0: 41.5, 1: 39.8, **{i: 20.0 for i in range(2, n)}}
    weights = {-1: 4.0, **{i: 2.0 for i in range(n)}}
    report = build_report(measured_copy(swept, tmp_path, peak=peak, weights=weights, noise=0.5), plots=False)
    flagged = [c.name for c in report.memory_flagged]
    assert flagged == [report.candidates[1].name, report.candidates[2].name]
    assert [c.memory_caveat for c in report.candidates[1:3]] == ["above", "noise"]
    md = render_markdown(report)
    assert report.weight_decimals == 2  # 3 significant figures for the smallest: 2.00
    assert "| 41.5 ‡ | 2.00 |" in md and "| 39.8 ‡ | 2.00 |" in md and "| 20.0 | 2.00 |" in md
    assert f"‡ Peak memory of {flagged[0]}, {flagged[1]} is not below the dense model's" in md
    assert "measurement noise (0.5 MiB between two measurements of it, at least 1% of its peak)" in md
    assert "For the dense model, the weights are 10.0% of the peak memory." in md
    html = render_html(report)
    assert '<p id="memory-note" class="warn">‡ Peak memory of' in html
    assert "<th>peak memory (MiB)</th><th>weights (MiB)</th>" in html
    quiet = build_report(
        measured_copy(swept, tmp_path / "q", peak={i: 40.0 - i for i in range(-1, n)}), plots=False
    )
    assert not quiet.memory_flagged and "memory-note" not in render_html(quiet)


def test_a_failed_measurement_is_named_with_its_reason(swept, tmp_path):
    reason = "its peak memory could not be measured (killed by signal 9)"
    report = build_report(measured_copy(swept, tmp_path, failed={1: reason}), price_per_hour=2.0, plots=False)
    cand = report.candidates[2]
    assert cand.bench_error == reason and cand.latency_ms is None and cand.cost_per_million is None
    assert report.not_measured == [cand]
    md = render_markdown(report)
    assert "| not measured § |" in md and f"- {cand.name}: {reason}" in md
    html = render_html(report)
    assert '<div id="bench-failures" class="warn">§ Not measured' in html
    assert f"<li>{cand.name}: {reason}</li>" in html


def test_latency_recorded_by_the_sweep_itself_is_used(swept, tmp_path):
    measured = tmp_path / "sweep"
    shutil.copytree(swept.out, measured)
    rows = json.loads((measured / "results.json").read_text())
    for i, row in enumerate(rows):
        row.update(latency_ms=10.0 + i, latency_p90_ms=10.5 + i, throughput=100.0 - i, peak_memory_mb=30.0)
    (measured / "results.json").write_text(json.dumps(rows))
    meta = json.loads((measured / "sweep.json").read_text())
    meta["dense_bench"] = {
        "latency_ms": 20.0,
        "latency_p90_ms": 21.0,
        "throughput": 50.0,
        "peak_memory_mb": 60.0,
    }
    (measured / "sweep.json").write_text(json.dumps(meta))
    report = build_report(measured, price_per_hour=1.0)
    assert [c.latency_ms for c in report.candidates] == [20.0] + [10.0 + i for i in range(len(rows))]
    assert all(c.cost_per_million == pytest.approx(1e6 / (c.throughput * 3600)) for c in report.candidates)
    assert report.measured and not report.warnings


def test_noisy_measurements_are_flagged(swept, tmp_path):
    bench = bench_file(tmp_path / "bench.json", {swept.model: (40.0, 200.0)}, p90=1.8)
    report = build_report(swept.out, bench=bench, plots=False)
    assert any("noisy machine" in w and "dense 1.80×" in w for w in report.warnings)
    assert "spread widely" in render_markdown(report)
    # on the page: a visible warning box near the top, before the protocol
    html = render_html(report)
    box = re.search(r'<p class="warn">Warning: noisy machine: ([^<]*)', html)
    assert box is not None and html.index('class="warn"') < html.index('id="protocol"')
    # a measured sweep: one warning naming every noisy model, none for a quiet one
    measured = tmp_path / "sweep"
    shutil.copytree(swept.out, measured)
    rows = json.loads((measured / "results.json").read_text())
    for i, row in enumerate(rows):
        row.update(latency_ms=10.0, latency_p90_ms=10.5 if i else 14.0, throughput=100.0)
    (measured / "results.json").write_text(json.dumps(rows))
    noisy = build_report(measured, plots=False)
    assert len(noisy.warnings) == 1 and f"1 of {len(rows)} measured models" in noisy.warnings[0]
    assert f"{noisy.candidates[1].name} 1.40×" in noisy.warnings[0]
    for row in rows:
        row["latency_p90_ms"] = 10.5
    (measured / "results.json").write_text(json.dumps(rows))
    assert build_report(measured, plots=False).warnings == []
    # a pruned candidate measured slower than the dense model: the load changed while measuring
    rows[0]["latency_ms"] = rows[0]["latency_p90_ms"] = 11.0
    (measured / "results.json").write_text(json.dumps(rows))
    meta = json.loads((measured / "sweep.json").read_text())
    meta["dense_bench"] = {"latency_ms": 10.0, "latency_p90_ms": 10.2, "throughput": 100.0}
    (measured / "sweep.json").write_text(json.dumps(meta))
    (warning,) = build_report(measured, plots=False).warnings
    first = build_report(measured, plots=False).candidates[1]
    assert warning.startswith(f"inconsistent latencies: {first.name} 1.10× the dense latency")


def test_report_ranks_by_measured_latency_and_takes_the_bar_and_objective(swept, tmp_path, capsys):
    """A sweep run without --min-quality but with latency measured: the bar given to the report
    picks the fastest candidate meeting it (not the smallest fraction kept); --objective overrides."""
    measured = tmp_path / "sweep"
    shutil.copytree(swept.out, measured)
    (measured / "best.json").unlink()
    meta = json.loads((measured / "sweep.json").read_text())
    meta["objective"] = None
    (measured / "sweep.json").write_text(json.dumps(meta))
    rows = json.loads((measured / "results.json").read_text())
    for row in rows:  # the larger the budget, the faster: latency disagrees with the fraction kept
        row.update(latency_ms=100.0 - 50.0 * row["budget"], latency_p90_ms=100.0, throughput=10.0)
    (measured / "results.json").write_text(json.dumps(rows))
    assert build_report(measured, plots=False).recommended is None  # no bar yet
    fastest = build_report(measured, min_quality="0.0", plots=False)
    assert fastest.objective == "latency" and "measured latency" in fastest.rule
    assert fastest.recommended.budget == max(r["budget"] for r in rows)
    assert fastest.reason.startswith(f"{fastest.recommended.name} is the fastest (")
    smallest = build_report(measured, min_quality="0.0", objective="flops", plots=False)
    assert smallest.recommended.flops_kept == min(r["flops_kept"] for r in rows)
    with pytest.raises(OptionsError, match=r"--objective memory: \d+ of \d+ candidates were not measured"):
        build_report(measured, min_quality="0.0", objective="memory", plots=False)
    with pytest.raises(OptionsError, match="--objective needs a bar: pass --min-quality Q"):
        build_report(measured, objective="flops", plots=False)
    with pytest.raises(OptionsError, match="asks every candidate to beat the dense model"):
        build_report(measured, min_quality="150%", plots=False)
    with pytest.raises(OptionsError, match=r"not a possible accuracy \(0\.\.1\); did you mean 99%\?"):
        build_report(measured, min_quality="99", plots=False)
    out = tmp_path / "page.html"
    argv = ["report", str(measured), "--out", str(out), "--min-quality", "0.0", "--objective", "flops"]
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith(f"recommended: {smallest.recommended.name} — ")
    assert main(["report", str(measured), "--out", str(out), "--min-quality", "150%"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --min-quality 150% asks") and "\n" not in err


def test_latency_axis_label_fits_in_the_plot(swept, tmp_path):
    """The latency plot's axis label (with the long measured setting) stays inside the figure."""
    from statprune.decision import _latency_figure

    report = build_report(swept.out, plots=False)
    for i, cand in enumerate(report.candidates):
        cand.latency_ms = 50.0 - 5 * i
    report.bench_setting = (
        "by the sweep: batch 32 x 128 tokens, torch on cpu (2 threads), median of 10 interleaved "
        "trials, peak memory by a child process per model"
    )
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = _latency_figure(report)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # constrained layout runs at draw time
    renderer = canvas.get_renderer()
    ax = fig.axes[0]
    for text in (ax.xaxis.label, ax.yaxis.label, ax.title):
        box = text.get_window_extent(renderer)
        assert box.x0 >= 0 and box.y0 >= 0, text.get_text()
        assert box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height, text.get_text()


def test_bar_given_to_the_report_replaces_the_sweep_s(swept):
    strict = build_report(swept.out, min_quality="1.0", plots=False)
    assert strict.recommended is None
    assert strict.reason.startswith("No candidate meets the bar accuracy >= 1.0000")
    assert "keep the dense model" in render_markdown(strict)
    lenient = build_report(swept.out, min_quality="0.0", plots=False)
    smallest = min(c.achieved for c in lenient.candidates[1:])
    assert lenient.recommended.achieved == smallest
    saved = json.loads((swept.out / "best.json").read_text())["best"]
    measured = [(c.method, c.budget) for c in lenient.candidates[1:] if c.size_measured]
    assert measured == [(saved["method"], saved["budget"])]  # best/ holds the sweep's choice only


def test_report_without_a_bar_says_how_to_agree_one(swept, tmp_path):
    bare = tmp_path / "sweep"
    shutil.copytree(swept.out, bare)
    (bare / "best.json").unlink()
    report = build_report(bare, plots=False)
    assert report.recommended is None and report.bar is None
    assert "--min-quality Q" in report.reason
    # how to measure: benchmark the saved best/, or (none saved) save it first or rerun with --bench
    assert f"`statprune bench {swept.model.resolve()} {bare / 'best'} " in report.measure_advice
    assert "--save-best" not in report.measure_advice
    shutil.rmtree(bare / "best")
    advice = build_report(bare, plots=False).measure_advice
    assert "rerun the sweep with `--bench`" in advice
    assert "--min-quality Q --save-best`) and measure" in advice


def test_bad_input(swept, tmp_path, capsys):
    with pytest.raises(DataError, match=r"no results\.json; give the --out folder of `statprune sweep`"):
        build_report(tmp_path)
    with pytest.raises(DataError, match="--requests-per-day needs --price-per-hour"):
        build_report(swept.out, requests_per_day=1000.0)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "results.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        build_report(broken)
    with pytest.raises(DataError, match=r"--bench .* not found"):
        build_report(swept.out, bench=tmp_path / "nope.json")
    bench = bench_file(tmp_path / "bench.json", {swept.model: (40.0, 200.0)})
    with pytest.raises(DataError, match=r"measured batch sizes \[1, 8\], not 4"):
        build_report(swept.out, bench=bench, bench_batch=4)
    with pytest.raises(OutputError, match="is a folder"):
        write_report(build_report(swept.out, plots=False), tmp_path)
    assert main(["report", str(tmp_path / "missing")]) == 1
    assert capsys.readouterr().err.strip().count("\n") == 0  # one line, no traceback
    with pytest.raises(SystemExit):
        main(["report", str(swept.out), "--price-per-hour", "-2"])


def test_cli_writes_the_page_and_its_twin(swept, tmp_path, capsys):
    out = tmp_path / "pages" / "decision.html"
    assert main(["report", str(swept.out), "--out", str(out), "--price-per-hour", "2"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("recommended: ")
    assert "no throughput was measured" in printed
    html, md = out.read_text(), out.with_suffix(".md").read_text()
    assert sorted(p.name for p in out.parent.iterdir()) == ["decision.html", "decision.md"]
    assert html.startswith("<!DOCTYPE html>") and md.startswith("# Which compressed model")
    # self-contained: no external resource of any kind
    assert not re.search(r"""(?:src|href)\s*=\s*["'](?!data:)""", html)
    assert "<script" not in html and "@import" not in html and "url(" not in html


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.querySelectorAll("img.plot")];
  document.body.dataset.plots = imgs
    .map(i => i.complete + ":" + i.naturalWidth + "x" + i.naturalHeight).join(",");
});
</script></body>"""


@pytest.mark.skipif(
    _chromium() is None,
    reason="no Chromium installed: run `make browser` (Debian: "
    "apt-get install chromium) for the real-browser check of the report",
)
def test_report_renders_in_a_real_browser(swept, tmp_path):
    from matplotlib.image import imread

    browser = _chromium()
    # measured by the sweep: one candidate's peak memory above the dense one's, one not measured
    rows = json.loads((swept.out / "results.json").read_text())
    best = json.loads((swept.out / "best.json").read_text())["best"]
    others = [i for i, r in enumerate(rows) if (r["method"], r["budget"]) != (best["method"], best["budget"])]
    reason = "it could not be loaded for onnxruntime (unsupported operator)"
    peak = {-1: 40.0, **{i: 30.0 for i in range(len(rows))}, others[0]: 44.0}
    weights = {-1: 4.0, **{i: 2.0 for i in range(len(rows))}}
    failed = {others[1]: reason}
    measured = measured_copy(swept, tmp_path, peak=peak, weights=weights, failed=failed, noise=0.4)
    report = build_report(measured, price_per_hour=3.0, requests_per_day=1e6)
    above, failed = report.candidates[1 + others[0]], report.candidates[1 + others[1]]
    assert report.memory_flagged == [above] and report.not_measured == [failed]
    page = tmp_path / "report.html"
    page.write_text(render_html(report), encoding="utf-8")
    flags = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--no-first-run",
        "--disable-extensions",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    env = {**os.environ, "HOME": str(tmp_path)}

    # the DOM after loading, with a probe (added to a copy only) recording how the images decoded
    probed = tmp_path / "probed.html"
    probed.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE), encoding="utf-8")
    dom = subprocess.run(
        [*flags, "--virtual-time-budget=5000", "--dump-dom", probed.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    ).stdout
    name = re.search(r'id="recommended-name">([^<]*)<', dom)
    assert name is not None and name.group(1) == report.recommended.name
    assert len(re.findall(r'<tr class="candidate', dom)) == len(report.candidates)
    assert re.search(
        r'<tr class="candidate recommended" data-name="' + re.escape(report.recommended.name), dom
    )
    assert "throughput in requests/s × 3600" in dom
    # the notes a reader must not miss: the peak memory that shows no saving, the failed measurement
    note = re.search(r'<p id="memory-note" class="warn">([^<]*)</p>', dom)
    assert note is not None and f"Peak memory of {above.name} is not below the dense model" in note.group(1)
    assert "0.4 MiB" in note.group(1)
    row = re.search(r'data-name="' + re.escape(above.name) + r'">(.*?)</tr>', dom, re.S)
    assert row is not None and '<td class="memory">44.0 ‡</td>' in row.group(1)
    failures = re.search(r'<div id="bench-failures" class="warn">(.*?)</div>', dom, re.S)
    assert failures is not None and f"<li>{failed.name}: {reason}</li>" in failures.group(1)
    row = re.search(r'data-name="' + re.escape(failed.name) + r'">(.*?)</tr>', dom, re.S)
    assert row is not None and '<td class="latency">not measured §</td>' in row.group(1)
    plots = re.search(r'data-plots="([^"]*)"', dom)
    assert plots is not None, "the probe did not run: the page did not finish loading"
    sizes = plots.group(1).split(",")
    assert len(sizes) == 2
    for size in sizes:  # "true:825x506": decoded, with a real size
        complete, dims = size.split(":")
        width, height = map(int, dims.split("x"))
        assert complete == "true" and width > 300 and height > 200

    shot = tmp_path / "shot.png"
    subprocess.run(
        [*flags, "--window-size=1280,1600", f"--screenshot={shot}", page.as_uri()],
        capture_output=True,
        timeout=120,
        env=env,
        check=True,
    )
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = imread(shot)[..., :3]
    assert pixels.shape[:2] == (1600, 1280)
    non_white = (pixels < 0.95).any(axis=-1).mean()
    assert 0.02 < non_white < 0.9, f"{non_white:.1%} of the screenshot is not white"
    assert not math.isclose(float(pixels.std()), 0.0)
    # the recommendation box's green and the recommended row's yellow are on screen
    colors = {tuple(round(float(c) * 255) for c in p) for p in pixels.reshape(-1, 3)[::7]}
    assert (0xEE, 0xF7, 0xEE) in colors and (0xFF, 0xF6, 0xCC) in colors


# ------------------------------------------------------------------------------ sweep --bench


def test_report_of_a_measured_sweep_prices_every_candidate(swept, tmp_path):
    """A sweep that measured latency itself (``sweep --bench``: a ``dense`` row first in
    results.json, the objective in sweep.json) gives the report latency, throughput and cost for
    every candidate and the dense model, and the same recommendation as the sweep's selection."""
    calib, data = swept.root / "calib.txt", swept.root / "eval.jsonl"
    out = tmp_path / "measured"
    result = sweep(
        swept.model,
        calib,
        data,
        budgets=[0.8, 0.5],
        methods=["stat", "magnitude"],
        min_quality="90%",
        save_best=True,  # the kept best model and the measured candidates must not collide
        out=out,
        log=None,
        bench=True,
        bench_trials=2,
        bench_batch=4,
        bench_seq_len=16,
    )
    assert result.selection.objective in (None, "latency")
    meta = json.loads((out / "sweep.json").read_text())
    assert meta["bench_setting"].startswith("batch 4 x 16 tokens")
    report = build_report(out, price_per_hour=1.0, plots=True)
    assert report.candidates[0].name == "dense"
    assert len(report.candidates) == 1 + len(result.rows)
    for cand in report.candidates:
        assert cand.latency_ms > 0 and cand.throughput > 0 and cand.cost_per_million > 0
        assert cand.cost_per_million == pytest.approx(1.0 * 1e6 / (cand.throughput * 3600))
    assert "Quality against measured latency" in report.plots
    best = result.selection.best
    assert report.recommended.name == f"{best.method} @ {best.budget:.0%}"
    assert (out / "best" / "config.json").is_file()


# ------------------------------------------------------------------ memory, a failed --bench, input


def test_objective_memory_within_noise_ranks_by_weights_and_says_so(swept, tmp_path):
    # every candidate's peak above the dense one's (the runtime dominates a tiny model): the peaks
    # rank by chance, the weights do not; the smallest weights belong to the last row
    peak = {-1: 100.0, 0: 101.0, 1: 100.5, 2: 102.0, 3: 100.8}
    weights = {-1: 40.0, 0: 30.0, 1: 20.0, 2: 35.0, 3: 12.0}
    measured = measured_copy(swept, tmp_path, peak=peak, weights=weights, noise=2.0)
    report = build_report(measured, min_quality="0", objective="memory", plots=False)
    assert report.objective == "weights"
    rows = json.loads((measured / "results.json").read_text())
    smallest = min(range(len(rows)), key=lambda i: weights[i])
    assert report.recommended is report.candidates[1 + smallest]
    assert "smallest in weights (weights 12.0 MiB)" in report.reason
    assert "Ranked by the model's weights, not its peak memory" in report.reason
    assert "leanest in peak memory" not in report.reason
    # one real saving: ranked by peak memory again
    peak[1] = 60.0
    measured = measured_copy(swept, tmp_path / "saving", peak=peak, weights=weights, noise=2.0)
    report = build_report(measured, min_quality="0", objective="memory", plots=False)
    assert report.objective == "memory" and report.recommended is report.candidates[2]


def test_a_sweep_whose_bench_measured_nothing_is_told_to_rerun_the_same_command(swept, tmp_path):
    rows = json.loads((swept.out / "results.json").read_text())
    failed = {i: "interrupted while measuring (Ctrl-C)" for i in range(-1, len(rows))}
    measured = measured_copy(swept, tmp_path, failed=failed)
    report = build_report(measured, plots=False)
    assert not report.measured
    advice = report.measure_advice
    assert "Rerun the same `statprune sweep` command" in advice and "interrupted while measuring" in advice
    assert "rerun the sweep with `--bench`" not in advice
    assert "Rerun the same `statprune sweep` command" in render_markdown(report)


def test_bench_batch_other_than_the_sweep_s_is_refused(swept, tmp_path):
    measured = measured_copy(swept, tmp_path)
    meta = json.loads((measured / "sweep.json").read_text())
    meta["bench"] = {"batch": 8, "seq_len": 128, "backend": "torch", "device": "cpu"}
    (measured / "sweep.json").write_text(json.dumps(meta))
    with pytest.raises(OptionsError, match=r"--bench-batch 32: the sweep measured batch 8 only"):
        build_report(measured, bench_batch=32, plots=False)
    assert build_report(measured, bench_batch=8, plots=False).measured
    with pytest.raises(OptionsError, match=r"has none \(no --bench, no bench\.json\); drop --bench-batch"):
        build_report(swept.out, bench_batch=8, plots=False)


def test_a_missing_folder_or_foreign_results_is_one_line(tmp_path, capsys):
    with pytest.raises(DataError, match=r"missing does not exist"):
        build_report(tmp_path / "missing")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "results.json").write_text(json.dumps([{"method": "x"}]))
    with pytest.raises(DataError) as info:
        build_report(foreign)
    message = str(info.value)
    assert "is not a sweep's results.json (its rows lack" in message and "__init__" not in message
    (foreign / "results.json").write_text(json.dumps([1, 2]))
    with pytest.raises(DataError, match="holds no sweep rows"):
        build_report(foreign)
    assert main(["report", str(foreign)]) == 1
    assert capsys.readouterr().err.strip().count("\n") == 0
