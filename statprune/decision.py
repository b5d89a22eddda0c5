"""``statprune report``: one page that answers "which compressed model do we deploy, and at what cost?".

Reads a sweep folder (``statprune sweep --out DIR``: ``results.json``, ``sweep.json``, optionally
``best.json`` and ``best/``) and, when given or present as ``DIR/bench.json``, the output of
``statprune bench --json``. Writes a self-contained HTML page (plots embedded as base64 PNG, no
network, no external CSS or JavaScript) and its Markdown twin (same tables and text, no plots),
both rendered with Jinja2 from the templates in ``statprune/templates/``.

For every candidate (the dense model first): quality with its 95 % interval (Wilson's for accuracy
and agreement, from the number of evaluation examples) and its change from dense (for accuracy,
the paired interval the sweep measured, see :func:`statprune.evaluate.paired_change_interval`),
agreement with the original, the fraction of FLOPs and parameters kept, size on disk (measured for
the dense folder and ``best/``, else estimated from the parameters kept), latency, throughput and
peak memory where measured, and, with a price, the serving cost per million requests:

    cost per 1M requests = price_per_hour × 1,000,000 / (throughput [requests/s] × 3600)

(a request = one sequence of the benchmark's length, the machine fully busy at the benchmark's
batch size). The recommended candidate is the one the sweep's ``--min-quality`` bar selected, or,
with ``--min-quality`` / ``--objective`` given here, the candidate meeting that bar with the lowest
objective (measured latency when every candidate was measured, else the fraction kept; see
:func:`statprune.sweep.select_best`). A trial spread (p90 / median) above
``statprune.bench.NOISY_SPREAD`` is a warning on the page.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import os
import textwrap
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

from statprune.errors import DataError, OptionsError, OutputError
from statprune.plot_marks import dense_line, quality_bar, selected_point

__all__ = [
    "Candidate",
    "DecisionReport",
    "add_report_parser",
    "build_report",
    "render_html",
    "render_markdown",
    "run_report",
    "write_report",
]

WEIGHT_SUFFIXES = (".safetensors", ".bin")
# a candidate keeping < 95 % of the FLOPs but measured this much slower than dense: the machine's
# load changed while measuring (a pruned model does not get slower)
SLOWER = 1.05


@dataclass
class Candidate:
    """One row of the decision table. ``None``: not measured / not applicable."""

    name: str
    method: str | None = None
    budget: float | None = None
    achieved: float | None = None
    flops_kept: float | None = None
    params_kept: float | None = None
    value: float | None = None
    interval: tuple[float, float] | None = None
    change: float | None = None
    change_interval: tuple[float, float] | None = None
    agreement: float | None = None
    kl: float | None = None
    size_bytes: int | None = None
    size_measured: bool = False
    latency_ms: float | None = None
    throughput: float | None = None  # requests (sequences) per second
    peak_memory_mb: float | None = None  # MiB (2^20 bytes), as statprune.bench measures it
    weight_mb: float | None = None  # the model's parameters and buffers, MiB (exact)
    memory_noise_mb: float | None = None  # gap of two peak measurements of the dense model, MiB
    memory_caveat: str | None = None  # "above" / "noise": the peak shows no real saving (bench.memory_caveat)
    bench_error: str | None = None  # why it was not measured (or its peak memory was not)
    spread: float | None = None  # p90 / median latency of the benchmark's trials
    cost_per_million: float | None = None
    cost_per_day: float | None = None
    meets_bar: bool | None = None
    recommended: bool = False
    error: str | None = None


@dataclass
class DecisionReport:
    """Everything the page shows; :func:`render_html` / :func:`render_markdown` only format it."""

    sweep_dir: str
    model: str
    model_dir: str | None
    task: str
    metric: str
    metric_label: str
    higher_is_better: bool
    dense_value: float
    protocol: str
    eval_examples: int | None
    budget_kind: str
    candidates: list[Candidate]
    bar: str | None = None  # e.g. "accuracy >= 0.8250 (99% of dense 0.8333)"
    threshold: float | None = None
    rule: str | None = None
    objective: str | None = None  # what the selection minimized (None: the achieved fraction kept)
    recommended: Candidate | None = None
    reason: str = ""
    price_per_hour: float | None = None
    requests_per_day: float | None = None
    bench_source: str | None = None
    bench_setting: str | None = None
    bench_by: str = "statprune bench"  # or "statprune sweep --bench"
    measured: bool = False
    bench_failure: str | None = None  # the sweep ran with --bench but measured nothing: the first reason
    warnings: list[str] = field(default_factory=list)
    plots: dict[str, str] = field(default_factory=dict)  # title -> base64 PNG

    @property
    def budget_label(self) -> str:
        """The budget kind as the page writes it: FLOPs, parameters or latency."""
        return {"flops": "FLOPs", "params": "parameters"}.get(self.budget_kind, self.budget_kind)

    @property
    def fraction_columns(self) -> list[tuple[str, str]]:
        """``(header, Candidate attribute)`` of the fractions kept the table shows: FLOPs and
        parameters, and the predicted latency for a latency budget."""
        columns = [("FLOPs kept", "flops_kept"), ("params kept", "params_kept")]
        if self.budget_kind == "latency":
            columns.append(("latency kept (predicted)", "achieved"))
        return columns

    @property
    def measure_advice(self) -> str:
        """How to get latency, throughput and memory into the page (Markdown)."""
        model = self.model_dir or "MODEL_DIR"
        best = Path(self.sweep_dir) / "best"
        if self.bench_failure is not None:  # it was run with --bench: a rerun resumes it
            return (
                f"The sweep was run with `--bench` but measured nothing ({self.bench_failure}). Rerun "
                "the same `statprune sweep` command into the same `--out`: it resumes, keeping every "
                "evaluation and measuring the candidates (each is compressed again to be measured); "
                "then run `statprune report` again."
            )
        rerun = "rerun the sweep with `--bench` (every candidate and the dense model, side by side)"
        if best.is_dir():
            return (
                f"Measure them on the serving hardware: {rerun}, or measure the saved choice with "
                f"`statprune bench {model} {best} --batch 1,8,32 --json {self.sweep_dir}/bench.json`; "
                "then run `statprune report` again."
            )
        return (
            f"Measure them on the serving hardware: {rerun}, or save the chosen model (`statprune "
            f"sweep … --min-quality Q --save-best`) and measure it with `statprune bench {model} "
            f"{best} --batch 1,8,32 --json {self.sweep_dir}/bench.json`; then run `statprune report` again."
        )

    @property
    def cost_decimals(self) -> int:
        """Decimals of every cost per 1M requests (one number for the column, see :func:`money_decimals`)."""
        return money_decimals([c.cost_per_million for c in self.candidates])

    @property
    def price_decimals(self) -> int:
        """Decimals of the price per machine-hour: as given (at least 2)."""
        return given_decimals(self.price_per_hour)

    @property
    def size_decimals(self) -> int:
        """Decimals of every size on disk (MiB): 3 significant figures for the smallest, at least 1."""
        return column_decimals([c.size_bytes / 2**20 for c in self.candidates if c.size_bytes], 1, 4)

    @property
    def weight_decimals(self) -> int:
        """Decimals of every weights figure (MiB): 3 significant figures for the smallest, at least 1."""
        return column_decimals([c.weight_mb for c in self.candidates], 1, 4)

    @property
    def latency_decimals(self) -> int:
        """Decimals of every latency (ms): 3 significant figures for the fastest, at least 1."""
        return column_decimals([c.latency_ms for c in self.candidates], 1, 4)

    @property
    def day_decimals(self) -> int:
        """Decimals of every cost per day."""
        return money_decimals([c.cost_per_day for c in self.candidates])

    @property
    def memory_flagged(self) -> list[Candidate]:
        """The candidates whose measured peak memory shows no real saving over the dense model's."""
        return [c for c in self.candidates if c.memory_caveat]

    @property
    def memory_noise(self) -> float | None:
        """The dense model's peak-memory noise (MiB), when measured."""
        return self.candidates[0].memory_noise_mb if self.candidates else None

    @property
    def memory_note(self) -> str:
        """The ‡ footnote (Markdown): which peaks show no real saving, the noise, what dominates."""
        from statprune.bench import MEMORY_RESOLUTION, weight_share

        names = ", ".join(c.name for c in self.memory_flagged)
        noise = self.memory_noise
        gap = "" if noise is None else f"{noise:,.1f} MiB between two measurements of it, "
        text = (
            f"‡ Peak memory of {names} is not below the dense model's, or below it by less than the "
            f"measurement noise ({gap}at least {MEMORY_RESOLUTION:.0%} of its peak). Peak resident "
            "memory also counts the runtime's own allocations (allocator arenas, kernels, thread pools), "
            "which outweigh the weights of a small model: compare the weights column."
        )
        dense = self.candidates[0]
        share = weight_share(dense.weight_mb, dense.peak_memory_mb)
        return text + (f" For the dense model, {share}." if share else "")

    @property
    def not_measured(self) -> list[Candidate]:
        """The candidates (evaluated) whose measurement failed, with the reason in ``bench_error``."""
        return [c for c in self.candidates if c.bench_error and c.error is None]

    @property
    def cost_formula(self) -> str:
        return (
            "cost per 1M requests = price per hour × 1,000,000 / (throughput in requests/s × 3600); "
            "requests per day × that / 1,000,000 = cost per day"
        )


