"""Latency as a budget: per-layer lookup tables measured on this machine (Kwon et al. 2022, §4.4).

FLOPs are not what a deployment pays for: small widths, per-layer overheads and memory-bound
kernels make latency far from proportional to them. As Kwon et al. ("A Fast Post-Training Pruning
Framework for Transformers", NeurIPS 2022) do, statprune measures, on the machine it runs on, the
latency of one transformer layer of the model with ``h`` heads (and no FFN neuron) and with ``n``
neurons (and no head) over a coarse grid of widths, and prices every width by piecewise-linear
interpolation in the width. The layers measured are the model's own: a copy of a layer cut to each
width by the same surgery (``statprune.surgery``) the pruning uses, called on that layer's real
inputs (captured from the model on synthetic tokens), with ``statprune.bench.time_calls``'s
warm-up and interleaved trials.

Cost model (milliseconds per forward of ``batch`` sequences of ``seq_len`` tokens)::

    latency(model) = rest + Σ_layers [ base + attention(h_l) + ffn(n_l) ]

``base`` is the layer with no head and no neuron (norms, residuals), ``attention(h)`` and
``ffn(n)`` the measured increments over it (0 at width 0), made non-decreasing in the width (a
running maximum, against timing noise) and interpolated linearly between grid points; ``rest``
(embeddings, task head, per-call overhead) is the dense model's measured latency minus the
dense layers' predicted sum (floored at 0).

Matrix-multiply kernels run widths that are not a multiple of ``ALIGN`` (8) slower per unit: on this
project's 2-core CPU (torch 2.13, batch 32 × 128 tokens) an MPNet FFN of 2,765 neurons took 18 %
longer per neuron than one of 2,760 or 2,768, and widths ≡ 1…7 mod 8 around 1,152 and 2,304 cost
12–20 % more (measured side by side, interleaved). The neuron grid is therefore measured on
multiples of ``ALIGN``, plus one unaligned width per shape whose latency over the fit gives the
FFN's ``unaligned`` factor (at least 1), applied to every unaligned width. The allocation then
sees an unaligned count as dearer than the aligned one above it (more cost, more error), so latency
budgets keep aligned FFN widths, and FLOPs-budget models with arbitrary widths are priced as they
run. Heads are not adjusted (head widths are multiples of ``head_dim``).

The table is cached as JSON (never pickle) under
``$STATPRUNE_CACHE/latency/`` (default ``~/.cache/statprune/latency/``), keyed by the model's
config (its shape), device, backend, batch, sequence length, threads, dtype and torch version.

Causal LMs are priced by their **prefill** latency (one forward over the prompt filling the KV
cache); decode tokens/s is not modelled.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import statistics
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from statprune.allocation import CostModel
from statprune.errors import OptionsError
from statprune.flops import LayerShape

# widths measured per block kind (evenly spread, always including 0 and the full width)
GRID_POINTS = 5
WARMUP, TRIALS = 1, 5
ALIGN = 8  # FFN widths that are multiples of this run at full kernel speed (see the module doc)
FORMAT = 3  # version of the cached JSON layout (2: the dense model timed with the layers; 3: unaligned)


class LatencyWarning(UserWarning):
    """A latency measurement taken on a noisy machine (trial spread above ``bench.NOISY_SPREAD``)."""


# ------------------------------------------------------------------------------- the fit


@dataclass(frozen=True)
class BlockTable:
    """Measured milliseconds of one block kind by width, fitted for interpolation.

    ``widths`` ascending, starting at 0; ``ms[i]``: the latency added by ``widths[i]`` units."""

    widths: tuple[int, ...]
    ms: tuple[float, ...]

    def __call__(self, width: float) -> float:
        """Piecewise-linear interpolation in the width (constant slope of the last segment past
        the last grid point; 0 below 0)."""
        ws, ms = self.widths, self.ms
        if width <= ws[0]:
            return ms[0]
        for i in range(1, len(ws)):
            if width <= ws[i]:
                t = (width - ws[i - 1]) / (ws[i] - ws[i - 1])
                return ms[i - 1] + t * (ms[i] - ms[i - 1])
        if len(ws) == 1:
            return ms[0]
        slope = (ms[-1] - ms[-2]) / (ws[-1] - ws[-2])
        return ms[-1] + slope * (width - ws[-1])


def fit_block(widths: Sequence[int], ms: Sequence[float]) -> BlockTable:
    """A :class:`BlockTable` from measurements: sorted by width, duplicate widths averaged, and
    made non-decreasing by a running maximum (wider never costs less; the timing noise of a
    shared machine can say otherwise). A non-decreasing table is kept exactly."""
    if not widths or len(widths) != len(ms):
        raise ValueError("give one latency per width")
    by_width: dict[int, list[float]] = {}
    for w, m in zip(widths, ms, strict=True):
        by_width.setdefault(int(w), []).append(float(m))
    ordered = sorted(by_width)
    fitted, top = [], -float("inf")
    for w in ordered:
        top = max(top, statistics.fmean(by_width[w]))
        fitted.append(top)
    return BlockTable(tuple(ordered), tuple(fitted))


def grid(width: int, step: int = 1, points: int = GRID_POINTS) -> list[int]:
    """About ``points`` widths from 0 to ``width``, evenly spread, on multiples of ``step``."""
    units = width // step
    picks = {round(i * units / (points - 1)) for i in range(points)} if units else {0}
    return sorted({p * step for p in picks} | {0, width})


def unaligned_probe(neuron_grid: Sequence[int]) -> int | None:
    """A width between the last two grid points that is not a multiple of ``ALIGN`` (timed to find
    the FFN's ``unaligned`` factor), or None when the grid is too fine to hold one."""
    if len(neuron_grid) < 2:
        return None
    low, high = neuron_grid[-2], neuron_grid[-1]
    probe = low + ALIGN // 2 + 1  # odd, and past the aligned point
    return probe if low >= ALIGN and probe < high and probe % ALIGN else None


@dataclass
class LayerTable:
    """One layer shape's cost model: ``base`` ms (no head, no neuron) plus the two blocks."""

    shape: LayerShape
    base: float
    attention: BlockTable
    ffn: BlockTable
    spread: float = 1.0  # trial spread (p90 / median) of its measurements' per-round sum
    unaligned: float = 1.0  # the FFN's cost factor at widths that are not multiples of ALIGN

    def cost(self, heads: int, neurons: int) -> float:
        ffn = self.ffn(neurons) * (self.unaligned if neurons % ALIGN else 1.0)
        return self.base + self.attention(heads) + ffn

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": asdict(self.shape),
            "base_ms": self.base,
            "attention": {"widths": list(self.attention.widths), "ms": list(self.attention.ms)},
            "ffn": {"widths": list(self.ffn.widths), "ms": list(self.ffn.ms)},
            "spread": self.spread,
            "unaligned": self.unaligned,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerTable:
        return cls(
            LayerShape(**data["shape"]),
            float(data["base_ms"]),
            BlockTable(tuple(data["attention"]["widths"]), tuple(data["attention"]["ms"])),
            BlockTable(tuple(data["ffn"]["widths"]), tuple(data["ffn"]["ms"])),
            float(data.get("spread", 1.0)),
            float(data.get("unaligned", 1.0)),
        )


@dataclass
class LatencyTable:
    """Lookup tables of every distinct layer shape of one model, with what they were measured on.

    ``dense_ms``: the whole dense model's measured latency; ``rest``: what the layers do not
    account for (see the module docstring)."""

    key: dict[str, Any]
    layers: list[LayerTable]
    dense_ms: float
    rest: float
    dense_spread: float = 1.0
    source: str = "measured"  # "measured" or "cache" (where this instance came from)
    path: str | None = None  # the cache file
    seconds: float = 0.0  # measuring time (0 from the cache)

    def layer(self, shape: LayerShape) -> LayerTable:
        for table in self.layers:
            if table.shape == shape:
                return table
        raise KeyError(f"no latency table for layer shape {shape}")

    @property
    def spread(self) -> float:
        return max([self.dense_spread, *(t.spread for t in self.layers)])

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "key": self.key,
            "dense_ms": self.dense_ms,
            "rest_ms": self.rest,
            "dense_spread": self.dense_spread,
            "seconds": self.seconds,
            "layers": [t.to_dict() for t in self.layers],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyTable:
        return cls(
            key=data["key"],
            layers=[LayerTable.from_dict(t) for t in data["layers"]],
            dense_ms=float(data["dense_ms"]),
            rest=float(data["rest_ms"]),
            dense_spread=float(data.get("dense_spread", 1.0)),
            seconds=float(data.get("seconds", 0.0)),
        )


class LatencyCost(CostModel):
    """The latency cost model of :class:`LatencyTable` (milliseconds): ``fixed`` is ``rest``,
    a layer costs ``base + attention(heads) + ffn(neurons)`` of its shape's table."""

    kind = "latency"

    def __init__(self, table: LatencyTable) -> None:
        self.table = table
        self.fixed = table.rest

    def layer_cost(self, shape: LayerShape, heads: int, neurons: int) -> float:
        return self.table.layer(shape).cost(heads, neurons)


# ------------------------------------------------------------------------------ the cache


def cache_dir() -> Path:
    """``$STATPRUNE_CACHE/latency`` (default ``~/.cache/statprune/latency``)."""
    root = os.environ.get("STATPRUNE_CACHE") or Path.home() / ".cache" / "statprune"
    return Path(root).expanduser() / "latency"


def table_key(model: Any, *, device: str, backend: str, batch: int, seq_len: int, kind: str) -> dict:
    """What a table depends on: the model's config (its shape, pruned layers included), the
    device (and which CPU / GPU), backend, batch, sequence length, kind of call, threads, dtype and
    the torch version. Any difference gives another cache file."""
    import torch

    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    if str(device).startswith("cuda"):
        available = torch.cuda.is_available()
        hardware = torch.cuda.get_device_name(torch.device(device)) if available else "cuda"
    else:
        hardware = f"{platform.machine()} {platform.processor()} x{os.cpu_count()}"
    return {
        "config": json.loads(model.config.to_json_string(use_diff=False)),
        "device": str(device),
        "hardware": hardware,
        "backend": backend,
        "batch": batch,
        "seq_len": seq_len,
        "kind": kind,
        "threads": torch.get_num_threads(),
        "dtype": dtype,
        "torch": torch.__version__,
    }


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def load_cached(key: dict, directory: Path | None = None) -> LatencyTable | None:
    """The cached table for ``key`` (None when absent, unreadable or made for another key)."""
    path = (directory or cache_dir()) / f"{key_hash(key)}.json"
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT or data.get("key") != json.loads(json.dumps(key, default=str)):
            return None
        table = LatencyTable.from_dict(data)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    table.source, table.path = "cache", str(path)
    return table


def save_cached(table: LatencyTable, directory: Path | None = None) -> Path | None:
    """Write ``table`` atomically as JSON; None (and no error) where the cache cannot be written."""
    folder = directory or cache_dir()
    path = folder / f"{key_hash(table.key)}.json"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table.to_dict(), indent=1, default=str) + "\n")
        os.replace(tmp, path)
    except OSError:
        return None
    table.path = str(path)
    return path


