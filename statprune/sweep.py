"""``statprune sweep``: compress at several budgets with several methods, to pick a budget up front.

The model loads once and the dense model is evaluated once (the reference line). Then, for each
method and budget, a fresh copy is compressed on the same calibration sample and evaluated on the
evaluation data against the dense model. The primary metric is accuracy when the evaluation data
has labels (``classify``), else top-1 agreement with the dense model (unlabelled ``classify``),
perplexity (``lm``, lower is better) or the mean cosine similarity of the embeddings to the dense
ones (``embed``).

Output (written atomically: the folder appears complete or not at all):

* ``results.json``: one row per run (see :class:`SweepRow`).
* ``results.md``: a protocol line and a table, budgets by methods, with the dense reference.
* ``plot.png``: quality against the achieved fraction kept, one line per method, dense dashed.
* ``plot_latency.png`` (with ``--bench``): quality against measured latency, one line per method,
  the dense point and the quality bar marked.
* ``best.json`` (with ``--min-quality``): the selected configuration, or ``null`` and the closest.
* ``best/`` (with ``--save-best``): the selected model as a normal statprune folder.

With ``--bench`` every candidate and the dense model are measured side by side with
``statprune bench``'s machinery (``statprune.bench.benchmark``: warm-up, interleaved trials,
medians, peak memory in a child process) at ``--bench-batch`` × ``--bench-seq-len`` on
``--backend``; the rows gain ``latency_ms`` (median), ``latency_p90_ms``, ``throughput`` (``unit``
seq/s), ``peak_memory_mb`` and ``latency_fraction`` (of the dense latency), and ``results.json``
gains a ``dense`` row. A trial spread (p90 / median) above ``bench.NOISY_SPREAD`` is warned about.
Memory is in MiB; next to the peak (``peak_memory_mb``) each row has ``weight_mb`` (its parameters
and buffers, exact), and a peak that is not below the dense one, or only by less than the noise
(two measurements of the dense model), gets a footnote in the table instead of passing silently.

A model that cannot be measured (it fails to load or run on the backend, its memory-measuring
child process dies) does not cost the sweep: its row keeps its compression and evaluation, gets
``bench_error`` (the reason) and empty latency fields, and the others are measured. Ctrl-C while
measuring writes everything finished, likewise marked, then stops. The sweep exits non-zero
(``MeasurementError``, after writing the results) only when no model at all could be measured.

Resuming: rerunning the same command into the same ``--out`` (no ``--overwrite``) keeps the
finished runs of the earlier one (``sweep.json``'s ``settings`` must match; budgets and methods
may be added) and only compresses and evaluates what is missing. With ``--bench``, runs whose
measurement is missing are compressed again (deterministically) and measured next to the dense
model; measured runs keep their numbers.

Selection rule: among the runs that meet the bar, the one with the smallest objective
(``--objective``: measured ``latency``, ``flops`` or ``params`` kept, peak ``memory``; default
latency when measured, else the achieved fraction of the budget kind), any method; ties go to the
better metric, then to the method listed first. ``memory`` ranks by the weights (``weight_mb``)
when no candidate's peak is below the dense one's by more than the noise (:func:`memory_ranking`);
a ``--bench`` sweep that measured nothing ranks by the achieved fraction, and its message says so.

    result = sweep("model/", "calib.txt", "checks.jsonl", budgets=[0.8, 0.6], methods=["stat"],
                   min_quality="99%", out="sweep/")
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from statprune.argtypes import fraction, positive_int
from statprune.errors import BudgetError, DataError, OptionsError, OutputError, StatpruneError
from statprune.guards import check_count
from statprune.methods import default_sweep_methods, method_names
from statprune.options import add_option_arguments, options_from_args

if TYPE_CHECKING:
    from torch import nn

    from statprune.evaluate import EvalResult
    from statprune.report import CompressionReport

__all__ = [
    "DEFAULT_METHODS",
    "METHODS",
    "QualityBar",
    "Selection",
    "SweepConfig",
    "SweepResult",
    "SweepRow",
    "add_sweep_parser",
    "memory_ranking",
    "parse_budgets",
    "parse_methods",
    "parse_min_quality",
    "run",
    "run_sweep",
    "select_best",
    "sweep",
]

METHODS = method_names()  # the registered methods (statprune.methods)
# fisher is opt-in (--methods stat,fisher): it needs a task head, which embedding models lack
DEFAULT_METHODS = default_sweep_methods()
DEFAULT_BUDGETS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4)
BUDGET_KINDS = ("flops", "params", "latency")
OBJECTIVES = ("latency", "flops", "params", "memory")
# what a selection may rank by: the objectives, and "weights" (weight_mb), which --objective memory
# ranks by when no candidate's peak memory is below the dense one's by more than the noise
RANKINGS = (*OBJECTIVES, "weights")
# The selected model is kept in memory during the sweep when the dense weights take at most this
# many bytes; larger models (LLMs) are compressed again at the end instead.
KEEP_IN_MEMORY_BYTES = 1 << 30
SELECTION_RULE = (
    "smallest achieved fraction kept among the runs that meet the bar (any method); "
    "ties: better metric, then the method listed first"
)
_OBJECTIVE_WORDS = {
    "latency": "measured latency",
    "flops": "FLOPs kept",
    "params": "parameters kept",
    "memory": "peak memory",
    "weights": "model weights (--objective memory: every peak memory within noise of dense)",
}


def selection_rule(objective: str | None) -> str:
    """The selection rule in words, for ``objective`` (None: the achieved fraction kept)."""
    if objective is None:
        return SELECTION_RULE
    return SELECTION_RULE.replace("achieved fraction kept", _OBJECTIVE_WORDS[objective])


_METRICS = {  # metric -> (higher is better, valid absolute range)
    "accuracy": (True, (0.0, 1.0)),
    "agreement": (True, (0.0, 1.0)),
    "cosine": (True, (-1.0, 1.0)),
    "perplexity": (False, (0.0, math.inf)),
}
_LOWEST_METRIC = min(low for _, (low, _high) in _METRICS.values())  # no metric is below this
_EPS = 1e-12
_COLLECT_BYTES = 64 << 20  # run the garbage collector after each run above this model size


# -------------------------------------------------------------------------------------- records


@dataclass
class SweepRow:
    """One compressed configuration and how it evaluates. ``value`` is None when the run failed
    (``error`` says why, e.g. a budget the model cannot reach)."""

    model: str
    task: str
    method: str
    budget_kind: str
    budget: float
    achieved: float | None
    metric: str
    value: float | None
    dense_value: float
    seconds: float
    agreement: float | None = None
    kl: float | None = None
    perplexity_ratio: float | None = None
    cosine_min: float | None = None
    flops_kept: float | None = None
    params_kept: float | None = None
    eval_seconds: float | None = None
    error: str | None = None
    # accuracy only: 95 % interval of accuracy − dense accuracy, paired over the same examples
    change_interval: tuple[float, float] | None = None
    # latency budgets: the fraction of dense latency the cost model predicted / compress measured
    predicted_latency_fraction: float | None = None
    # --bench (statprune.bench.benchmark, one batch size): median and p90 ms, throughput, peak MB
    latency_ms: float | None = None
    latency_p90_ms: float | None = None
    throughput: float | None = None
    unit: str | None = None
    peak_memory_mb: float | None = None
    latency_fraction: float | None = None  # latency_ms / the dense row's latency_ms
    weight_mb: float | None = None  # --bench: the model's parameters and buffers, MiB (exact)
    bench_error: str | None = None  # --bench: why this model (or its peak memory) was not measured

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def objective(self, objective: str | None) -> float | None:
        """This run's value of a selection objective (None: not measured / failed)."""
        return {
            None: self.achieved,
            "latency": self.latency_ms,
            "flops": self.flops_kept,
            "params": self.params_kept,
            "memory": self.peak_memory_mb,
            "weights": self.weight_mb,
        }[objective]


@dataclass(frozen=True)
class QualityBar:
    """``--min-quality``: an absolute metric value, or a fraction of the dense value (``99%``)."""

    value: float
    relative: bool
    text: str

    def threshold(self, dense_value: float, higher_is_better: bool) -> float:
        """The metric value a run must reach: ``>=`` it when higher is better, else ``<=`` it.

        Relative bars keep that fraction of the dense quality: ``99%`` is at least 0.99 x dense
        for accuracy / agreement / cosine, and at most dense / 0.99 for perplexity.
        """
        if not self.relative:
            return self.value
        return dense_value * self.value if higher_is_better else dense_value / self.value

    def describe(self, metric: str, dense_value: float, higher_is_better: bool) -> str:
        sign = ">=" if higher_is_better else "<="
        bar = f"{metric} {sign} {_fmt(metric, self.threshold(dense_value, higher_is_better))}"
        if self.relative:
            bar += f" ({self.text} of dense {_fmt(metric, dense_value)})"
        return bar


@dataclass
class Selection:
    """The outcome of ``--min-quality``."""

    min_quality: str
    threshold: float
    best: SweepRow | None
    closest: SweepRow | None
    message: str
    rule: str = SELECTION_RULE
    objective: str | None = None  # None: the achieved fraction of the budget kind
    saved: str | None = None  # folder of the saved model, relative to the output folder
    saved_achieved: float | None = None  # achieved fraction of the saved model (re-compressed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "min_quality": self.min_quality,
            "threshold": self.threshold,
            "rule": self.rule,
            "objective": self.objective or "achieved",
            "best": None if self.best is None else self.best.to_dict(),
            "closest": None if self.closest is None else self.closest.to_dict(),
            "message": self.message,
            "saved": self.saved,
            "saved_achieved": self.saved_achieved,
        }


@dataclass
class SweepResult:
    """Everything one sweep measured."""

    model: str
    model_dir: Path
    architecture: str
    task: str
    metric: str
    higher_is_better: bool
    dense_value: float
    budget_kind: str
    budgets: list[float]
    methods: list[str]
    seq_len: int
    seed: int
    calibration_path: Path
    calibration_available: int  # examples in the calibration file
    calibration_examples: int  # examples drawn (--samples)
    calibration_tokens: int
    eval_path: Path
    eval_examples: int
    rows: list[SweepRow] = field(default_factory=list)
    selection: Selection | None = None
    out: Path | None = None
    seconds: float = 0.0
    calibration_packed: bool = False  # examples are --seq-len windows of the joined texts
    dense_row: SweepRow | None = None  # with --bench: the dense model's measurements
    bench: dict[str, Any] | None = None  # with --bench: what was measured how (and warnings)

    def protocol(self) -> str:
        """One line: what was compressed, on what, evaluated how, and what "%" means."""
        direction = "higher" if self.higher_is_better else "lower"
        return (
            f"Protocol: model `{self.model}` ({self.architecture}, task {self.task}); "
            f"calibration: {self.calibration_examples} "
            + (
                f"packed {self.seq_len}-token windows of the {self.calibration_available} examples in "
                if self.calibration_packed
                else f"of {self.calibration_available} examples from "
            )
            + f"`{self.calibration_path.name}` (seed {self.seed}, {self.calibration_tokens:,} tokens), "
            f"seq len {self.seq_len}; evaluation: {self.eval_examples} examples from "
            f"`{self.eval_path.name}`, metric {metric_label(self.metric)} ({direction} is better), "
            f"compared with the dense model; budget kind: {self.budget_kind} — "
            f'"%" is {_percent_meaning(self.budget_kind, self.seq_len)}.'
        )

    def to_rows(self) -> list[dict[str, Any]]:
        """The runs (after the ``dense`` row when measured), as ``results.json`` stores them."""
        rows = [] if self.dense_row is None else [self.dense_row]
        return [row.to_dict() for row in rows + self.rows]