# ------------------------------------------------------------------------- measuring a sweep's runs


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno}); {what}") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None


def _weight_bytes(folder: Path) -> int | None:
    if not folder.is_dir():
        return None
    sizes = [p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)]
    return sum(sizes) if sizes else None


def _attention_ffn_share(model_dir: Path) -> float | None:
    """Attention+FFN parameters / all parameters of the base model, from its config (meta device:
    no weights are read). None when the folder or the family is unsupported."""
    try:
        import torch
        import transformers

        from statprune.adapters import adapter_for
        from statprune.flops import dense_counts, model_shapes, total_cost

        config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
        adapter = adapter_for(config)
        with torch.device("meta"):
            model = transformers.AutoModel.from_config(config)
        shapes = model_shapes(adapter, model.base_model)
        total = sum(p.numel() for p in model.parameters())
        return total_cost(shapes, dense_counts(shapes), "params", 1) / total if total else None
    except Exception:  # an estimate only: a model we cannot rebuild just gets no estimate
        return None


def _count(n: int, noun: str) -> str:
    """``1 thread``, ``2 threads``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _bench_rows(path: Path, batch: int | None) -> tuple[dict[str, dict], str]:
    """``statprune bench --json`` forward rows at ``batch`` (default: the largest), by resolved folder."""
    data = _read_json(path, "give the file `statprune bench --json` wrote")
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise DataError(f"{path} has no benchmark rows; give the file `statprune bench --json` wrote")
    forward = [r for r in rows if isinstance(r, dict) and r.get("kind") == "forward"]
    if not forward:
        raise DataError(f"{path} has no forward measurements; rerun `statprune bench` on the folders")
    batches = sorted({int(r["batch"]) for r in forward})
    chosen = batches[-1] if batch is None else batch
    if chosen not in batches:
        raise DataError(f"{path} measured batch sizes {batches}, not {batch}; pass one of those")
    picked = {str(Path(r["model"]).expanduser().resolve()): r for r in forward if int(r["batch"]) == chosen}
    first = next(iter(picked.values()))
    setting = (
        f"batch {chosen}, {first.get('seq_len')} tokens per request, {first.get('backend')} on "
        f"{first.get('device')}"
        + (f" ({_count(first['threads'], 'thread')})" if first.get("threads") else "")
        + f", median of {first.get('trials')} interleaved trials"
    )
    return picked, setting


def _older_than(measurements: Path, folder: Path) -> bool:
    """Whether the file ``measurements`` was written before the newest file of ``folder`` (it
    then measured an earlier model saved there)."""
    newest = max((p.stat().st_mtime for p in folder.rglob("*") if p.is_file()), default=0.0)
    return measurements.stat().st_mtime < newest


def _interval(metric: str, value: float | None, n: int | None) -> tuple[float, float] | None:
    from statprune.evaluate import wilson_interval

    if value is None or not n or metric not in ("accuracy", "agreement"):
        return None
    return wilson_interval(round(value * n), n)


def build_report(
    sweep_dir: str | Path,
    *,
    price_per_hour: float | None = None,
    requests_per_day: float | None = None,
    bench: str | Path | None = None,
    bench_batch: int | None = None,
    min_quality: str | None = None,
    objective: str | None = None,
    plots: bool = True,
) -> DecisionReport:
    """Gather a sweep folder's results into a :class:`DecisionReport`.

    ``bench`` is a ``statprune bench --json`` file (default ``SWEEP_DIR/bench.json`` when present)
    measuring the dense folder and/or ``SWEEP_DIR/best``; its forward rows at ``bench_batch``
    (default: the largest batch) give latency (ms, median), throughput (requests/s) and peak memory
    (MB). Rows of ``results.json`` that carry ``latency_ms`` / ``throughput`` / ``peak_memory_mb``
    (and optionally ``latency_p90_ms``), and ``sweep.json``'s ``dense_bench`` with the same keys, are
    used as they are (the contract for a sweep that benchmarks its candidates itself); they take
    precedence over the bench file. ``price_per_hour`` (any currency per machine-hour) and
    ``requests_per_day`` add the serving cost. ``min_quality`` (``0.80`` or ``99%``) replaces the
    sweep's bar; ``objective`` (``latency``, ``flops``, ``params``, ``memory``) what the
    recommendation minimizes among the candidates meeting it (default: the sweep's, else measured
    latency when every candidate was measured, else the achieved fraction kept; given alone, it
    re-selects under the sweep's bar). Raises DataError for a folder that is not a sweep's output
    or bad numbers, OptionsError for a bar or objective that cannot apply.
    """
    from statprune.bench import NOISY_SPREAD, memory_caveat
    from statprune.sweep import (
        OBJECTIVES,
        SweepRow,
        _check_bar,
        meets,
        memory_ranking,
        metric_label,
        parse_min_quality,
        select_best,
        selection_rule,
    )

    if objective is not None and objective not in OBJECTIVES:
        raise OptionsError(f"--objective must be one of {', '.join(OBJECTIVES)}, not {objective!r}")
    bar = None if min_quality is None else parse_min_quality(min_quality)  # before reading anything

    sweep_dir = Path(sweep_dir)
    results_path = sweep_dir / "results.json"
    if not sweep_dir.exists():
        raise DataError(f"{sweep_dir} does not exist; give the --out folder of `statprune sweep`")
    if not sweep_dir.is_dir():
        raise DataError(f"{sweep_dir} is not a folder; give the --out folder of `statprune sweep`")
    if not results_path.is_file():
        raise DataError(f"{sweep_dir} has no results.json; give the --out folder of `statprune sweep`")
    for name, value in (("--price-per-hour", price_per_hour), ("--requests-per-day", requests_per_day)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise DataError(f"{name} must be a positive number, got {value}")
    if requests_per_day is not None and price_per_hour is None:
        raise DataError("--requests-per-day needs --price-per-hour P (the cost of one machine-hour)")
    raw_rows = _read_json(results_path, "rerun the sweep")
    if not isinstance(raw_rows, list) or not all(isinstance(r, dict) for r in raw_rows):
        raise DataError(f"{results_path} holds no sweep rows; rerun the sweep")
    # `sweep --bench` puts the dense model's measurements first, as a row of method "dense"
    dense_rows = [r for r in raw_rows if r.get("method") == "dense"]
    raw_rows = [r for r in raw_rows if r.get("method") != "dense"]
    if not raw_rows:
        raise DataError(f"{results_path} holds no sweep rows; rerun the sweep")
    fields = set(SweepRow.__dataclass_fields__)
    required = [
        n
        for n, f in SweepRow.__dataclass_fields__.items()
        if f.default is MISSING and f.default_factory is MISSING
    ]
    missing = sorted({n for r in raw_rows for n in required if n not in r})
    if missing:
        raise DataError(
            f"{results_path} is not a sweep's results.json (its rows lack {', '.join(missing)}); "
            "give the --out folder of `statprune sweep`, or rerun the sweep"
        )
    try:
        rows = [SweepRow(**{k: v for k, v in r.items() if k in fields}) for r in raw_rows]
    except TypeError:
        raise DataError(f"{results_path} is not a sweep's results.json; rerun the sweep") from None
    meta_path = sweep_dir / "sweep.json"
    meta = _read_json(meta_path, "rerun the sweep") if meta_path.is_file() else {}
    if dense_rows and not meta.get("dense_bench"):
        meta = {**meta, "dense_bench": dense_rows[0]}
    best_path = sweep_dir / "best.json"
    best = _read_json(best_path, "rerun the sweep") if best_path.is_file() else None

    first = rows[0]
    metric = first.metric
    higher = meta.get("higher_is_better", metric != "perplexity")
    dense_value = float(first.dense_value)
    n = meta.get("eval_examples")
    report = DecisionReport(
        sweep_dir=str(sweep_dir.resolve()),
        model=meta.get("model", first.model),
        model_dir=meta.get("model_dir"),
        task=first.task,
        metric=metric,
        metric_label=metric_label(metric),
        higher_is_better=higher,
        dense_value=dense_value,
        protocol=(
            meta.get("protocol") or "not recorded (a sweep older than sweep.json; rerun it)"
        ).removeprefix("Protocol: "),
        eval_examples=n,
        budget_kind=first.budget_kind,
        candidates=[],
        price_per_hour=price_per_hour,
        requests_per_day=requests_per_day,
    )
    if not meta:
        report.warnings.append("sweep.json is missing: no protocol and no intervals; rerun the sweep")

    # --- the bar and the recommendation
    methods = meta.get("methods") or list(dict.fromkeys(r.method for r in rows))
    chosen: SweepRow | None = None
    closest: SweepRow | None = None
    saved_best = (best or {}).get("best") or {}
    saved_key = (saved_best.get("method"), saved_best.get("budget")) if best and best.get("saved") else None
    if bar is None and objective is not None:
        if best is None or not best.get("min_quality"):
            raise OptionsError("--objective needs a bar: pass --min-quality Q (0.80, or 99% of dense)")
        bar = parse_min_quality(best["min_quality"])  # re-select under the sweep's bar
    if bar is not None:
        if metric in ("accuracy", "agreement", "cosine", "perplexity"):
            _check_bar(bar, metric)
        report.threshold = bar.threshold(dense_value, higher)
        report.bar = bar.describe(metric, dense_value, higher)
        report.objective = _objective(rows, objective, meta.get("objective"))
        if report.objective == "memory":  # peaks that differ by noise only: ranked by the weights
            dense_meta = meta.get("dense_bench") or {}
            noise = (meta.get("bench") or {}).get("memory_noise_mb") or dense_meta.get("memory_noise_mb")
            report.objective = memory_ranking(rows, dense_meta.get("peak_memory_mb"), noise)
        chosen, closest = select_best(rows, report.threshold, higher, methods, report.objective)
        report.rule = selection_rule(report.objective)
    elif best is not None:
        report.threshold = best.get("threshold")
        sign = ">=" if higher else "<="
        report.bar = (
            f"{metric} {sign} {_fmt(metric, report.threshold)} (--min-quality {best.get('min_quality')})"
        )
        report.rule = best.get("rule")
        report.objective = None if best.get("objective") in (None, "achieved") else best["objective"]
        picked = best.get("best")
        key = None if picked is None else (picked.get("method"), picked.get("budget"))
        chosen = next((r for r in rows if (r.method, r.budget) == key), None)
        if chosen is None:
            close = best.get("closest") or {}
            closest = next(
                (r for r in rows if (r.method, r.budget) == (close.get("method"), close.get("budget"))), None
            )
    if report.rule is None and report.bar is not None:
        from statprune.sweep import SELECTION_RULE

        report.rule = SELECTION_RULE

    # --- sizes, measurements
    model_dir = Path(meta["model_dir"]) if meta.get("model_dir") else None
    dense_bytes = _weight_bytes(model_dir) if model_dir is not None else None
    share = _attention_ffn_share(model_dir) if dense_bytes is not None else None
    best_dir = sweep_dir / "best"
    measurements: dict[str, dict] = {}
    bench_path = Path(bench) if bench is not None else sweep_dir / "bench.json"
    if bench is not None and not bench_path.is_file():
        raise DataError(f"--bench {bench_path} not found; give the file `statprune bench --json` wrote")
    swept = meta.get("bench") if isinstance(meta.get("bench"), dict) else {}
    if bench_path.is_file():
        measurements, report.bench_setting = _bench_rows(bench_path, bench_batch)
        report.bench_source = str(bench_path)
    elif bench_batch is not None:  # it picks a batch of a bench file; the sweep measured one batch
        if swept.get("batch") is None:
            raise OptionsError(
                f"--bench-batch {bench_batch} picks the measurements of a `statprune bench --json` file, "
                f"and {sweep_dir} has none (no --bench, no bench.json); drop --bench-batch"
            )
        if int(swept["batch"]) != bench_batch:
            raise OptionsError(
                f"--bench-batch {bench_batch}: the sweep measured batch {swept['batch']} only "
                f"(sweep --bench-batch {swept['batch']}); drop --bench-batch, or rerun the sweep with "
                f"--bench-batch {bench_batch}"
            )
    if not bench_path.is_file() and meta.get("bench_setting"):
        report.bench_setting, report.bench_by = meta["bench_setting"], "statprune sweep --bench"

    dense = Candidate(
        "dense",
        achieved=1.0,
        flops_kept=1.0,
        params_kept=1.0,
        value=dense_value,
        interval=_interval(metric, dense_value, n),
        change=0.0,
        agreement=1.0 if first.agreement is not None or metric == "agreement" else None,
        size_bytes=dense_bytes,
        size_measured=dense_bytes is not None,
        meets_bar=None if report.threshold is None else meets(dense_value, report.threshold, higher),
    )
    if model_dir is not None:
        _attach(dense, measurements.get(str(model_dir.resolve())))
    _attach(dense, meta.get("dense_bench"))  # a sweep that measured latency itself
    report.candidates.append(dense)
    for row in rows:
        cand = Candidate(
            f"{row.method} @ {row.budget:.0%}",
            method=row.method,
            budget=row.budget,
            achieved=row.achieved,
            flops_kept=row.flops_kept,
            params_kept=row.params_kept,
            value=row.value,
            interval=_interval(metric, row.value, n),
            change=None if row.value is None else row.value - dense_value,
            change_interval=tuple(row.change_interval) if row.change_interval else None,
            agreement=row.agreement,
            kl=row.kl,
            error=row.error,
            meets_bar=None if report.threshold is None else meets(row.value, report.threshold, higher),
        )
        if metric == "agreement" and cand.interval is not None:
            cand.change_interval = (cand.interval[0] - 1.0, cand.interval[1] - 1.0)
        if row is chosen:
            cand.recommended = True
            report.recommended = cand
        if (row.method, row.budget) == saved_key:  # the sweep saved this one into best/
            saved = _weight_bytes(best_dir)
            if saved is not None:
                cand.size_bytes, cand.size_measured = saved, True
            measured = measurements.get(str(best_dir.resolve()))
            if measured is not None and _older_than(bench_path, best_dir):
                report.warnings.append(
                    f"{bench_path.name} is older than {best_dir.name}/ (a later sweep saved another model "
                    f"there): its measurements of {best_dir.name}/ are not shown; measure it again with "
                    f"`statprune bench {model_dir} {best_dir} --json {bench_path}`"
                )
                measured = None
            _attach(cand, measured)
        if (
            cand.size_bytes is None
            and dense_bytes is not None
            and share is not None
            and row.params_kept is not None
        ):
            cand.size_bytes = round(dense_bytes * (1.0 - (1.0 - row.params_kept) * share))
        _attach(cand, raw_rows[rows.index(row)])  # a sweep that measured latency itself
        report.candidates.append(cand)

    swept_bench = meta.get("bench") if isinstance(meta.get("bench"), dict) else {}
    sweep_noise = swept_bench.get("memory_noise_mb")
    if dense.memory_noise_mb is None and sweep_noise is not None:
        dense.memory_noise_mb = float(sweep_noise)
    for cand in report.candidates[1:]:
        cand.memory_caveat = memory_caveat(cand.peak_memory_mb, dense.peak_memory_mb, dense.memory_noise_mb)
    for cand in report.candidates:
        if cand.throughput and price_per_hour is not None:
            cand.cost_per_million = price_per_hour * 1e6 / (cand.throughput * 3600.0)
            if requests_per_day is not None:
                cand.cost_per_day = cand.cost_per_million * requests_per_day / 1e6
    noisy = [c for c in report.candidates if c.spread is not None and c.spread > NOISY_SPREAD]
    if noisy:
        worst = ", ".join(f"{c.name} {c.spread:.2f}×" for c in noisy)
        report.warnings.append(
            f"noisy machine: the latency trials of {len(noisy)} of "
            f"{sum(c.spread is not None for c in report.candidates)} measured models spread widely "
            f"(90th percentile / median above {NOISY_SPREAD}: {worst}); the latencies and the ranking "
            "by them are not reliable — rerun on an idle machine (`statprune sweep --bench` or "
            "`statprune bench`) before deciding"
        )
    dense_ms = report.candidates[0].latency_ms
    slower = [
        c
        for c in report.candidates[1:]
        if dense_ms and c.latency_ms and (c.flops_kept or 1.0) < 0.95 and c.latency_ms > SLOWER * dense_ms
    ]
    if slower:
        names = ", ".join(f"{c.name} {c.latency_ms / dense_ms:.2f}×" for c in slower)
        report.warnings.append(
            f"inconsistent latencies: {names} the dense latency while keeping less compute; the "
            "machine's load changed during the measurement — rerun on an idle machine before deciding"
        )
    report.measured = any(c.latency_ms is not None for c in report.candidates)
    if not report.measured and (isinstance(meta.get("bench"), dict) or report.bench_by != "statprune bench"):
        reasons = [c.bench_error for c in report.candidates if c.bench_error]
        report.bench_failure = reasons[0] if reasons else "no measurement was recorded"
    if price_per_hour is not None and not any(c.cost_per_million is not None for c in report.candidates):
        report.warnings.append("a price was given but no throughput was measured: no cost can be computed")
    report.reason = _reason(report, chosen, closest, dense)
    if plots:
        report.plots = _plots(report)
    return report


def _objective(rows: list, given: str | None, swept: str | None) -> str | None:
    """What the recommendation minimizes: ``given`` (``--objective`` here), else the sweep's
    objective, else measured latency when every evaluated candidate has it, else None (the
    achieved fraction of the budget kind). A given objective that some candidate lacks (latency or
    memory not measured) is an ``OptionsError``; the sweep's falls back to the default."""
    valued = [r for r in rows if r.value is not None]

    def everywhere(objective: str) -> bool:
        return bool(valued) and all(r.objective(objective) is not None for r in valued)

    if given is not None:
        if not everywhere(given):
            missing = sum(r.objective(given) is None for r in valued)
            raise OptionsError(
                f"--objective {given}: {missing} of {len(valued)} candidates were not measured; rerun "
                "the sweep with --bench, or choose --objective flops or params"
            )
        return given
    if swept not in (None, "achieved") and everywhere(swept):
        return swept
    return "latency" if everywhere("latency") else None


def _attach(cand: Candidate, row: dict | None) -> None:
    if not row:
        return
    if row.get("bench_error"):
        cand.bench_error = str(row["bench_error"])
    for name in ("weight_mb", "memory_noise_mb"):
        if row.get(name) is not None:
            setattr(cand, name, float(row[name]))
    latency, p90 = row.get("latency_ms"), row.get("latency_p90_ms")
    if latency is not None:
        cand.latency_ms = float(latency)
        if p90 is not None and latency > 0:
            cand.spread = float(p90) / float(latency)
    if row.get("throughput") is not None and (row.get("unit") or "seq/s") == "seq/s":
        cand.throughput = float(row["throughput"])
    if row.get("peak_memory_mb") is not None:
        cand.peak_memory_mb = float(row["peak_memory_mb"])


_SUPERLATIVES = {
    None: "smallest",
    "latency": "fastest",
    "flops": "cheapest in FLOPs",
    "params": "smallest in parameters",
    "memory": "leanest in peak memory",
    "weights": "smallest in weights",
}


def _objective_value(report: DecisionReport, cand: Candidate) -> float | None:
    return {
        None: cand.achieved,
        "latency": cand.latency_ms,
        "flops": cand.flops_kept,
        "params": cand.params_kept,
        "memory": cand.peak_memory_mb,
        "weights": cand.weight_mb,
    }[report.objective]


def _objective_text(report: DecisionReport, cand: Candidate) -> str:
    value = _objective_value(report, cand)
    if value is None:
        return "not measured"
    if report.objective == "latency":
        return f"{value:.{report.latency_decimals}f} ms"
    if report.objective == "memory":
        return f"peak {value:,.1f} MiB"
    if report.objective == "weights":
        return f"weights {value:,.{report.weight_decimals}f} MiB"
    kind = {"flops": "FLOPs", "params": "parameters"}.get(report.objective or "", report.budget_label)
    if report.objective is None and report.budget_kind == "latency":  # the lookup tables' figure
        return f"predicted to keep {value:.1%} of the dense latency"
    return f"keeps {value:.1%} of the {kind}"


def _names(cands: list[Candidate], detail) -> str:
    return ", ".join(f"{c.name} ({detail(c)})" for c in cands)


def _reason(report: DecisionReport, chosen, closest, dense: Candidate) -> str:
    """The recommendation in a few sentences: which candidate, by which objective, against which
    bar, its quality (with intervals), and why each other candidate loses."""
    metric = report.metric
    if report.bar is None:
        return (
            "No quality bar was agreed: pass --min-quality Q here (an absolute value such as 0.80, "
            "or a share of the dense quality such as 99%), or rerun the sweep with it."
        )
    if chosen is None:
        text = f"No candidate meets the bar {report.bar}: keep the dense model"
        if closest is not None:
            text += (
                f"; the closest is {closest.method} @ {closest.budget:.0%} with {metric} "
                f"{_fmt(metric, closest.value)}, "
                + ("predicted to keep " if report.budget_kind == "latency" else "keeping ")
                + f"{closest.achieved:.1%} of the dense {report.budget_label}"
            )
        return text + "."
    rec = report.recommended
    assert rec is not None
    others = [c for c in report.candidates[1:] if c is not rec]
    failed = [c for c in others if c.error is not None or c.value is None]
    below = [c for c in others if c not in failed and not c.meets_bar]
    passing = [c for c in others if c not in failed and c.meets_bar]
    if passing:
        text = (
            f"{rec.name} is the {_SUPERLATIVES[report.objective]} ({_objective_text(report, rec)}) of "
            f"the {len(passing) + 1} candidates that meet the bar {report.bar}."
        )
    else:
        text = (
            f"{rec.name} is the only candidate that meets the bar {report.bar} "
            f"({_objective_text(report, rec)})."
        )
    if report.objective == "weights":
        text += (
            " Ranked by the model's weights, not its peak memory (--objective memory): no "
            "candidate's peak memory is below the dense model's by more than the measurement noise."
        )
    elif report.objective == "memory" and rec.memory_caveat:
        text += (
            " Its peak memory is "
            + (
                "not below the dense model's"
                if rec.memory_caveat == "above"
                else "below the dense model's only by noise"
            )
            + " (‡)."
        )
    text += f" Its {metric} is {_fmt(metric, rec.value)}"
    if rec.interval is not None:
        text += f" (95% CI {_fmt(metric, rec.interval[0])}–{_fmt(metric, rec.interval[1])})"
    text += f", {_signed(metric, rec.change)} from dense"
    if rec.change_interval is not None:
        low, high = rec.change_interval
        text += f" (95% CI {_signed(metric, low)} to {_signed(metric, high)})"
    if rec.agreement is not None and metric != "agreement":
        text += f"; it agrees with the original on {rec.agreement:.1%} of the examples"
    text += "."
    if rec.latency_ms is not None and dense.latency_ms is not None:
        text += (
            f" Measured latency {rec.latency_ms:.{report.latency_decimals}f} ms against "
            f"{dense.latency_ms:.{report.latency_decimals}f} ms dense "
            f"(speed-up {dense.latency_ms / rec.latency_ms:.2f}×)."
        )
    if rec.cost_per_million is not None and dense.cost_per_million is not None:
        digits = report.cost_decimals
        text += (
            f" Serving cost {money(rec.cost_per_million, digits)} per 1M requests against "
            f"{money(dense.cost_per_million, digits)} dense."
        )
    losers = []
    if passing:
        losers.append(f"meet the bar but cost more: {_names(passing, lambda c: _objective_text(report, c))}")
    if below:
        losers.append(f"miss the bar: {_names(below, lambda c: f'{metric} {_fmt(metric, c.value)}')}")
    if failed:
        losers.append(f"could not be compressed: {', '.join(c.name for c in failed)}")
    if losers:
        text += " The others " + "; ".join(losers) + "."
    if rec.interval is not None and report.threshold is not None:
        low, high = rec.interval
        short = low < report.threshold if report.higher_is_better else high > report.threshold
        if short:
            text += (
                f" Caution: its 95% interval reaches past the bar — with {report.eval_examples} "
                "evaluation examples the margin is within noise; evaluate on more examples before "
                "committing."
            )
    return text


def _fmt(metric: str, value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.2f}" if metric == "perplexity" else f"{value:.4f}"


def column_decimals(values, minimum: int = 2, maximum: int = 6) -> int:
    """Decimals that show the smallest of ``values`` with 3 significant figures (at least
    ``minimum``, at most ``maximum``), so that a column has one precision for every row."""
    small = [abs(v) for v in values if v is not None and v != 0 and math.isfinite(v)]
    if not small:
        return minimum
    return int(min(maximum, max(minimum, 2 - math.floor(math.log10(min(small))))))


def money_decimals(values) -> int:
    """Decimals of a column of money amounts (:func:`column_decimals`, at least 2)."""
    return column_decimals(values, 2)


def given_decimals(value: float | None) -> int:
    """Decimals that show a given amount (a price) exactly, at least 2 and at most 6."""
    for digits in range(2, 6):
        if value is None or round(value, digits) == value:
            return digits
    return 6


def money(value: float | None, decimals: int = 2) -> str:
    """An amount of money with thousands separators and ``decimals`` decimals (``—`` for None)."""
    return "—" if value is None else f"{value:,.{decimals}f}"


def _signed(metric: str, value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:+.2f}" if metric == "perplexity" else f"{value:+.4f}"


# ------------------------------------------------------------------------------------------ plots


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _plots(report: DecisionReport) -> dict[str, str]:
    """Quality against fraction kept (intervals as error bars), and against measured latency."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    metric = report.metric
    out = {}
    fig = Figure(figsize=(7.5, 4.6), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    methods = list(dict.fromkeys(c.method for c in report.candidates if c.method))
    for i, method in enumerate(methods):
        points = sorted(
            (c.achieved, c.value, c.interval)
            for c in report.candidates
            if c.method == method and c.value is not None and c.achieved is not None
        )
        if not points:
            continue
        xs = [p[0] for p in points]
        ys = [p[1] for p in points]
        err = None
        if all(p[2] is not None for p in points):
            err = [
                [y - p[2][0] for y, p in zip(ys, points, strict=True)],
                [p[2][1] - y for y, p in zip(ys, points, strict=True)],
            ]
        ax.errorbar(xs, ys, yerr=err, marker="osD^v<>p"[i % 8], capsize=3, linewidth=1.6, label=method)
    dense_line(ax, report.dense_value, f"dense ({_fmt(metric, report.dense_value)})")
    if report.threshold is not None:
        quality_bar(ax, report.threshold, f"bar ({_fmt(metric, report.threshold)})")
    rec = report.recommended
    if rec is not None:
        selected_point(ax, rec.achieved, rec.value, f"recommended: {rec.name}")
    achieved = [c.achieved for c in report.candidates if c.achieved is not None and c.value is not None]
    ax.set_xlim(max(0.0, min(achieved, default=0.0) - 0.05), 1.02)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    if report.budget_kind == "latency":
        ax.set_xlabel("latency kept (predicted by the lookup tables, fraction of dense)")
    else:
        ax.set_xlabel(f"{report.budget_label} kept (attention+FFN, fraction of dense)")
    ax.set_ylabel(report.metric_label)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(f"{report.model}: quality against size (bars: 95% intervals)", fontsize=10)
    out["Quality against the fraction kept"] = _png(fig)

    fig = _latency_figure(report)
    if fig is not None:
        out["Quality against measured latency"] = _png(fig)
    return out


def _latency_figure(report: DecisionReport):
    """Quality against measured latency (a matplotlib ``Figure``; None with fewer than two models
    measured): every measured candidate annotated, the recommended one starred, the bar dotted."""
    from matplotlib.figure import Figure

    timed = [c for c in report.candidates if c.latency_ms is not None and c.value is not None]
    if len(timed) < 2:
        return None
    fig = Figure(figsize=(7.5, 4.6), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    for c in timed:
        if c.recommended:
            selected_point(ax, c.latency_ms, c.value)
        else:
            ax.plot([c.latency_ms], [c.value], linestyle="none", marker="o", markersize=7)
        ax.annotate(c.name, (c.latency_ms, c.value), textcoords="offset points", xytext=(6, 4), fontsize=8)
    if report.threshold is not None:
        quality_bar(ax, report.threshold, "bar")
        ax.legend(fontsize=8)
    # the setting on a wrapped second line: one long label would run past the figure's edge
    setting = textwrap.fill(f"({report.bench_setting})", 90) if report.bench_setting else ""
    ax.set_xlabel(f"measured latency (ms)\n{setting}".strip())
    ax.set_ylabel(report.metric_label)
    ax.margins(x=0.15, y=0.12)  # room for the names written right of the points
    ax.grid(True, alpha=0.3)
    corner = "upper left" if report.higher_is_better else "lower left"
    ax.set_title(f"{report.model}: quality against measured latency ({corner} is better)", fontsize=10)
    return fig


# -------------------------------------------------------------------------------------- rendering


def _environment():
    from jinja2 import Environment, PackageLoader, StrictUndefined

    env = Environment(
        loader=PackageLoader("statprune", "templates"),
        undefined=StrictUndefined,
        autoescape=lambda name: bool(name and name.endswith(".html.j2")),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["md"] = _inline_markdown
    env.filters["metric"] = lambda v, metric: _fmt(metric, v)
    env.filters["signed"] = lambda v, metric: _signed(metric, v)
    env.filters["pct"] = lambda v: "—" if v is None else f"{v:.1%}"
    env.filters["size"] = _size
    env.filters["num"] = lambda v, digits=1: "—" if v is None else f"{v:,.{digits}f}"
    env.filters["money"] = money
    return env


def _inline_markdown(text: str):
    """A Markdown fragment (``code``, **bold**) as HTML for the page (markdown-it-py, CommonMark;
    raw HTML in the text is escaped, not passed through)."""
    from markdown_it import MarkdownIt
    from markupsafe import Markup

    return Markup(MarkdownIt("commonmark", {"html": False}).renderInline(str(text)))


def _size(cand: Candidate, decimals: int = 1) -> str:
    if cand.size_bytes is None:
        return "—"
    text = f"{cand.size_bytes / 2**20:,.{decimals}f} MiB"  # the unit of the memory columns
    return text if cand.size_measured else f"≈ {text}"


def _context(report: DecisionReport) -> dict[str, Any]:
    from statprune import __version__

    return {"r": report, "version": __version__}


def render_html(report: DecisionReport) -> str:
    """The self-contained HTML page (UTF-8 text)."""
    return _environment().get_template("report.html.j2").render(**_context(report))


def render_markdown(report: DecisionReport) -> str:
    """The Markdown twin: the same protocol, tables, recommendation and formula, without plots."""
    return _environment().get_template("report.md.j2").render(**_context(report))


def write_report(report: DecisionReport, out: str | Path) -> tuple[Path, Path]:
    """Write ``out`` (HTML) and its twin (same name, ``.md``), each atomically; returns both paths."""
    out = Path(out)
    if out.is_dir():
        raise OutputError(f"--out {out} is a folder; give a file name such as {out / 'report.html'}")
    md = out.with_suffix(".md")
    if md == out:
        raise OutputError(f"--out {out} must end in .html (the Markdown twin goes next to it as .md)")
    pages = [(out, render_html(report)), (md, render_markdown(report))]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        for path, text in pages:
            tmp = path.with_name(f".{path.name}.tmp")
            try:
                tmp.write_text(text, encoding="utf-8")
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot write {out}: {exc.strerror or exc}") from None
    return out, md


# ------------------------------------------------------------------------------------------- CLI


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def add_report_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``report`` command to an ``add_subparsers()`` object; returns its parser."""
    from statprune.argtypes import positive_int

    p = subparsers.add_parser(
        "report",
        help="a decision page (HTML + Markdown) from a sweep: quality, cost, recommendation",
        description="Read a sweep folder (and a `statprune bench --json` file, if any) and write one "
        "self-contained HTML page and its Markdown twin.",
    )
    p.add_argument("sweep_dir", type=Path, help="the --out folder of `statprune sweep`")
    p.add_argument(
        "--out",
        type=Path,
        help="HTML file to write (default: SWEEP_DIR/report.html; the Markdown twin gets the .md suffix)",
    )
    p.add_argument(
        "--price-per-hour",
        type=_positive_float,
        metavar="P",
        help="price of one machine-hour (any currency): adds the serving cost",
    )
    p.add_argument(
        "--requests-per-day",
        type=_positive_float,
        metavar="R",
        help="with --price-per-hour: adds the cost per day",
    )
    p.add_argument(
        "--bench",
        type=Path,
        metavar="BENCH.json",
        help="`statprune bench --json` output for the dense folder and SWEEP_DIR/best "
        "(default: SWEEP_DIR/bench.json when present)",
    )
    p.add_argument(
        "--bench-batch",
        type=positive_int,
        help="batch size of the measurements to use (default: the largest measured)",
    )
    p.add_argument(
        "--min-quality",
        metavar="Q",
        help="the agreed bar, replacing the sweep's: an absolute value (0.80) or a share of the dense "
        "quality (99%%)",
    )
    p.add_argument(
        "--objective",
        choices=("latency", "flops", "params", "memory"),
        help="what the recommendation minimizes among the candidates meeting the bar (default: the "
        "sweep's; else measured latency when every candidate was measured, else the fraction kept)",
    )
    return p


def run_report(args: argparse.Namespace) -> int:
    """The ``report`` command."""
    report = build_report(
        args.sweep_dir,
        price_per_hour=args.price_per_hour,
        requests_per_day=args.requests_per_day,
        bench=args.bench,
        bench_batch=args.bench_batch,
        min_quality=args.min_quality,
        objective=args.objective,
    )
    html, md = write_report(report, args.out or Path(args.sweep_dir) / "report.html")
    print(f"recommended: {report.recommended.name if report.recommended else 'none'} — {report.reason}")
    for warning in report.warnings:
        print(f"warning: {warning}")
    print(f"wrote {html} and {md}")
    return 0