# ------------------------------------------------------------------------------ measuring


def _stub_base(adapter: Any, layer: Any) -> Any:
    """A module holding ``layer`` at the adapter's layers path, index 0 (what the surgery walks)."""
    from torch import nn

    root = nn.Module()
    node = root
    *parents, last = adapter.layers_path.split(".")
    for name in parents:
        child = nn.Module()
        node.add_module(name, child)
        node = child
    node.add_module(last, nn.ModuleList([layer]))
    return root


def layer_variant(adapter: Any, layer: Any, heads: int, neurons: int) -> Any:
    """A copy of ``layer`` keeping its first ``heads`` query heads (grouped-query attention: the
    same number in every group) and first ``neurons`` FFN neurons, cut by ``statprune.surgery``
    (the output projections keep the matching columns; weights are irrelevant to timing)."""

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        return _cut(adapter, layer, heads, neurons)


def _cut(adapter: Any, layer: Any, heads: int, neurons: int) -> Any:
    import torch

    from statprune.linalg.heads import head_columns
    from statprune.surgery import prune_heads, prune_neurons

    base = _stub_base(adapter, copy.deepcopy(layer))
    adapter.prepare(base)  # e.g. GPT-2's Conv1D → nn.Linear: the surgery reads nn.Linear weights
    current = adapter.layers(base)[0]
    attn, ffn = adapter.attention(current), adapter.ffn(current)
    if heads < attn.n_heads:
        per_group = heads // attn.groups if attn.grouped else heads
        group_size = attn.n_heads // attn.groups if attn.grouped else attn.n_heads
        groups = attn.groups if attn.grouped else 1
        kept = [g * group_size + j for g in range(groups) for j in range(per_group)]
        o = current.get_submodule(attn.o)
        weight = o.weight.detach()[:, head_columns(kept, attn.head_dim).to(o.weight.device)]
        bias = None if o.bias is None else o.bias.detach()
        prune_heads(adapter, base, 0, kept, weight, bias)
    current = adapter.layers(base)[0]
    if neurons < ffn.width:
        out = current.get_submodule(ffn.output)
        kept_n = torch.arange(neurons, device=out.weight.device)
        bias = None if out.bias is None else out.bias.detach()
        prune_neurons(adapter, base, 0, kept_n, out.weight.detach()[:, kept_n], bias)
    return adapter.layers(base)[0]