def metric_label(metric: str) -> str:
    """How a metric is named in tables, plots and reports."""
    return {"agreement": "top-1 agreement with dense", "cosine": "mean cosine to dense"}.get(metric, metric)


def _percent_meaning(kind: str, seq_len: int) -> str:
    if kind == "latency":
        return (
            "the fraction of the dense model's latency kept, as predicted by the latency lookup "
            "tables measured on this machine (statprune.latency)"
        )
    if kind == "flops":
        return (
            f"the fraction of the dense model's attention+FFN FLOPs kept (per sequence of {seq_len} "
            "tokens; embeddings and task head not counted)"
        )
    return (
        "the fraction of the dense model's attention+FFN parameters kept "
        "(embeddings and task head not counted)"
    )


def _fmt(metric: str, value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.2f}" if metric == "perplexity" else f"{value:.4f}"


# ------------------------------------------------------------------------------------- parsing


def parse_budgets(text: str | Sequence[float]) -> list[float]:
    """``0.9,0.8`` (or a sequence of numbers) as distinct fractions in (0, 1], largest first."""
    items = text.split(",") if isinstance(text, str) else list(text)
    budgets: list[float] = []
    for item in items:
        if isinstance(item, str) and not item.strip():
            continue
        try:
            value = float(item)
        except (TypeError, ValueError):
            raise BudgetError(
                f"--budgets: {item!r} is not a number; give fractions such as 0.9,0.7,0.5"
            ) from None
        if not 0.0 < value <= 1.0:
            raise BudgetError(
                f"--budgets: {item} is outside (0, 1]; give fractions to keep, such as 0.9,0.7,0.5"
            )
        if value not in budgets:
            budgets.append(value)
    if not budgets:
        raise BudgetError("--budgets is empty; give fractions to keep, such as 0.9,0.8,0.7,0.6,0.5,0.4")
    return sorted(budgets, reverse=True)


def parse_methods(text: str | Sequence[str]) -> list[str]:
    """``stat,flap`` (or a sequence) as distinct known method names, in the order given."""
    items = text.split(",") if isinstance(text, str) else list(text)
    methods: list[str] = []
    known = method_names()
    for item in (str(i).strip() for i in items):
        if not item:
            continue
        if item not in known:
            raise OptionsError(f"--methods: unknown method {item!r}; choose from {','.join(known)}")
        if item not in methods:
            methods.append(item)
    if not methods:
        raise OptionsError(f"--methods is empty; choose from {','.join(known)}")
    return methods


def parse_min_quality(text: str) -> QualityBar:
    """``0.80`` (absolute metric value) or ``99%`` (relative to the dense model's value)."""
    raw = str(text).strip()
    relative = raw.endswith("%")
    number = raw[:-1].strip() if relative else raw
    try:
        value = float(number)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise OptionsError(
            f"--min-quality {text!r} is not a number; give an absolute value (0.80) or a share of "
            "the dense quality (99%)"
        )
    if relative:
        if value <= 0:
            raise OptionsError(f"--min-quality {text!r} must be above 0%, e.g. 99%")
        if value > 100:
            raise OptionsError(
                f"--min-quality {raw} asks every candidate to beat the dense model; a share of the "
                "dense quality is at most 100% (e.g. 99%: lose at most 1%)"
            )
        return QualityBar(value / 100.0, True, f"{value:g}%")
    if value < _LOWEST_METRIC:
        raise OptionsError(
            f"--min-quality {raw} is below every metric's range (accuracy and agreement 0..1, mean "
            "cosine -1..1, perplexity > 0); give e.g. 0.80, or 99% for a share of the dense quality"
        )
    return QualityBar(value, False, f"{value:g}")


def _check_bar(bar: QualityBar, metric: str) -> None:
    if bar.relative:
        return
    low, high = _METRICS[metric][1]
    if metric == "perplexity" and bar.value <= 0:
        raise OptionsError(f"--min-quality {bar.text}: a perplexity bar must be positive (e.g. 25.0 or 99%)")
    if not low <= bar.value <= high:
        hint = f"did you mean {bar.text}%? " if high < bar.value <= 100 else ""
        raise OptionsError(
            f"--min-quality {bar.text} is not a possible {metric} ({low:g}..{high:g}); "
            f"{hint}write e.g. 0.80, or 99% for a share of the dense value"
        )


# ------------------------------------------------------------------------------------ selection


def meets(value: float | None, threshold: float, higher_is_better: bool) -> bool:
    """Whether a metric value satisfies the bar (within rounding)."""
    if value is None or not math.isfinite(value):
        return False
    tol = _EPS * max(1.0, abs(threshold))
    return value >= threshold - tol if higher_is_better else value <= threshold + tol


def select_best(
    rows: Sequence[SweepRow],
    threshold: float,
    higher_is_better: bool,
    methods: Sequence[str] | None = None,
    objective: str | None = None,
) -> tuple[SweepRow | None, SweepRow | None]:
    """``(best, closest)``: ``best`` is the run meeting the bar with the smallest ``objective``
    (``latency``, ``flops``, ``params``, ``memory``; None: the achieved fraction) (ties: better
    metric, then the method earlier in ``methods``), or None; ``closest`` is the run with the best
    metric (ties: smaller objective), reported when nothing meets the bar. Runs without a value of
    the objective (not measured) are not candidates."""
    if objective is not None and objective not in RANKINGS:
        raise OptionsError(f"unknown objective {objective!r}: choose {', '.join(OBJECTIVES)}")
    order = list(methods) if methods is not None else list(method_names())

    def rank(row: SweepRow) -> int:
        return order.index(row.method) if row.method in order else len(order)

    def quality(row: SweepRow) -> float:
        return -row.value if higher_is_better else row.value  # smaller is better

    def cost(row: SweepRow) -> float:
        return round(row.objective(objective), 9)

    done = [
        r
        for r in rows
        if r.value is not None and math.isfinite(r.value) and r.objective(objective) is not None
    ]
    passing = [r for r in done if meets(r.value, threshold, higher_is_better)]
    best = min(passing, key=lambda r: (cost(r), quality(r), rank(r)), default=None)
    closest = min(done, key=lambda r: (quality(r), cost(r), rank(r)), default=None)
    return best, closest


def _describe_row(row: SweepRow) -> str:
    measured = ""
    if row.latency_ms is not None:
        measured = f", {row.latency_ms:.1f} ms"
        if row.latency_fraction is not None:
            measured += f" ({row.latency_fraction:.1%} of dense)"
    if row.budget_kind == "latency":  # the lookup tables' prediction, not a measurement
        kept = f"predicted {row.achieved:.1%} of dense latency"
        if row.latency_ms is not None:
            measured = f"; measured {measured.removeprefix(', ')}"
    else:
        kept = f"achieved {row.achieved:.1%}"
    return (
        f"{row.method} at keep {row.budget:g} {row.budget_kind} ({kept}{measured}): "
        f"{row.metric} {_fmt(row.metric, row.value)}"
    )


def default_objective(rows: Sequence[SweepRow], objective: str | None = None) -> str | None:
    """``objective`` when given, else ``latency`` when any run's latency was measured, else None
    (the achieved fraction of the budget kind)."""
    if objective is not None:
        return objective
    return "latency" if any(r.latency_ms is not None for r in rows) else None


def memory_ranking(rows: Sequence[SweepRow], dense_peak_mb: float | None, noise_mb: float | None) -> str:
    """What ``--objective memory`` ranks by: ``"memory"`` (peak memory) when some evaluated
    candidate's peak is below the dense one's by more than the noise (``bench.memory_caveat``),
    else ``"weights"`` (``weight_mb``, exact) when every evaluated candidate has it: peaks that
    differ by noise only would rank by chance."""
    from statprune.bench import memory_caveat

    valued = [r for r in rows if r.value is not None and r.peak_memory_mb is not None]
    if not valued or dense_peak_mb is None:
        return "memory"
    if any(memory_caveat(r.peak_memory_mb, dense_peak_mb, noise_mb) is None for r in valued):
        return "memory"
    return "weights" if all(r.weight_mb is not None for r in valued) else "memory"


def _selection(
    rows: Sequence[SweepRow],
    bar: QualityBar,
    metric: str,
    dense_value: float,
    methods: Sequence[str],
    objective: str | None = None,
    dense_row: SweepRow | None = None,
    noise_mb: float | None = None,
    fell_back: bool = False,
) -> Selection:
    """``fell_back``: the sweep measured (``--bench``) but nothing was measured, so the selection
    ranks by the achieved fraction (the message says so)."""
    from statprune.bench import memory_caveat

    higher = _METRICS[metric][0]
    threshold = bar.threshold(dense_value, higher)
    objective = None if fell_back else default_objective(rows, objective)
    dense_peak = None if dense_row is None else dense_row.peak_memory_mb
    if objective == "memory":
        objective = memory_ranking(rows, dense_peak, noise_mb)
    best, closest = select_best(rows, threshold, higher, methods, objective)
    described = bar.describe(metric, dense_value, higher)
    smallest = {
        None: "the smallest model",
        "latency": "the fastest model",
        "flops": "the fewest FLOPs",
        "params": "the fewest parameters",
        "memory": "the least peak memory",
        "weights": (
            "the smallest weights (--objective memory: no candidate's peak memory is below the dense "
            "model's by more than the measurement noise, so they are ranked by their weights)"
        ),
    }
    if best is not None:
        closest = None  # only reported when nothing meets the bar
        what = smallest[objective]
        why = ""
        if fell_back:
            kind = {"flops": "FLOPs kept", "params": "parameters kept"}.get(
                best.budget_kind, "latency predicted by the lookup tables"
            )
            what += f" by {kind}"
            why = " (--bench measured nothing, so not by latency: rerun the same command to measure)"
        message = f"best: {_describe_row(best)} — {what} with {described}{why}"
        caveat = memory_caveat(best.peak_memory_mb, dense_peak, noise_mb) if objective == "memory" else None
        if caveat:
            message += "; its peak memory is " + (
                "not below the dense model's"
                if caveat == "above"
                else "below the dense model's only by noise"
            )
    elif closest is not None:
        message = f"no configuration reaches {described}; closest: {_describe_row(closest)}"
    else:
        message = f"no configuration reaches {described}: every run failed"
    return Selection(
        bar.text, threshold, best, closest, message, rule=selection_rule(objective), objective=objective
    )


# ---------------------------------------------------------------------------------------- sweep


def _primary(task: str, has_labels: bool) -> str:
    if task == "classify":
        return "accuracy" if has_labels else "agreement"
    return {"lm": "perplexity", "embed": "cosine"}[task]


def _metric_value(result: EvalResult, metric: str) -> float | None:
    return {
        "accuracy": result.accuracy,
        "agreement": result.agreement,
        "perplexity": result.perplexity,
        "cosine": result.cosine_mean,
    }[metric]


def _fields_for(path: Path, text_field: str | None, pair_field: str | None):
    """--text-field / --pair-field apply to the .jsonl / .csv files among --data and --eval."""
    if path.suffix.lower() in (".jsonl", ".csv") and not path.is_dir():
        return text_field, pair_field
    return None, None


def _param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _free(device, large: bool) -> None:
    """Return a dropped model's memory now: collect reference cycles (slow, so only for large
    models or on a GPU) and release the CUDA cache."""
    import torch

    on_gpu = getattr(device, "type", str(device)) == "cuda"
    if large or on_gpu:
        gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()


def _check_out(out: Path, overwrite: bool, model_dir: Path) -> None:
    from statprune.persist import check_output_dir

    check_output_dir(out, overwrite, source=model_dir)