def measure_table(
    model: Any,
    adapter: Any,
    shapes: Sequence[LayerShape],
    *,
    batch: int,
    seq_len: int,
    points: int = GRID_POINTS,
    warmup: int = WARMUP,
    trials: int = TRIALS,
) -> LatencyTable:
    """Measure the lookup tables of every distinct layer shape of ``model`` (in eval mode, on its
    device) and the dense model's latency; see the module docstring. Causal LMs: prefill."""
    import time

    import torch

    from statprune.bench import module_calls, spread, time_calls
    from statprune.calibration import CalibrationBatch
    from statprune.export import input_spec, is_causal_lm, token_inputs
    from statprune.pipeline.stages import capture_inputs
    from statprune.progress import progress_bar

    start = time.perf_counter()
    device = next(model.parameters()).device
    kind = "prefill" if is_causal_lm(model) else "forward"
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad(), progress_bar.enabled(False):
        calib = capture_inputs(
            model, adapter, [CalibrationBatch(token_inputs(input_spec(model), batch, seq_len))], device
        )
        hidden, args, kwargs = calib.hidden[0], calib.args[0], calib.kwargs[0]
        layers = adapter.layers(model.base_model)
        # every variant of every distinct layer shape, and the whole dense model, in one interleaved
        # timing loop: load drifting during the measurement hits the layers and the model alike
        plan: list[tuple[LayerShape, list[int], list[int], int | None, list[tuple[int, int]]]] = []
        calls = []
        for index, shape in enumerate(shapes):
            if any(p[0] == shape for p in plan):
                continue
            head_grid = grid(shape.n_heads, shape.groups, points)
            step = ALIGN if shape.ffn_width >= ALIGN * (points - 1) else 1
            neuron_grid = grid(shape.ffn_width, step, points)
            probe = unaligned_probe(neuron_grid) if step == ALIGN else None
            widths = [(h, 0) for h in head_grid] + [(0, n) for n in neuron_grid if n > 0]
            widths += [] if probe is None else [(0, probe)]
            plan.append((shape, head_grid, neuron_grid, probe, widths))
            for h, n in widths:
                variant = layer_variant(adapter, layers[index], h, n)
                calls.append(lambda v=variant: v(hidden, *args, **kwargs))
        del calib
        calls += module_calls([model], ["dense"], batch=batch, seq_len=seq_len, kind=kind)[1]
        with torch.inference_mode():
            times = time_calls(calls, warmup, trials, sync)
    tables: list[LayerTable] = []
    position = 0
    for shape, head_grid, neuron_grid, probe, widths in plan:
        ms = {w: statistics.median(times[position + i]) * 1e3 for i, w in enumerate(widths)}
        # noise as the spread of each round's total: one hiccup in a millisecond-long call moves
        # its median little but would dominate a per-call p90 / median
        rounds = [sum(times[position + i][r] for i in range(len(widths))) for r in range(trials)]
        position += len(widths)
        base = ms[(0, 0)]
        ffn = fit_block(neuron_grid, [ms[(0, n)] - base for n in neuron_grid])
        factor = 1.0
        if probe is not None and ffn(probe) > 0:
            factor = max(1.0, (ms[(0, probe)] - base) / ffn(probe))
        tables.append(
            LayerTable(
                shape,
                base,
                fit_block(head_grid, [ms[(h, 0)] - base for h in head_grid]),
                ffn,
                spread(rounds),
                factor,
            )
        )
    dense_ms = statistics.median(times[-1]) * 1e3
    layered = sum(next(t for t in tables if t.shape == s).cost(s.n_heads, s.ffn_width) for s in shapes)
    return LatencyTable(
        key={},
        layers=tables,
        dense_ms=dense_ms,
        rest=max(0.0, dense_ms - layered),
        dense_spread=spread(times[-1]),
        seconds=round(time.perf_counter() - start, 3),
    )


def latency_table(
    model: Any,
    adapter: Any,
    shapes: Sequence[LayerShape],
    *,
    batch: int,
    seq_len: int,
    backend: str = "torch",
    cache: bool = True,
    directory: Path | None = None,
) -> LatencyTable:
    """The lookup tables of ``model`` on its device: from the cache when a table with the same
    key exists (see :func:`table_key`), else measured (:func:`measure_table`) and cached. Warns
    (:class:`LatencyWarning`) when the measurement was noisy."""
    from statprune.bench import NOISY_SPREAD, require_backend
    from statprune.export import is_causal_lm

    require_backend(backend)
    if backend != "torch":
        raise OptionsError("latency lookup tables are measured with the torch backend only")
    device = str(next(model.parameters()).device)
    kind = "prefill" if is_causal_lm(model) else "forward"
    key = table_key(model, device=device, backend=backend, batch=batch, seq_len=seq_len, kind=kind)
    table = load_cached(key, directory) if cache else None
    if table is None:
        table = measure_table(model, adapter, shapes, batch=batch, seq_len=seq_len)
        table.key = json.loads(json.dumps(key, default=str))
        if cache:
            save_cached(table, directory)
    if table.spread > NOISY_SPREAD:
        warnings.warn(
            f"latency table measured on a noisy machine (trial spread p90/median {table.spread:.2f} > "
            f"{NOISY_SPREAD}); the latency budget is approximate — measure on a quiet machine "
            f"(delete {table.path or 'the cached table'} to remeasure)",
            LatencyWarning,
            stacklevel=2,
        )
    return table