@dataclass
class SweepConfig:
    """Everything one sweep is asked to do (the arguments of :func:`sweep`, parsed and checked).

    Build it with :meth:`from_arguments` (which validates, raising the same one-line errors as
    ``sweep``) and run it with :func:`run`."""

    model_dir: Path
    calib_path: Path
    eval_path: Path
    budgets: list[float]
    methods: list[str]
    budget_kind: str = "flops"
    samples: int = 512
    seq_len: int = 128
    seed: int = 0
    batch_size: int = 16
    pack: bool = False
    eval_batch_size: int = 32
    eval_samples: int | None = None
    task: str = "auto"
    text_field: str | None = None
    pair_field: str | None = None
    label_field: str | None = None
    bar: QualityBar | None = None
    save_best: bool = False
    out: Path | None = None
    overwrite: bool = False
    name: str | None = None
    device: str = "auto"
    dtype: str | None = None
    progress: bool = False
    log: Callable[[str], None] | None = print
    bench: bool = False  # measure every candidate and the dense model (statprune.bench)
    bench_trials: int = 10
    bench_memory: bool = True  # also peak memory (a child process per model on CPU: seconds each)
    bench_threads: int | None = None  # CPU intra-op threads of the measurement (None: torch's)
    objective: str | None = None  # selection objective (None: latency when measured, else achieved)
    budget_flag: str = "--budgets"  # how the budgets were given, for messages (CLI: or --keep-latency)
    compress_options: dict[str, Any] = field(default_factory=dict)  # CompressionOptions fields

    def bench_setting(self, name: str) -> Any:
        """``bench_batch``, ``bench_seq_len`` (default: ``seq_len``) or ``backend``: from the
        compression options (``statprune.options``, the one definition of these flags)."""
        from statprune.options import CompressionOptions

        value = self.compress_options.get(name, CompressionOptions.__dataclass_fields__[name].default)
        return self.seq_len if name == "bench_seq_len" and value is None else value

    @classmethod
    def from_arguments(
        cls,
        model_dir: str | Path,
        calib_path: str | Path,
        eval_path: str | Path,
        *,
        budgets: Sequence[float] | str = DEFAULT_BUDGETS,
        methods: Sequence[str] | str = DEFAULT_METHODS,
        min_quality: str | QualityBar | None = None,
        out: str | Path | None = None,
        **settings: Any,
    ) -> SweepConfig:
        """Parse and check ``sweep``'s arguments (``settings``: the other fields, and any
        ``CompressionOptions`` field, collected into ``compress_options``); nothing is read yet."""
        known = {f for f in cls.__dataclass_fields__} - {"compress_options", "bar"}
        own = {k: v for k, v in settings.items() if k in known}
        parsed_budgets, parsed_methods = parse_budgets(budgets), parse_methods(methods)
        if settings.get("budget_kind", "flops") not in BUDGET_KINDS:
            raise OptionsError(
                f"--budget-kind must be {', '.join(BUDGET_KINDS)}, not {settings['budget_kind']!r}"
            )
        bar = parse_min_quality(min_quality) if isinstance(min_quality, str) else min_quality
        config = cls(
            model_dir=Path(model_dir),
            calib_path=Path(calib_path),
            eval_path=Path(eval_path),
            budgets=parsed_budgets,
            methods=parsed_methods,
            bar=bar,
            out=None if out is None else Path(out),
            compress_options={k: v for k, v in settings.items() if k not in known},
            **own,
        )
        config.validate()
        return config

    def validate(self) -> None:
        """One-line errors for bad settings, before any work (models and data are not read)."""
        from statprune.evaluate import TASKS
        from statprune.options import make_options

        if self.budget_kind not in BUDGET_KINDS:
            raise OptionsError(f"--budget-kind must be {', '.join(BUDGET_KINDS)}, not {self.budget_kind!r}")
        if self.objective is not None and self.objective not in OBJECTIVES:
            raise OptionsError(f"--objective must be one of {', '.join(OBJECTIVES)}, not {self.objective!r}")
        if self.objective in ("latency", "memory") and not self.bench:
            raise OptionsError(f"--objective {self.objective} needs --bench (it is measured)")
        if self.objective == "memory" and not self.bench_memory:
            raise OptionsError("--objective memory needs the peak memory: drop --bench-no-memory")
        if self.objective is not None and self.bar is None:
            raise OptionsError("--objective needs --min-quality Q (the bar the candidates must meet)")
        trials = self.bench_trials
        if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
            raise OptionsError(f"--bench-trials must be a positive integer, got {self.bench_trials!r}")
        if self.bench:
            from statprune.bench import require_backend

            require_backend(self.bench_setting("backend"))
        if self.save_best and self.bar is None:
            raise OptionsError("--save-best needs --min-quality Q (e.g. 0.80, or 99% of the dense quality)")
        if self.save_best and self.out is None:
            raise OutputError("save_best needs an output folder (out=...)")
        for label in ("samples", "seq_len", "batch_size", "eval_batch_size", "eval_samples"):
            value = getattr(self, label)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise DataError(f"{label} must be a positive integer, got {value!r}")
        if self.task not in ("auto", *TASKS):
            raise DataError(f"unknown task {self.task!r}; use auto, {', '.join(TASKS)}")
        sets = {"method", "seq_len", "device", "inplace", "cache"} | {f"keep_{k}" for k in BUDGET_KINDS}
        overlap = sets & set(self.compress_options)
        if overlap:
            raise TypeError(f"sweep() sets {', '.join(sorted(overlap))} itself")
        # the options every method shares (names, choices, ranges); a method's own constraints
        # fail that method's runs only, as an impossible budget does
        budget = {f"keep_{self.budget_kind}": 1.0}
        make_options(**budget, seq_len=self.seq_len, **self.compress_options).validate()


def sweep(
    model_dir: str | Path,
    calib_path: str | Path,
    eval_path: str | Path,
    *,
    budgets: Sequence[float] | str = DEFAULT_BUDGETS,
    methods: Sequence[str] | str = DEFAULT_METHODS,
    budget_kind: str = "flops",
    samples: int = 512,
    seq_len: int = 128,
    seed: int = 0,
    batch_size: int = 16,
    pack: bool = False,
    eval_batch_size: int = 32,
    eval_samples: int | None = None,
    task: str = "auto",
    text_field: str | None = None,
    pair_field: str | None = None,
    label_field: str | None = None,
    min_quality: str | QualityBar | None = None,
    save_best: bool = False,
    out: str | Path | None = None,
    overwrite: bool = False,
    name: str | None = None,
    device: str = "auto",
    dtype: str | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = print,
    bench: bool = False,
    bench_trials: int = 10,
    bench_memory: bool = True,
    bench_threads: int | None = None,
    objective: str | None = None,
    **compress_options: Any,
) -> SweepResult:
    """Compress ``model_dir`` with every method at every budget and evaluate each result.

    ``budgets`` are fractions of ``budget_kind`` (``flops`` or ``params``) to keep. Calibration
    examples (``samples`` drawn with ``seed`` from ``calib_path``) are tokenized once and shared by
    every run; evaluation examples come from ``eval_path`` (labels from ``label_field``, default
    ``label`` when present; ``eval_samples`` keeps the first N). With ``pack`` the calibration
    examples are ``seq_len``-token windows of the joined texts (see ``pack_examples``).
    ``min_quality`` (``0.80`` or ``99%``) selects the smallest run meeting it (see
    :data:`SELECTION_RULE`); ``save_best`` also saves that model into ``out/best``. With ``out``
    the results are written there atomically, every finished run is checkpointed into
    ``out/sweep.partial.json`` meanwhile, and a rerun with the same settings and inputs (compared
    by content) resumes: finished runs and the dense evaluation are not redone; Ctrl-C raises
    :class:`SweepInterrupted` after the checkpoint.
    ``budget_kind="latency"`` prices the budgets with latency lookup tables (``statprune.latency``).
    ``bench`` measures every candidate and the dense model (``statprune.bench.benchmark``, at the
    ``bench_batch`` / ``bench_seq_len`` / ``backend`` compression options, ``bench_trials``
    rounds; ``bench_memory=False`` skips peak memory; ``bench_threads``: CPU intra-op threads of
    every backend, default torch's); ``objective`` (``latency``, ``flops``,
    ``params``, ``memory``) is what the selection
    minimizes among the runs meeting ``min_quality`` (default: latency when measured).
    ``log`` receives one progress line per run (None: silent); ``progress`` shows compression bars.
    Other keyword arguments are :class:`~statprune.options.CompressionOptions` fields. The same
    as ``run(SweepConfig.from_arguments(...))``.
    """
    started = time.perf_counter()
    config = SweepConfig.from_arguments(
        model_dir,
        calib_path,
        eval_path,
        budgets=budgets,
        methods=methods,
        budget_kind=budget_kind,
        samples=samples,
        seq_len=seq_len,
        seed=seed,
        batch_size=batch_size,
        pack=pack,
        eval_batch_size=eval_batch_size,
        eval_samples=eval_samples,
        task=task,
        text_field=text_field,
        pair_field=pair_field,
        label_field=label_field,
        min_quality=min_quality,
        save_best=save_best,
        out=out,
        overwrite=overwrite,
        name=name,
        device=device,
        dtype=dtype,
        progress=progress,
        log=log,
        bench=bench,
        bench_trials=bench_trials,
        bench_memory=bench_memory,
        bench_threads=bench_threads,
        objective=objective,
        **compress_options,
    )
    return run(config, started)


@dataclass
class _Inputs:
    """What a sweep reads once and shares between its runs."""

    tokenizer: Any
    dense: Any
    texts: list
    examples: list
    labels: list | None
    task: str
    metric: str
    batches: list
    chosen: list
    target: Any  # torch.device


def _read_inputs(config: SweepConfig, resuming: bool = False) -> _Inputs:
    """Check the folders, read the data and the dense model, tokenize the calibration sample."""
    import torch

    from statprune.argtypes import resolve_device
    from statprune.calibration import pack_examples, read_examples, sample_examples, tokenize_examples
    from statprune.evaluate import detect_task, read_labels
    from statprune.persist import check_model_dir, load, load_tokenizer

    model_dir, calib_path, eval_path = config.model_dir, config.calib_path, config.eval_path
    check_model_dir(model_dir)
    if config.out is not None and not resuming:
        _check_out(config.out, config.overwrite, model_dir)
    if not eval_path.exists():
        raise DataError(
            f"evaluation data not found: {eval_path}; pass an existing .txt, .jsonl, .csv or folder"
        )
    torch_dtype = None
    if config.dtype is not None:
        torch_dtype = getattr(torch, config.dtype, None)
        if not isinstance(torch_dtype, torch.dtype):
            raise DataError(f"unknown dtype {config.dtype!r}; use float32, bfloat16 or float16")
    target = resolve_device(config.device)

    text_field, pair_field = config.text_field, config.pair_field
    texts = read_examples(calib_path, *_fields_for(calib_path, text_field, pair_field))
    eval_text_field, eval_pair_field = _fields_for(eval_path, text_field, pair_field)
    examples = read_examples(eval_path, eval_text_field, eval_pair_field)
    tokenizer = load_tokenizer(model_dir)
    dense = load(model_dir, device=str(target), dtype=torch_dtype)
    task = detect_task(dense) if config.task == "auto" else config.task
    if task == "qa":  # (statprune.qa_eval reads SQuAD-format records, one model at a time)
        raise DataError(
            "sweep does not score question answering yet: run `statprune eval --task qa` on "
            "each compressed model, or pass --task embed"
        )
    labels = None
    if task == "classify":
        labels = read_labels(eval_path, config.label_field, eval_text_field)
    elif config.label_field is not None:
        raise DataError(f"--label-field only applies to classifiers, but the task is {task}; drop it")
    if config.eval_samples is not None:
        eval_samples = check_count(config.eval_samples, len(examples), "eval_samples", "evaluation examples")
        examples = examples[:eval_samples]
        labels = None if labels is None else labels[:eval_samples]
    metric = _primary(task, labels is not None)
    if config.bar is not None:
        _check_bar(config.bar, metric)

    samples, seed, seq_len, batch_size = config.samples, config.seed, config.seq_len, config.batch_size
    if config.pack:
        batches = pack_examples(tokenizer, texts, samples, seed, seq_len=seq_len, batch_size=batch_size)
        chosen = [None] * sum(int(b.inputs["input_ids"].shape[0]) for b in batches)
    else:
        chosen = sample_examples(texts, samples, seed)
        batches = tokenize_examples(tokenizer, chosen, seq_len=seq_len, batch_size=batch_size)
    return _Inputs(tokenizer, dense, texts, examples, labels, task, metric, batches, chosen, target)


def run(config: SweepConfig, started: float | None = None) -> SweepResult:
    """Run a checked sweep: the dense reference, then every method at every budget (see
    :func:`sweep`)."""
    from statprune.driver import AnalysisCache, compress
    from statprune.evaluate import evaluate

    started = time.perf_counter() if started is None else started
    say = config.log or (lambda _line: None)
    previous = _previous(config)  # a rerun into the same --out: what it already holds
    inputs = _read_inputs(config, resuming=previous is not None)
    tokenizer, dense, metric, target = inputs.tokenizer, inputs.dense, inputs.metric, inputs.target
    higher = _METRICS[metric][0]
    bar, budget_kind, methods = config.bar, config.budget_kind, config.methods
    calib_tokens = sum(int(b.inputs["attention_mask"].sum()) for b in inputs.batches)

    def run_eval(model, reference):
        return evaluate(
            model,
            tokenizer,
            inputs.examples,
            task=inputs.task,
            reference=reference,
            labels=inputs.labels,
            seq_len=config.seq_len,
            batch_size=config.eval_batch_size,
        )

    # before the dense evaluation and any analysis: too little calibration data, budgets out of reach
    unreachable = _unreachable_budgets(config, dense, inputs.batches)
    for method, budget in unreachable:
        say(f"{method} at keep {budget:g} {budget_kind} cannot be met; it is skipped")
    if previous is not None and previous.dense_eval is not None:  # same inputs: same dense result
        dense_value, eval_examples = previous.dense_eval
        when = "evaluated in the earlier run"
    else:
        dense_result = run_eval(dense, dense if metric == "cosine" else None)
        dense_value = 1.0 if metric in ("agreement", "cosine") else float(_metric_value(dense_result, metric))
        eval_examples, when = dense_result.n_examples, f"{dense_result.seconds:.1f} s"
    model_name = config.name or config.model_dir.resolve().name
    say(f"dense: {metric_label(metric)} {_fmt(metric, dense_value)} on {eval_examples} examples ({when})")

    result = SweepResult(
        model=model_name,
        model_dir=config.model_dir,
        architecture=type(dense).__name__,
        task=inputs.task,
        metric=metric,
        higher_is_better=higher,
        dense_value=float(dense_value),
        budget_kind=budget_kind,
        budgets=config.budgets,
        methods=methods,
        seq_len=config.seq_len,
        seed=config.seed,
        calibration_path=config.calib_path,
        calibration_available=len(inputs.texts),
        calibration_examples=len(inputs.chosen),
        calibration_packed=config.pack,
        calibration_tokens=calib_tokens,
        eval_path=config.eval_path,
        eval_examples=eval_examples,
        out=config.out,
    )
    dense_bytes = _param_bytes(dense)
    large = dense_bytes > _COLLECT_BYTES
    keep_best = bar is not None and config.save_best and dense_bytes <= KEEP_IN_MEMORY_BYTES
    kept: tuple[SweepRow, nn.Module, CompressionReport] | None = None
    threshold = None if bar is None else bar.threshold(float(dense_value), higher)

    cache = AnalysisCache()  # budgets of one method share its analysis pass (computed at the first)
    # --bench: each candidate is saved into a scratch folder, then all are measured side by side
    scratch = tempfile.TemporaryDirectory(prefix="statprune-sweep-bench-") if config.bench else None
    candidates: list[tuple[SweepRow, Path]] = []

    def run_one(method: str, budget: float):
        model, report = compress(
            dense,
            tokenizer,
            inputs.batches,
            inplace=False,
            progress=config.progress,
            method=method,
            seq_len=config.seq_len,
            device=str(target),
            cache=cache,
            **{f"keep_{budget_kind}": budget},
            **config.compress_options,
        )
        report.source_model = str(config.model_dir.resolve())
        return model, report

    total = len(methods) * len(config.budgets)
    checkpoint = _Checkpoint(config.out, _settings(config), previous, (dense_value, eval_examples))
    if previous is not None and previous.resumed_partial:
        n = previous.resumed_partial
        say(
            f"resuming: {n} finished run{'s' if n != 1 else ''} from {config.out / PARTIAL} (delete it to "
            "start over)"
        )
    try:
        for number, (method, budget) in enumerate(((m, b) for m in methods for b in config.budgets), start=1):
            head = f"[{number:>{len(str(total))}}/{total}] {method:<9} keep {budget:.2f} {budget_kind}"
            old = None if previous is None else previous.rows.get((method, budget))
            if old is not None:  # finished in an earlier run into this --out: not compressed again
                result.rows.append(old)
                if scratch is None or old.value is None or _measured(old, config):
                    say(f"{head}: done in the earlier run (kept)")
                    continue
                say(f"{head}: done in the earlier run; compressed again to measure it")
                model, report = run_one(method, budget)
                candidates.append((old, _save_candidate(scratch, method, budget, model, report, tokenizer)))
                del model
                _free(target, large)
                continue
            row = SweepRow(
                model_name, inputs.task, method, budget_kind, budget, None, metric, None, dense_value, 0.0
            )
            tic = time.perf_counter()
            try:
                if (method, budget) in unreachable:
                    raise BudgetError(unreachable[method, budget])
                model, report = run_one(method, budget)
            except BudgetError as exc:
                row.seconds = round(time.perf_counter() - tic, 3)
                row.error = str(exc)
                result.rows.append(row)
                checkpoint.save(row)
                say(f"{head}: failed: {exc}")
                continue
            row.seconds = round(time.perf_counter() - tic, 3)
            row.flops_kept, row.params_kept = report.flops_kept, report.params_kept
            row.achieved = _achieved(report, budget_kind)
            if report.latency is not None:
                row.predicted_latency_fraction = report.latency["predicted_fraction"]
            evaluated = run_eval(model, dense)
            row.value = _metric_value(evaluated, metric)
            row.agreement, row.kl = evaluated.agreement, evaluated.kl
            row.perplexity_ratio, row.cosine_min = evaluated.perplexity_ratio, evaluated.cosine_min
            row.eval_seconds = round(evaluated.seconds, 3)
            row.change_interval = evaluated.accuracy_change_interval if metric == "accuracy" else None
            result.rows.append(row)
            checkpoint.save(row)
            shown = row.agreement is not None and metric != "agreement"
            extra = f"  agreement {row.agreement:.4f}" if shown else ""
            share = "predicted" if budget_kind == "latency" else "kept"  # latency: the lookup tables' figure
            say(
                f"{head} -> {row.achieved:.1%} {share}  {metric} {_fmt(metric, row.value)} "
                f"(dense {_fmt(metric, dense_value)}){extra}  {row.seconds:.1f} s"
            )
            if scratch is not None:
                candidates.append((row, _save_candidate(scratch, method, budget, model, report, tokenizer)))
            if keep_best and meets(row.value, threshold, higher):
                contenders = [row] if kept is None else [kept[0], row]
                if select_best(contenders, threshold, higher, methods)[0] is row:
                    kept = (row, model.to("cpu"), report)  # the previous one is freed below
            del model
            _free(target, large)

        if all(r.value is None for r in result.rows):
            checkpoint.discard()
            raise BudgetError(f"every run failed; first error: {result.rows[0].error}")
        interrupted = False
        if scratch is not None:
            interrupted = _bench(config, result, candidates, str(target.type), say, previous)
        if bar is not None:
            noise = None if result.bench is None else result.bench.get("memory_noise_mb")
            fell_back = result.dense_row is not None and not _anything_measured(result)
            result.selection = _selection(
                result.rows,
                bar,
                metric,
                float(dense_value),
                methods,
                config.objective,
                result.dense_row,
                noise,
                fell_back,
            )
        saved = None
        best = None if result.selection is None else result.selection.best
        # a resumed sweep's best/ is never lost: kept when it is still the selection, or when no
        # other is saved in its place (then only kept, not the selection's)
        held = None if previous is None else previous.held_best
        if best is not None and held == (best.method, best.budget):
            saved = config.out.resolve() / "best"
            result.selection.saved, result.selection.saved_achieved = "best", best.achieved
        elif config.save_best and best is not None:
            measured = {(row.method, row.budget): folder for row, folder in candidates}
            if held is not None:
                was = f"{held[0]} at keep {held[1]:g}"
                say(f"best/ now holds {best.method} at keep {best.budget:g} (it held {was})")
            if kept is not None and kept[0] is best:
                saved = (kept[1], kept[2])
            elif (best.method, best.budget) in measured:  # --bench saved it: copied, not compressed again
                saved = measured[best.method, best.budget]
            else:
                what = f"{best.method}, keep {best.budget:g} {budget_kind}"
                say(f"re-compressing the best configuration ({what})")
                saved = run_one(best.method, best.budget)
            result.selection.saved = "best"
            result.selection.saved_achieved = (
                best.achieved if isinstance(saved, Path) else _achieved(saved[1], budget_kind)
            )
        elif held is not None:
            saved = config.out.resolve() / "best"
            now = "not the selection now" if best is not None else "no run was selected now"
            say(
                f"kept best/ from the earlier run ({held[0]} at keep {held[1]:g}; {now}): pass "
                "--save-best to replace it with the selection"
            )
        kept = None
        _free(target, large)
        result.seconds = round(time.perf_counter() - started, 3)
        if config.out is not None:
            dropped = _write(
                result,
                config.out,
                config.overwrite or previous is not None or checkpoint.written,
                saved,
                tokenizer,
                calib_path=config.calib_path,
                settings=_settings(config),
                resumed=previous is not None,
            )
            if dropped:
                say(
                    f"removed {', '.join(dropped)} (made from the earlier results): run `statprune report "
                    f"{config.out}` again"
                )
    except KeyboardInterrupt:  # compressing, evaluating or writing: the checkpoint is intact
        raise SweepInterrupted(checkpoint.interrupted_message()) from None
    finally:
        if scratch is not None:
            scratch.cleanup()
    if result.selection is not None:
        say(result.selection.message)
    if interrupted:  # the finished work is written; stop as the user asked
        raise SweepInterrupted(
            "interrupted while measuring; the compressed candidates and their evaluations were written"
            + ("" if config.out is None else f" to {Path(config.out).resolve()}")
            + "; rerun the same command to measure them (the finished candidates are not evaluated again)"
        )
    if result.dense_row is not None and not _anything_measured(result):
        first = next(r for r in [result.dense_row, *result.rows] if r.bench_error)
        where = (
            ""
            if config.out is None
            else (f"; the candidates and their evaluations are in {config.out}/results.json")
        )
        broken = _backend_problem(config.bench_setting("backend"))
        fix = f"{broken}, then rerun the same command" if broken else "rerun the same command"
        raise MeasurementError(
            f"--bench measured nothing: {_row_name(first)} failed: {first.bench_error}{where}; "
            f"{fix} to measure them (the evaluations are kept; each candidate is compressed again "
            "to be measured)"
        )
    return result