@dataclass
class LatencyReport:
    """What a latency budget predicted and (when measured) what the pruned model took."""

    backend: str
    device: str
    batch: int
    seq_len: int
    kind: str  # "forward" or "prefill"
    dense_ms: float
    predicted_ms: float
    predicted_fraction: float
    floor_fraction: float  # the reachable floor: every prunable unit removed
    table: str | None  # cache file
    table_source: str  # "measured" or "cache"
    measured_ms: float | None = None
    measured_dense_ms: float | None = None
    measured_fraction: float | None = None
    spread: float = 1.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def predicted_report(
    table: LatencyTable,
    shapes: Sequence[LayerShape],
    counts: Sequence[tuple[int, int]],
    floor_counts: Sequence[tuple[int, int]],
) -> LatencyReport:
    """The predicted latency of a model whose layers keep ``counts`` (see :class:`LatencyCost`)."""
    cost = LatencyCost(table)
    dense = cost.total(shapes, [(s.n_heads, s.ffn_width) for s in shapes])
    predicted = cost.total(shapes, counts)
    return LatencyReport(
        backend=table.key.get("backend", "torch"),
        device=table.key.get("device", "cpu"),
        batch=int(table.key.get("batch", 0)),
        seq_len=int(table.key.get("seq_len", 0)),
        kind=table.key.get("kind", "forward"),
        dense_ms=round(dense, 4),
        predicted_ms=round(predicted, 4),
        predicted_fraction=predicted / dense if dense > 0 else 1.0,
        floor_fraction=cost.total(shapes, floor_counts) / dense if dense > 0 else 1.0,
        table=table.path,
        table_source=table.source,
        spread=round(table.spread, 3),
    )


def measure_pruned(report: LatencyReport, pruned: Any, dense: Any | None, trials: int = 7) -> None:
    """Measure the pruned model (interleaved with ``dense`` when given, on the same device) and
    record the measured latency and fraction in ``report``."""
    from statprune.bench import measure_modules

    models, labels = ([dense, pruned], ["dense", "pruned"]) if dense is not None else ([pruned], ["pruned"])
    rows = measure_modules(
        models, labels, batch=report.batch, seq_len=report.seq_len, kind=report.kind, trials=trials
    )
    report.measured_ms = round(rows[-1].latency_ms, 4)
    reference = rows[0].latency_ms if dense is not None else report.dense_ms
    report.measured_dense_ms = round(reference, 4)
    report.measured_fraction = rows[-1].latency_ms / reference if reference > 0 else None
    if dense is None:
        report.notes.append("measured alone; the fraction uses the dense latency of the table")
    _check_prediction(report)


# measured / predicted latency fraction beyond this (either way): the table does not describe
# this machine now (e.g. measured under another load and reused from the cache)
PREDICTION_RATIO_LIMIT = 1.25


def _check_prediction(report: LatencyReport) -> None:
    """Warn (and note in the report) when the measured fraction is far from the predicted one."""
    import warnings

    measured, predicted = report.measured_fraction, report.predicted_fraction
    if not measured or not predicted:
        return
    ratio = measured / predicted
    if 1 / PREDICTION_RATIO_LIMIT <= ratio <= PREDICTION_RATIO_LIMIT:
        return
    where = f"the {report.table_source} table {report.table}" if report.table else "the latency table"
    message = (
        f"measured latency is {measured:.0%} of dense but {where} predicted {predicted:.0%}: the "
        "table does not describe this machine now (measured under other load?); delete it and "
        "rerun on a quiet machine"
    )
    report.notes.append(message)
    warnings.warn(message, LatencyWarning, stacklevel=3)