def _backend_problem(backend: str) -> str | None:
    """What to install when ``backend``'s package cannot be imported (None: it imports)."""
    if backend != "onnxruntime":
        return None
    try:
        import onnxruntime  # noqa: F401
    except Exception as exc:  # missing, or installed but broken (a bad wheel, a missing library)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"the onnxruntime package cannot be imported ({reason}): pip install 'statprune[onnx]'"
    return None


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep: the finished runs are saved (the message says where) and the same
    command resumes them: while compressing or evaluating, in the checkpoint :data:`PARTIAL`;
    while ``--bench`` measured, in the sweep's outputs."""


class MeasurementError(StatpruneError):
    """``sweep --bench`` could not measure any model (the results without latency are written)."""


def _row_name(row: SweepRow) -> str:
    """``dense`` or ``METHOD at keep B KIND``: how messages name a sweep's model."""
    return "dense" if row.method == "dense" else f"{row.method} at keep {row.budget:g} {row.budget_kind}"


def _anything_measured(result: SweepResult) -> bool:
    rows = [r for r in (result.dense_row, *result.rows) if r is not None]
    return any(r.latency_ms is not None for r in rows)


_BENCH_FIELDS = (
    "latency_ms",
    "latency_p90_ms",
    "throughput",
    "unit",
    "peak_memory_mb",
    "latency_fraction",
    "weight_mb",
    "bench_error",
)


def _measured(row: SweepRow, config: SweepConfig) -> bool:
    """Whether ``row`` holds every measurement ``config`` asks for (latency; peak memory unless
    ``bench_memory`` is off)."""
    return row.latency_ms is not None and (not config.bench_memory or row.peak_memory_mb is not None)


def _save_candidate(scratch, method: str, budget: float, model, report, tokenizer) -> Path:
    """Save a candidate into the scratch folder ``--bench`` measures it from."""
    from statprune.bench import _no_progress_bars
    from statprune.persist import save

    folder = Path(scratch.name) / f"{method}-{budget:g}"
    with _no_progress_bars():
        save(model, folder, tokenizer=tokenizer, report=report)
    return folder


# ------------------------------------------------------------------------------------- resuming


@dataclass
class _Previous:
    """What an earlier run into the same ``--out`` left: its rows by (method, budget) and, when
    it measured with the same ``--bench`` settings, its dense row and bench record."""

    rows: dict[tuple[str, float], SweepRow]
    dense: SweepRow | None
    bench: dict[str, Any] | None
    resumed_partial: int = 0  # how many of ``rows`` an interrupted sweep checkpointed
    dense_eval: tuple[float, int] | None = None  # the dense model's value and evaluation examples
    held_best: tuple[str, float] | None = None  # (method, budget) in best/ of that same-settings sweep


def _settings(config: SweepConfig) -> dict[str, Any]:
    """What makes two sweeps' runs interchangeable (``sweep.json``'s ``settings``): everything but
    the budgets and methods (a rerun may add some), and the ``--bench`` settings apart (``bench``)."""
    runs = {
        "model_dir": str(config.model_dir.resolve()),
        "calibration": str(config.calib_path.resolve()),
        "evaluation": str(config.eval_path.resolve()),
        # same paths, other contents (a file edited, a model fine-tuned again): not the same runs
        **{f"{name}_digest": _digest(getattr(config, field)) for name, (field, _) in _INPUTS.items()},
        **{
            k: getattr(config, k)
            for k in (
                "budget_kind",
                "samples",
                "seq_len",
                "seed",
                "batch_size",
                "pack",
                "eval_batch_size",
                "eval_samples",
                "task",
                "text_field",
                "pair_field",
                "label_field",
                "device",
                "dtype",
            )
        },
        "compress_options": _non_default_options(config.compress_options),
    }
    bench = None
    if config.bench:
        bench = {k: config.bench_setting(k) for k in ("bench_batch", "bench_seq_len", "backend")}
        bench.update(trials=config.bench_trials, memory=config.bench_memory)
    # through JSON, so that what is compared is what sweep.json stores (tuples as lists, paths as text)
    return json.loads(json.dumps({"runs": runs, "bench": bench}, sort_keys=True, default=str))


# each input: its SweepConfig field and how the CLI names it
_INPUTS = {
    "model": ("model_dir", "MODEL"),
    "calibration": ("calib_path", "--data"),
    "evaluation": ("eval_path", "--eval"),
}


def _digest(path: Path) -> str | None:
    """:func:`statprune.checkpoint.file_digest` of an input, remembered while it is unchanged
    (size and modification time), since every checkpoint of a sweep compares it; None when it
    cannot be read (the reading itself reports that)."""
    from statprune.checkpoint import file_digest

    try:
        path = Path(path).resolve()
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        stamp = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    except OSError:
        return None
    if stamp not in _DIGESTS:
        _DIGESTS[stamp] = file_digest(path)
    return _DIGESTS[stamp]


_DIGESTS: dict[tuple, str] = {}


def _non_default_options(options: dict[str, Any]) -> dict[str, Any]:
    """The compression options that differ from ``CompressionOptions``' defaults (the CLI passes
    every one, the API only those given: the same sweep either way)."""
    from dataclasses import MISSING

    from statprune.options import CompressionOptions

    defaults = CompressionOptions.__dataclass_fields__
    kept = {}
    for name, value in options.items():
        f = defaults.get(name)
        default = MISSING if f is None else f.default
        if default is MISSING and f is not None and f.default_factory is not MISSING:
            default = f.default_factory()
        if default is MISSING or _plain(value) != _plain(default):
            kept[name] = value
    return kept


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


_SETTING_FLAGS = {
    "model_dir": "MODEL",
    "calibration": "--data",
    "evaluation": "--eval",
    "eval_samples": "--eval-samples",
    "eval_batch_size": "eval_batch_size",
}


def _setting_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``--flag was OLD, now NEW`` for every setting that differs between two sweeps' ``runs``
    settings (compression options one by one; an option missing from one side has its default)."""
    from statprune.options import CompressionOptions

    def flag(name: str) -> str:
        return _SETTING_FLAGS.get(name, "--" + name.replace("_", "-"))

    def shown(value: Any) -> str:
        if isinstance(value, bool) or value is None:
            return {True: "on", False: "off", None: "unset"}[value]
        return ",".join(map(str, value)) if isinstance(value, list) else str(value)

    changes = []
    for name in sorted(set(old) | set(new)):
        if name == "compress_options":
            continue
        if name.endswith("_digest"):
            if name in old and old[name] != new.get(name):
                changes.append(
                    f"the contents of {_INPUTS[name.removesuffix('_digest')][1]} changed since then"
                )
            continue
        if old.get(name) != new.get(name):
            changes.append(f"{flag(name)} was {shown(old.get(name))}, now {shown(new.get(name))}")
    before, after = old.get("compress_options") or {}, new.get("compress_options") or {}
    fields_ = CompressionOptions.__dataclass_fields__
    defaults = {name: _plain(_option_default(f)) for name, f in fields_.items()}
    for name in sorted(set(before) | set(after)):
        was, now = before.get(name, defaults.get(name)), after.get(name, defaults.get(name))
        if was != now:
            changes.append(f"{flag(name)} was {shown(was)}, now {shown(now)}")
    return changes


def _option_default(f) -> Any:
    from dataclasses import MISSING

    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else None


def _previous(config: SweepConfig) -> _Previous | None:
    """The finished runs of an earlier sweep into ``config.out`` with the same settings (inputs
    compared by content), to resume it; None when there is none. An earlier sweep with other
    settings is an ``OutputError`` naming what differs, or, under ``--overwrite``, ignored (and
    replaced). A checkpoint (:data:`PARTIAL`) with the same settings is resumed under
    ``--overwrite`` too: it is this same command's progress."""
    out = config.out
    if out is None:
        return None
    current = _settings(config)
    found = _read_partial(out, current, config.overwrite)
    if found is None:
        return None if config.overwrite else _completed(out, current)
    partial, dense_eval = found
    # the checkpoint is newer than any completed sweep there: that one's runs join only if they match
    previous = None if config.overwrite else _completed(out, current, strict=False)
    if previous is None:
        return _Previous(partial, None, None, resumed_partial=len(partial), dense_eval=dense_eval)
    previous.rows.update(partial)
    previous.resumed_partial = len(partial)
    return previous


def _completed(out: Path, current: dict[str, Any], strict: bool = True) -> _Previous | None:
    """The runs of the completed sweep in ``out`` (``results.json`` and ``sweep.json``); one of
    other settings is an ``OutputError`` (not ``strict``: None)."""
    if not (out / "results.json").is_file():
        return None
    try:
        meta = json.loads((out / "sweep.json").read_text())
        raw = json.loads((out / "results.json").read_text())
    except (OSError, ValueError):
        return None  # not a sweep's folder: refused as any non-empty folder is
    stored = meta.get("settings") if isinstance(meta, dict) else None
    if not isinstance(stored, dict) or not isinstance(raw, list):
        return None
    if not strict and not _same_runs(stored, current):
        return None
    _check_same_runs(out, stored, current, "a sweep", "pass --overwrite or choose another folder")
    same_bench = current["bench"] is not None and stored.get("bench") == current["bench"]
    rows = _rows_from(raw, keep_bench=same_bench)
    if rows is None:  # not rows of this version: refused as any non-empty folder is
        return None
    dense = rows.pop(("dense", None), None)
    return _Previous(
        rows,
        dense if same_bench else None,
        meta.get("bench") if same_bench else None,
        dense_eval=_dense_eval(meta.get("dense_value"), meta.get("eval_examples")),
        held_best=_held_best(out),
    )


def _dense_eval(value: Any, examples: Any) -> tuple[float, int] | None:
    """The dense model's evaluation an earlier run recorded, when it is a well-formed one (the
    inputs' digests in the settings vouch that it still holds)."""
    ok = isinstance(value, int | float) and isinstance(examples, int) and not isinstance(value, bool)
    return (float(value), examples) if ok and math.isfinite(value) else None


def _read_partial(
    out: Path, current: dict[str, Any], overwrite: bool = False
) -> tuple[dict[tuple[str, float], SweepRow], tuple[float, int] | None] | None:
    """The runs an interrupted sweep into ``out`` checkpointed (:data:`PARTIAL`) and its dense
    evaluation, or None. One of other settings is an ``OutputError`` (``overwrite``: ignored, and
    replaced by this sweep's)."""
    try:
        data = json.loads((out / PARTIAL).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("settings"), dict):
        return None
    if overwrite and not _same_runs(data["settings"], current):
        return None
    where = f"pass --overwrite (or delete {out / PARTIAL}) to start over, or choose another folder"
    _check_same_runs(out, data["settings"], current, "an unfinished sweep", where)
    rows = _rows_from(data.get("rows"), keep_bench=False)
    if rows is None:
        return None
    rows.pop(("dense", None), None)
    dense = data.get("dense") if isinstance(data.get("dense"), dict) else {}
    return rows, _dense_eval(dense.get("value"), dense.get("examples"))


def _same_runs(stored: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether two sweeps' ``runs`` settings match (input digests only where both have them:
    sweeps written before they were recorded are compared by path)."""
    old, new = stored.get("runs") or {}, dict(current["runs"])
    for name in [n for n in new if n.endswith("_digest") and n not in old]:
        del new[name]
    return old == new


def _check_same_runs(out: Path, stored: dict[str, Any], current: dict[str, Any], what: str, fix: str) -> None:
    if not _same_runs(stored, current):
        differ = _setting_changes(stored.get("runs") or {}, current["runs"])
        raise OutputError(
            f"--out {out} holds {what} with other settings ({'; '.join(differ) or 'format'}); rerun "
            f"with the same ones to resume it, or {fix}"
        )


def _rows_from(raw: Any, keep_bench: bool) -> dict[tuple[str, float | None], SweepRow] | None:
    """``results.json``-style rows by (method, budget) (the dense row under ``("dense", None)``);
    without ``keep_bench`` their measurements are dropped (measured again). None: not rows of
    this version."""
    if not isinstance(raw, list):
        return None
    fields = set(SweepRow.__dataclass_fields__)
    rows: dict[tuple[str, float | None], SweepRow] = {}
    for item in raw:
        try:
            row = SweepRow(**{k: v for k, v in item.items() if k in fields})
        except (TypeError, AttributeError):
            return None
        if row.change_interval is not None:
            row.change_interval = tuple(row.change_interval)
        if not keep_bench:
            for name in _BENCH_FIELDS:
                setattr(row, name, None)
        dense = row.method == "dense"
        rows["dense" if dense else row.method, None if dense else row.budget] = row
    return rows


PARTIAL = "sweep.partial.json"


class _Checkpoint:
    """The finished runs of a sweep, saved into ``out/``:data:`PARTIAL` after every run (atomically)
    so that a sweep killed or interrupted while compressing or evaluating resumes where it stopped
    when the same command is run again; removed when the sweep's outputs are written. ``None``
    ``out``: nothing is saved."""

    def __init__(
        self,
        out: Path | None,
        settings: dict[str, Any],
        previous: _Previous | None,
        dense_eval: tuple[float, int],
    ) -> None:
        self.out, self.settings, self.dense_eval = out, settings, dense_eval
        self.rows: dict[tuple[str, float], SweepRow] = dict(previous.rows) if previous is not None else {}
        self.written = False
        self._made_out = False

    @property
    def path(self) -> Path | None:
        return None if self.out is None else self.out / PARTIAL

    def save(self, row: SweepRow) -> None:
        """Record a finished run (its measurements are not kept: ``--bench`` measures after the runs)."""
        self.rows[row.method, row.budget] = row
        if self.out is None:
            return
        from statprune.atomic import write_text

        if not self.out.exists():
            self.out.mkdir(parents=True)
            self._made_out = True
        value, examples = self.dense_eval
        data = {
            "settings": self.settings,
            "dense": {"value": value, "examples": examples},  # not evaluated again on resuming
            "rows": [r.to_dict() for r in self.rows.values()],
        }
        write_text(self.path, json.dumps(data, indent=2) + "\n")
        self.written = True

    def interrupted_message(self) -> str:
        if self.out is None:
            return "interrupted; nothing was saved (pass --out to make a sweep resumable)"
        if not self.path.exists():
            return "interrupted before any run finished; nothing was written"
        n = len(self.rows)
        return (
            f"interrupted; the {n} finished run{'s are' if n != 1 else ' is'} saved in {self.path}: rerun "
            "the same command to resume (finished runs are not compressed again)"
        )

    def discard(self) -> None:
        """Remove the checkpoint (and ``out`` when it was made only to hold it)."""
        if self.path is None or not self.path.exists():
            return
        self.path.unlink()
        if self._made_out and not any(self.out.iterdir()):
            self.out.rmdir()


def _unreachable_budgets(
    config: SweepConfig, dense: nn.Module, batches: list
) -> dict[tuple[str, float], str]:
    """``(method, budget) -> why`` for the runs whose FLOPs or params budget lies below the
    reachable floor (``allocation.check_reachable``: every unit ``--prune`` allows removed), from
    the model's shapes alone (latency: from the lookup tables measured on this machine, cached per
    model shape, device and backend, which compress then reuses); ``BudgetError`` when no run can
    be met, ``DataError`` when the calibration ``batches`` hold too few tokens for a method that
    reads them (``stages.check_enough_tokens``, which its runs would raise)."""
    import warnings

    from statprune.allocation import adds_biases, check_reachable
    from statprune.errors import StatpruneError
    from statprune.flops import model_shapes
    from statprune.pipeline.stages import check_enough_tokens, resolve_options

    kind, found = config.budget_kind, {}
    for method in config.methods:
        try:
            plan = resolve_options(
                dense,
                method=method,
                seq_len=config.seq_len,
                device=str(next(dense.parameters()).device),
                **{f"keep_{kind}": 1.0},
                **config.compress_options,
            )
        except StatpruneError:
            continue  # the method's own constraints fail its runs one by one
        shapes = model_shapes(plan.adapter, dense.base_model)
        with warnings.catch_warnings():  # the thin-data warning comes with each run
            warnings.simplefilter("ignore")
            check_enough_tokens(shapes, batches, plan, requested=config.samples)
        cost: Any = kind
        if kind == "latency":  # the measured lookup tables (cached: compress reads them again)
            from statprune.latency import LatencyCost, latency_table

            try:
                table = latency_table(
                    dense,
                    plan.adapter,
                    shapes,
                    batch=plan.options.bench_batch,
                    seq_len=plan.options.latency_seq_len,
                    backend=plan.options.backend,
                )
            except StatpruneError:
                continue  # each run reports it
            cost = LatencyCost(table)
        for budget in config.budgets:
            try:
                check_reachable(
                    shapes,
                    cost,
                    budget,
                    config.seq_len,
                    plan.options.prune,
                    adds_biases(plan),
                    name=config.budget_flag,
                )
            except BudgetError as exc:
                found[method, budget] = str(exc)
    if found and len(found) == len(config.methods) * len(config.budgets):
        lowest = max(found, key=lambda k: k[1])
        raise BudgetError(f"every run is out of reach; {found[lowest]}")
    return found


def _achieved(report: CompressionReport, budget_kind: str) -> float:
    """The achieved fraction of the budget kind (latency: the cost model's prediction)."""
    if budget_kind == "latency":
        return float(report.latency["predicted_fraction"])
    return report.flops_kept if budget_kind == "flops" else report.params_kept


def _bench(
    config: SweepConfig,
    result: SweepResult,
    candidates: list[tuple[SweepRow, Path]],
    device: str,
    say: Callable[[str], None],
    previous: _Previous | None = None,
) -> bool:
    """Measure the dense model and every candidate side by side (``statprune.bench.benchmark``:
    the same warm-up, interleaved trials, medians and peak memory as ``statprune bench``) and
    fill in the rows' measured fields and ``result.dense_row``; warn when the trials were noisy.

    A model that cannot be measured (it does not load or run on the backend, its memory-measuring
    child process dies) gets ``bench_error`` and empty latency fields; the others are measured.
    A ``KeyboardInterrupt`` while measuring marks every model not measured; True is returned so
    that the caller writes the results and then stops. When resuming (``previous``), only the
    candidates given are measured, next to the dense model again (their ``latency_fraction`` is
    relative to that session's dense latency); the dense row of the earlier run is kept."""
    import warnings

    from statprune.bench import NOISY_SPREAD, benchmark, noisy

    batch, seq_len = config.bench_setting("bench_batch"), config.bench_setting("bench_seq_len")
    backend = config.bench_setting("backend")
    old_dense = previous.dense if previous is not None else None
    if old_dense is not None and _measured(old_dense, config) and not candidates:
        result.dense_row, result.bench = old_dense, previous.bench  # nothing left to measure
        return False
    dense = SweepRow(
        result.model,
        result.task,
        "dense",
        result.budget_kind,
        1.0,
        1.0,
        result.metric,
        result.dense_value,
        result.dense_value,
        0.0,
        flops_kept=1.0,
        params_kept=1.0,
    )
    if result.budget_kind == "latency":
        dense.predicted_latency_fraction = 1.0
    models = [(dense, config.model_dir), *candidates]
    say(
        f"bench: {len(models)} models side by side, batch {batch} x {seq_len} tokens, "
        f"{backend} on {device}, {config.bench_trials} trials"
    )
    tic = time.perf_counter()
    failures: dict[str, str] = {}
    interrupted = False
    try:
        measured = benchmark(
            [folder for _, folder in models],
            batches=(batch,),
            seq_len=seq_len,
            backend=backend,
            device=device,
            trials=config.bench_trials,
            dtype=config.dtype or "float32",
            lm_batches=(batch,),
            memory=config.bench_memory,
            threads=config.bench_threads,
            generate=False,
            failures=failures,
        )
    except KeyboardInterrupt:
        interrupted, measured = True, []
        for _, folder in models:
            failures.setdefault(str(folder), "interrupted while measuring (Ctrl-C)")
    except (StatpruneError, RuntimeError, OSError, ImportError) as exc:  # every model fails
        measured = []
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        for _, folder in models:
            failures.setdefault(str(folder), reason)
    forward = {r.model: r for r in measured if r.kind == "forward"}
    by_model = dict(forward)
    for r in measured:  # causal LMs on torch: prefill is what serving pays
        if r.kind == "prefill":
            fwd = forward[r.model]
            r.peak_memory_mb, r.memory_method = fwd.peak_memory_mb, fwd.memory_method
            r.weight_mb, r.memory_noise_mb = fwd.weight_mb, fwd.memory_noise_mb
            by_model[r.model] = r
    reference = by_model.get(str(config.model_dir))
    for row, folder in models:
        for name in _BENCH_FIELDS:
            setattr(row, name, None)
        bench_row = by_model.get(str(folder))
        row.bench_error = failures.get(str(folder))
        if bench_row is None:
            say(f"bench: {_row_name(row)} not measured: {row.bench_error}")
            continue
        row.latency_ms = round(bench_row.latency_ms, 4)
        row.latency_p90_ms = round(bench_row.latency_p90_ms, 4)
        row.throughput = round(bench_row.throughput, 4)
        row.unit = bench_row.unit
        row.peak_memory_mb = None if bench_row.peak_memory_mb is None else round(bench_row.peak_memory_mb, 2)
        row.weight_mb = None if bench_row.weight_mb is None else round(bench_row.weight_mb, 4)
        if reference is not None and reference.latency_ms:
            row.latency_fraction = bench_row.latency_ms / reference.latency_ms
        if row.bench_error:
            say(f"bench: {_row_name(row)}: {row.bench_error}")
    rows = list(by_model.values())
    shaky = noisy(rows)
    head = reference or (rows[0] if rows else None)
    noise = None if reference is None else reference.memory_noise_mb
    bench = {
        "batch": batch,
        "seq_len": seq_len,
        "backend": backend,
        "device": head.device if head else device,
        "threads": head.threads if head else None,
        "trials": head.trials if head else config.bench_trials,
        "kind": head.kind if head else "forward",
        "memory_method": head.memory_method if head else "not measured",
        "memory_noise_mb": None if noise is None else round(noise, 2),
        "seconds": round(time.perf_counter() - tic, 3),
        "max_spread": round(
            max((r.latency_p90_ms / r.latency_ms for r in rows if r.latency_ms > 0), default=1.0), 3
        ),
        "noisy": [r.label for r in shaky],
        "failed": {_row_name(row): row.bench_error for row, _ in models if row.bench_error},
        "warning": None,
    }
    if old_dense is not None and _measured(old_dense, config):  # resumed: keep the first session's dense
        bench["resumed"] = {
            "measured_again": [_row_name(row) for row, _ in candidates],
            "dense_latency_ms": None if reference is None else round(reference.latency_ms, 4),
            "first_dense_latency_ms": old_dense.latency_ms,
        }
        dense = old_dense
        if previous is not None and previous.bench:
            for key in ("device", "threads", "kind", "memory_method", "memory_noise_mb"):
                bench[key] = previous.bench.get(key, bench[key])
    result.dense_row, result.bench = dense, bench
    if shaky:
        message = (
            f"noisy machine: {len(shaky)} of {len(rows)} latency measurements have a trial spread "
            f"(p90/median) above {NOISY_SPREAD} (worst {bench['max_spread']:.2f}); rerun on "
            "a quieter machine before trusting the latency ranking"
        )
        bench["warning"] = message
        warnings.warn(message, BenchWarning, stacklevel=3)
    done = f"dense {dense.latency_ms:.1f} ms" if dense.latency_ms is not None else "dense not measured"
    say(f"bench: {bench['seconds']:.1f} s; {done}")
    return interrupted


class BenchWarning(UserWarning):
    """Latency measurements of a sweep taken on a noisy machine."""


# --------------------------------------------------------------------------------------- output


def results_markdown(result: SweepResult) -> str:
    """The protocol line and the budgets x methods table (plus agreement, when measured)."""
    metric = result.metric
    best = result.selection.best if result.selection else None
    cells = {(r.method, r.budget): r for r in result.rows}
    direction = "higher" if result.higher_is_better else "lower"
    lines = [f"# statprune sweep: {result.model}", "", result.protocol(), ""]
    header = f"| keep {_KIND_LABELS[result.budget_kind]} | " + " | ".join(result.methods) + " |"
    rule = "|---|" + "---:|" * len(result.methods)
    predicted = " predicted" if result.budget_kind == "latency" else ""

    def table(value_of: Callable[[SweepRow], float | None], dense: float, fmt_metric: str) -> list[str]:
        rows = [
            header,
            rule,
            "| dense (100%) | " + " | ".join(_fmt(fmt_metric, dense) for _ in result.methods) + " |",
        ]
        for budget in result.budgets:
            parts = []
            for method in result.methods:
                row = cells.get((method, budget))
                if row is None or row.value is None:
                    parts.append("failed" if row is not None else "—")
                    continue
                text = f"{_fmt(fmt_metric, value_of(row))} ({row.achieved:.1%}{predicted})"
                parts.append(f"**{text}**" if row is best else text)
            rows.append(f"| {budget * 100:g}% | " + " | ".join(parts) + " |")
        return rows

    lines += table(lambda r: r.value, result.dense_value, metric)
    lines += [
        "",
        f"Cells: {metric_label(metric)} ({direction} is better) on the evaluation set, with the "
        + (
            "fraction of the dense latency kept as predicted by the lookup tables (not measured) "
            if result.budget_kind == "latency"
            else f"achieved fraction of {_KIND_LABELS[result.budget_kind]} kept "
        )
        + "in parentheses; rows are the requested budgets.",
    ]
    if metric != "agreement" and any(r.agreement is not None for r in result.rows):
        lines += ["", "Top-1 agreement with the dense model:", ""]
        lines += table(lambda r: r.agreement, 1.0, "agreement")
    if result.dense_row is not None and result.bench is not None:
        lines += ["", *_bench_markdown(result, cells, best)]
    failed = [r for r in result.rows if r.error]
    if failed:
        lines += ["", "Failed runs:", ""]
        lines += [f"- {r.method} at keep {r.budget:g}: {r.error}" for r in failed]
    if result.selection is not None:
        lines += [
            "",
            f"Selection (`--min-quality {result.selection.min_quality}`; rule: "
            f"{result.selection.rule}): {result.selection.message}.",
        ]
    return "\n".join(lines) + "\n"


_KIND_LABELS = {"flops": "FLOPs", "params": "parameters", "latency": "latency"}


def _bench_markdown(result: SweepResult, cells: dict, best: SweepRow | None) -> list[str]:
    """The measured table: median latency (share of dense), throughput, peak memory and weights,
    with a footnote for peaks that show no real saving and the models that were not measured."""
    from statprune.bench import MEMORY_CAVEAT_NOTE, memory_caveat, weight_share
    from statprune.decision import column_decimals

    bench, dense = result.bench, result.dense_row
    noise = bench.get("memory_noise_mb")
    flagged = []
    measured = [r for r in (dense, *result.rows) if r is not None]
    digits = column_decimals([r.latency_ms for r in measured], 1, 4)
    weight_digits = column_decimals([r.weight_mb for r in measured], 1, 4)

    def cell(row: SweepRow | None) -> str:
        if row is None:
            return "—"
        if row.latency_ms is None:
            return "failed" if row.value is None else "not measured"
        fraction = "" if row.latency_fraction is None else f" ({row.latency_fraction:.1%} of dense)"
        text = f"{row.latency_ms:,.{digits}f} ms{fraction}, {row.throughput:,.1f} {row.unit}"
        if row.peak_memory_mb is not None:
            text += f", peak {row.peak_memory_mb:,.1f} MiB"
            if row is not dense and memory_caveat(row.peak_memory_mb, dense.peak_memory_mb, noise):
                text += " ‡"
                flagged.append(row)
        if row.weight_mb is not None:
            text += f", weights {row.weight_mb:,.{weight_digits}f} MiB"
        return f"**{text}**" if row is best else text

    lines = [
        f"Measured ({bench['kind']}, {bench_setting(bench)}"
        + f", median of {bench['trials']} interleaved trials; peak memory: {bench['memory_method']}):",
        "",
        f"| keep {_KIND_LABELS[result.budget_kind]} | " + " | ".join(result.methods) + " |",
        "|---|" + "---:|" * len(result.methods),
        "| dense (100%) | " + " | ".join(cell(dense) for _ in result.methods) + " |",
    ]
    for budget in result.budgets:
        parts = [cell(cells.get((m, budget))) for m in result.methods]
        lines.append(f"| {budget * 100:g}% | " + " | ".join(parts) + " |")
    lines += [
        "",
        "Cells: median latency (its share of the dense latency), throughput, peak memory during one "
        "forward and the model's own weights (parameters and buffers; MiB = 2^20 bytes).",
    ]
    if noise is not None:
        lines += [
            "",
            f"Peak-memory noise: {noise:,.1f} MiB (two measurements of the dense model "
            "in separate processes).",
        ]
    share = weight_share(dense.weight_mb, dense.peak_memory_mb)
    if share:
        lines += ["", f"Dense model: {share}; the rest is activations and the runtime's own allocations."]
    if flagged:
        note = MEMORY_CAVEAT_NOTE.replace("dense (first)", "dense")
        lines += ["", f"‡ {note[0].upper()}{note[1:]}."]
    resumed = bench.get("resumed")
    if resumed:
        lines += [
            "",
            f"Resumed: {', '.join(resumed['measured_again'])} measured in a second session next to "
            f"the dense model (dense {_ms(resumed['dense_latency_ms'], digits)} in that session, "
            f"{_ms(resumed['first_dense_latency_ms'], digits)} in the first, which the dense row "
            "shows); "
            "their shares are of their own session's dense latency.",
        ]
    failed = [r for r in (dense, *result.rows) if r is not None and r.bench_error]
    if failed:
        lines += ["", "Not measured (or measured in part):", ""]
        lines += [f"- {_row_name(r)}: {r.bench_error}" for r in failed]
    if bench.get("warning"):
        lines += ["", f"**Warning:** {bench['warning']}."]
    return lines


def _ms(value: float | None, digits: int = 1) -> str:
    return "not measured" if value is None else f"{value:,.{digits}f} ms"


def _method_lines(ax: Any, result: SweepResult, x_of: Callable[[SweepRow], float | None]) -> None:
    """One line per method: quality against ``x_of(row)`` (rows without either are skipped)."""
    markers = "osD^v<>p"
    for i, method in enumerate(result.methods):
        points = sorted(
            (x_of(r), r.value)
            for r in result.rows
            if r.method == method and r.value is not None and x_of(r) is not None and math.isfinite(r.value)
        )
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker=markers[i % len(markers)], linewidth=1.8, markersize=6, label=method)


def _mark_selection(
    ax: Any,
    result: SweepResult,
    x_of: Callable[[SweepRow], float | None],
    x_text: Callable[[SweepRow], str],
    bar_suffix: str = "",
) -> None:
    """The quality bar (dotted) and the selected run (a star at ``x_of``), when there are."""
    from statprune.plot_marks import quality_bar, selected_point

    selection = result.selection
    if selection is None:
        return
    sign = ">=" if result.higher_is_better else "<="
    quality_bar(ax, selection.threshold, f"bar {sign} {_fmt(result.metric, selection.threshold)}{bar_suffix}")
    best = selection.best
    if best is not None and x_of(best) is not None:
        selected_point(ax, x_of(best), best.value, f"selected: {best.method} at {x_text(best)}")


def write_latency_plot(result: SweepResult, path: Path) -> None:
    """Quality against measured latency (``--bench``): a line per method, the dense point, the
    quality bar and the selected run marked."""
    from matplotlib.figure import Figure

    metric, dense = result.metric, result.dense_row
    assert dense is not None and dense.latency_ms is not None
    fig = Figure(figsize=(7.5, 4.8), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    _method_lines(ax, result, lambda r: r.latency_ms)
    ax.plot(
        [dense.latency_ms],
        [result.dense_value],
        marker="X",
        markersize=11,
        color="black",
        linestyle="none",
        label=f"dense ({dense.latency_ms:.1f} ms, {_fmt(metric, result.dense_value)})",
    )
    _mark_selection(ax, result, lambda r: r.latency_ms, lambda r: f"{r.latency_ms:.1f} ms")
    bench = result.bench or {}
    ax.set_xlabel(
        f"measured latency, ms ({bench.get('kind', 'forward')}, batch {bench.get('batch')} x "
        f"{bench.get('seq_len')} tokens, {bench.get('backend')} on {bench.get('device')})"
    )
    direction = "higher" if result.higher_is_better else "lower"
    ax.set_ylabel(f"{metric_label(metric)} ({direction} is better)")
    title = f"{result.model}: quality against measured latency"
    if bench.get("warning"):
        title += " (noisy machine)"
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=9, loc="best")
    fig.savefig(path)


def write_plot(result: SweepResult, path: Path) -> None:
    """Quality against achieved fraction kept: a line per method, the dense value dashed."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    from statprune.plot_marks import dense_line

    metric = result.metric
    fig = Figure(figsize=(7.5, 4.8), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    _method_lines(ax, result, lambda r: r.achieved)
    dense_line(ax, result.dense_value, f"dense ({_fmt(metric, result.dense_value)})")
    selection = result.selection
    share = ""
    if selection is not None and selection.min_quality.endswith("%"):
        share = f" ({selection.min_quality} of dense)"
    _mark_selection(ax, result, lambda r: r.achieved, lambda r: f"{r.achieved:.1%}", share)
    if metric == "perplexity":
        values = [r.value for r in result.rows if r.value is not None and r.value > 0]
        if values and max(values) / max(min([*values, result.dense_value]), 1e-30) > 10:
            ax.set_yscale("log")
    achieved = [r.achieved for r in result.rows if r.achieved is not None]
    ax.set_xlim(max(0.0, min(achieved, default=0.0) - 0.05), 1.02)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    if result.budget_kind == "latency":
        ax.set_xlabel("latency kept (predicted by the lookup tables, fraction of dense)")
    else:
        ax.set_xlabel(
            f"{'FLOPs' if result.budget_kind == 'flops' else 'parameters'} kept "
            f"(attention+FFN, fraction of dense)"
        )
    direction = "higher" if result.higher_is_better else "lower"
    ax.set_ylabel(f"{metric_label(metric)} ({direction} is better)")
    ax.set_title(
        f"{result.model}: {result.task}, {result.calibration_examples} calibration examples, "
        f"seq len {result.seq_len}",
        fontsize=10,
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=9, loc="best")
    fig.savefig(path)


def _best_json(result: SweepResult, calib_path: Path) -> dict[str, Any]:
    selection = result.selection
    assert selection is not None
    data = selection.to_dict()
    data.update(
        model=result.model,
        metric=result.metric,
        dense_value=result.dense_value,
        higher_is_better=result.higher_is_better,
    )
    best = selection.best
    data["command"] = (
        None
        if best is None
        else (
            f"statprune compress {result.model_dir} --data {calib_path} --keep-{best.budget_kind} "
            f"{best.budget:g} --method {best.method} --samples {result.calibration_examples} "
            f"--seq-len {result.seq_len} --seed {result.seed} --out OUT"
        )
    )
    return data


def bench_setting(bench: dict[str, Any]) -> str:
    """What ``--bench`` measured, in words: ``batch B x S tokens, BACKEND on DEVICE[, N threads]``."""
    threads = bench.get("threads")
    return f"batch {bench['batch']} x {bench['seq_len']} tokens, {bench['backend']} on {bench['device']}" + (
        f", {threads} thread{'' if threads == 1 else 's'}" if threads else ""
    )


def _sweep_json(result: SweepResult, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """The protocol and settings of a sweep (``statprune report`` reads them)."""
    keys = (
        "model",
        "architecture",
        "task",
        "metric",
        "higher_is_better",
        "dense_value",
        "budget_kind",
        "budgets",
        "methods",
        "seq_len",
        "seed",
        "calibration_examples",
        "calibration_tokens",
        "eval_examples",
        "seconds",
    )
    objective = result.selection.objective if result.selection is not None else None
    data = {
        "protocol": result.protocol(),
        "model_dir": str(result.model_dir.resolve()),
        **{k: getattr(result, k) for k in keys},
        "objective": objective,
        "bench": result.bench,
    }
    if result.bench is not None:
        data["bench_setting"] = bench_setting(result.bench)
    if settings is not None:
        data["settings"] = settings  # a rerun into the same --out resumes when they match
    return data


_OWN_OUTPUTS = (
    "results.json",
    PARTIAL,
    "results.md",
    "sweep.json",
    "plot.png",
    "plot_latency.png",
    "best.json",
    "best",
)


# what `statprune report` writes from a sweep's results by default: stale once they change
_DERIVED = ("report.html", "report.md")


def _write(
    result: SweepResult,
    out: Path,
    overwrite: bool,
    saved,
    tokenizer,
    calib_path: Path,
    settings=None,
    resumed: bool = False,
) -> list[str]:
    """Write every output into a temporary folder next to ``out``, then rename it into place.
    ``saved``: the model for ``best/`` (model and report), or a folder to copy there (with its
    files' times, so a ``bench.json`` of it stays valid). ``resumed``: ``out`` holds the earlier
    run; files the sweep does not write (a ``bench.json``, the user's own) are carried over, and so
    is the report made from the earlier results (:data:`_DERIVED`) unless the results or the
    selection changed, in which case it is dropped. Returns the names dropped."""
    import shutil

    from statprune.atomic import atomic_folder
    from statprune.persist import save

    out = out.resolve()
    dropped = []
    with atomic_folder(out) as tmp:
        (tmp / "results.json").write_text(json.dumps(result.to_rows(), indent=2) + "\n")
        (tmp / "results.md").write_text(results_markdown(result))
        (tmp / "sweep.json").write_text(json.dumps(_sweep_json(result, settings), indent=2) + "\n")
        write_plot(result, tmp / "plot.png")
        if result.dense_row is not None and result.dense_row.latency_ms is not None:
            write_latency_plot(result, tmp / "plot_latency.png")
        if result.selection is not None:
            (tmp / "best.json").write_text(json.dumps(_best_json(result, calib_path), indent=2) + "\n")
        if isinstance(saved, Path):  # the candidate --bench measured, saved the same way
            shutil.copytree(saved, tmp / "best")
        elif saved is not None:
            model, report = saved
            save(model, tmp / "best", tokenizer=tokenizer, report=report)
        same = all(_same_file(out / name, tmp / name) for name in ("results.json", "best.json"))
        for item in sorted(out.iterdir()) if resumed and out.is_dir() else ():
            if item.name in _DERIVED and not same:
                dropped.append(item.name)
            elif item.name not in _OWN_OUTPUTS:
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        _check_out(out, overwrite, result.model_dir)  # still free after the (long) sweep?
    return dropped


def _held_best(out: Path) -> tuple[str, float] | None:
    """(method, budget) of the model an earlier sweep saved into ``out/best`` (its report), or None."""
    try:
        report = json.loads((out / "best" / "statprune.json").read_text())
        return str(report["options"]["method"]), float(report["budget"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _same_file(a: Path, b: Path) -> bool:
    """Both missing, or both present with the same bytes."""
    if a.is_file() != b.is_file():
        return False
    return not a.is_file() or a.read_bytes() == b.read_bytes()


def add_sweep_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``sweep`` command to an ``add_subparsers()`` object; returns its parser."""
    s = subparsers.add_parser(
        "sweep",
        help="compress at several budgets with several methods and tabulate quality vs size",
        description="Compress MODEL at every budget with every method, evaluate each result against "
        "the dense model, and write results.json, results.md and plot.png into --out.",
    )
    s.add_argument("model", type=Path, help="Hugging Face model folder")
    s.add_argument("--data", type=Path, required=True, help="calibration data: .txt, .jsonl, .csv or folder")
    s.add_argument(
        "--eval",
        type=Path,
        required=True,
        dest="eval_data",
        help="evaluation data (.jsonl/.csv with a label field for classifiers: accuracy)",
    )
    s.add_argument(
        "--budgets",
        default=None,
        help="fractions to keep, comma-separated (default: "
        + ",".join(f"{b:g}" for b in DEFAULT_BUDGETS)
        + ")",
    )
    s.add_argument(
        "--budget-kind",
        default="flops",
        choices=BUDGET_KINDS,
        help="what the budgets keep: attention+FFN flops (default), params, or latency "
        "(measured lookup tables; see --bench-batch, --bench-seq-len)",
    )
    s.add_argument(
        "--keep-latency",
        type=fraction,
        default=None,
        metavar="F",
        help="one latency budget: the same as --budget-kind latency --budgets F",
    )
    s.add_argument(
        "--bench",
        action="store_true",
        help="measure every candidate and the dense model side by side (as statprune bench: "
        "latency, throughput, peak memory) at --bench-batch x --bench-seq-len on --backend",
    )
    s.add_argument(
        "--bench-trials",
        type=positive_int,
        default=10,
        help="--bench: timed rounds, each timing every model once (default: %(default)s)",
    )
    s.add_argument(
        "--bench-no-memory",
        action="store_true",
        help="--bench: skip peak memory (on CPU it loads each model again in a child process)",
    )
    s.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        dest="bench_threads",
        help="--bench: CPU intra-op threads of every backend (default: torch's, i.e. "
        "OMP_NUM_THREADS or one per core; as statprune bench --threads)",
    )
    s.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default=None,
        help="with --min-quality: pick the candidate meeting the bar with the lowest "
        "measured latency, flops, params or peak memory (default: latency with "
        "--bench, else the smallest achieved fraction)",
    )
    s.add_argument(
        "--methods",
        default=",".join(default_sweep_methods()),
        help=f"comma-separated, from {','.join(method_names())} (default: %(default)s)",
    )
    s.add_argument("--samples", type=positive_int, default=512, help="calibration examples to draw")
    s.add_argument(
        "--seq-len",
        type=positive_int,
        default=128,
        help="max tokens per example (calibration, evaluation and FLOPs accounting)",
    )
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=positive_int, default=16, help="calibration batch size")
    s.add_argument(
        "--pack",
        action="store_true",
        help="calibrate on --seq-len token windows of the joined texts (for LMs)",
    )
    s.add_argument("--eval-samples", type=positive_int, help="evaluate on the first N examples only")
    s.add_argument(
        "--task",
        default="auto",
        choices=["auto", "classify", "lm", "embed"],
        help="how to evaluate (auto: from the model class)",
    )
    s.add_argument("--text-field", help="JSONL/CSV field holding the text (default: text)")
    s.add_argument("--pair-field", help="JSONL/CSV field holding the second text of a pair")
    s.add_argument("--label-field", help="JSONL/CSV field holding the label (default: label, if present)")
    s.add_argument(
        "--min-quality",
        metavar="Q",
        help="the quality bar: among the runs with metric >= Q (<= Q for perplexity), "
        "select the best by --objective (the fastest with --bench, else the smallest); "
        "Q is absolute (0.80) or a share of the dense quality, at most 100%% (99%%)",
    )
    s.add_argument("--save-best", action="store_true", help="also save the selected model into OUT/best")
    s.add_argument("--name", help="model name in the results (default: the folder name)")
    s.add_argument("--out", type=Path, required=True, help="output folder (written atomically)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    s.add_argument("--device", default="auto", help="auto, cpu or cuda")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    s.add_argument(
        "--quiet", action="store_true", help="no progress bars (one line per run is still printed)"
    )
    add_option_arguments(s.add_argument_group("compression options (every run)"), for_sweep=True)
    for action in s._actions:  # --bench-batch: its default in the help (--bench-seq-len names its own)
        if action.dest == "bench_batch" and action.help and "default" not in action.help:
            action.help += " (default: %(default)s)"
    return s


def run_sweep(args: argparse.Namespace) -> int:
    """The ``sweep`` command: run it, print a line per run and where the results are."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.quiet or not sys.stderr.isatty():  # transformers' own bars: not in a log file
        import transformers

        transformers.utils.logging.disable_progress_bar()

    def log(line: str) -> None:
        print(line, flush=True)

    budgets, budget_kind, flag = args.budgets, args.budget_kind, "--budgets"
    if args.keep_latency is not None:
        if budgets is not None or budget_kind not in ("flops", "latency"):
            raise OptionsError("--keep-latency F is one latency budget; drop --budgets/--budget-kind")
        budgets, budget_kind, flag = [args.keep_latency], "latency", "--keep-latency"
    try:
        result = _sweep_from_args(args, budgets, budget_kind, flag, log)
    except SweepInterrupted as exc:
        print(str(exc), file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # a second signal while the first was being handled
        partial = Path(args.out) / PARTIAL
        saved = f"; the finished runs are saved in {partial}: rerun the same command to resume"
        print("interrupted" + (saved if partial.is_file() else "; nothing was written"), file=sys.stderr)
        return 130
    out = Path(args.out).resolve()
    timed = result.dense_row is not None and result.dense_row.latency_ms is not None
    written = "results.json, sweep.json, results.md, plot.png" + (", plot_latency.png" if timed else "")
    if result.selection is not None:
        written += ", best.json"
        if result.selection.saved:
            written += ", best/"
    print(f"\nwrote {written} to {out} ({result.seconds:.1f} s)")
    return 0


def _sweep_from_args(args: argparse.Namespace, budgets, budget_kind: str, flag: str, log) -> SweepResult:
    started = time.perf_counter()
    config = SweepConfig.from_arguments(
        args.model,
        args.data,
        args.eval_data,
        budgets=DEFAULT_BUDGETS if budgets is None else budgets,
        methods=args.methods,
        budget_kind=budget_kind,
        bench=args.bench,
        bench_trials=args.bench_trials,
        bench_memory=not args.bench_no_memory,
        bench_threads=args.bench_threads,
        objective=args.objective,
        samples=args.samples,
        seq_len=args.seq_len,
        seed=args.seed,
        batch_size=args.batch_size,
        pack=args.pack,
        eval_samples=args.eval_samples,
        task=args.task,
        text_field=args.text_field,
        pair_field=args.pair_field,
        label_field=args.label_field,
        min_quality=args.min_quality,
        save_best=args.save_best,
        out=args.out,
        overwrite=args.overwrite,
        name=args.name,
        device=args.device,
        dtype=args.dtype,
        progress=not args.quiet and sys.stderr.isatty(),
        log=log,
        budget_flag=flag,
        **options_from_args(args, for_sweep=True),
    )
    return run(config, started)
