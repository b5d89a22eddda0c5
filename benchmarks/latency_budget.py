"""Latency budgets on MiniLM-MR: predicted against measured latency, and ``--keep-latency`` against
the FLOPs sweep (issue 18's targets, measured on the machine it runs on).

1. The latency lookup tables of the dense model (``statprune.latency``; from the cache when present).
2. STAT at every FLOPs budget of the benchmark suite (one shared analysis) and at
   ``--keep-latency`` (default 0.5): each candidate's latency fraction as the tables predict it.
3. The dense model and every candidate measured side by side (``statprune.bench.measure_modules``:
   warm-up, interleaved trials, medians) at batch × seq-len: the measured fractions, and the median
   absolute error of the prediction (|predicted − measured| / measured, target ≤ 10 %).
4. Accuracy on the 800 held-out sentences of every candidate; the latency-budget model against the
   FLOPs sweep's accuracy interpolated at the same measured latency.

The JSON records the machine's load average before and after: timings taken while other processes
compete for the cores are noisy and must be rerun on a quiet machine before they are quoted.

    python benchmarks/latency_budget.py                    # MiniLM-MR -> latency_budget_minilm-mr.json
    python benchmarks/latency_budget.py --asset mpnet-mr   # MPNet-MR  -> latency_budget_mpnet-mr.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import time
from pathlib import Path

import common
import torch

import statprune
from statprune.adapters import adapter_for
from statprune.bench import NOISY_SPREAD, measure_modules
from statprune.calibration import read_examples
from statprune.driver import AnalysisCache
from statprune.evaluate import evaluate, read_labels
from statprune.flops import model_shapes
from statprune.latency import LatencyCost, latency_table
from statprune.persist import load, load_tokenizer

QUIET_LOAD = 1.0  # 1-minute load average before the run (its own threads raise it afterwards)


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """Linear interpolation of (x, y) points at ``x`` (None outside their range)."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="JSON to write (default: latency_budget_ASSET.json here)")
    parser.add_argument("--asset", default="minilm-mr", help="minilm-mr (default) or mpnet-mr")
    parser.add_argument("--samples", type=int, default=512, help="calibration examples")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--keep-latency", type=float, default=0.5)
    parser.add_argument("--budgets", default=None, help="FLOPs budgets (default: the suite's)")
    parser.add_argument("--trials", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.out is None:
        args.out = Path(__file__).with_name(f"latency_budget_{args.asset}.json")
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    started = time.perf_counter()

    bench = common.BENCHMARKS[args.asset]
    corpora = common.assets.ensure("corpora")
    model_dir = common.assets.ensure(bench.asset)
    budgets = bench.budgets if args.budgets is None else tuple(float(b) for b in args.budgets.split(","))
    tokenizer = load_tokenizer(model_dir)
    dense = load(model_dir).eval()
    texts = read_examples(corpora / bench.calib)
    examples = read_examples(corpora / bench.eval)
    labels = read_labels(corpora / bench.eval)
    adapter = adapter_for(dense.config)
    shapes = model_shapes(adapter, dense.base_model)

    tic = time.perf_counter()
    with torch.no_grad():
        table = latency_table(dense, adapter, shapes, batch=args.batch, seq_len=args.seq_len)
    table_seconds = time.perf_counter() - tic
    cost = LatencyCost(table)
    dense_predicted = cost.total(shapes, [(s.n_heads, s.ffn_width) for s in shapes])

    common_kwargs = {
        "samples": args.samples,
        "seq_len": 128,
        "progress": False,
        "bench_batch": args.batch,
        "bench_seq_len": args.seq_len,
        "device": "cpu",
    }
    cache = AnalysisCache()
    runs = []
    for budget in budgets:
        tic = time.perf_counter()
        model, report = statprune.compress(
            dense, tokenizer, texts, keep_flops=budget, cache=cache, **common_kwargs
        )
        runs.append(("flops", budget, model, report, time.perf_counter() - tic))
        print(f"flops {budget}: compressed in {runs[-1][-1]:.1f} s", flush=True)
    tic = time.perf_counter()
    model, report = statprune.compress(
        dense, tokenizer, texts, keep_latency=args.keep_latency, **common_kwargs
    )
    runs.append(("latency", args.keep_latency, model, report, time.perf_counter() - tic))
    print(f"latency {args.keep_latency}: compressed in {runs[-1][-1]:.1f} s", flush=True)

    tic = time.perf_counter()
    measured = measure_modules(
        [dense, *(r[2] for r in runs)],
        ["dense", *(f"{k}-{b:g}" for k, b, *_ in runs)],
        batch=args.batch,
        seq_len=args.seq_len,
        trials=args.trials,
    )
    measure_seconds = time.perf_counter() - tic
    dense_eval = evaluate(dense, tokenizer, examples, task="classify", labels=labels)

    rows = []
    for (kind, budget, model, report, seconds), bench_row in zip(runs, measured[1:], strict=True):
        counts = [(s.n_heads, s.ffn_width) for s in model_shapes(adapter, model.base_model)]
        predicted = cost.total(shapes, counts) / dense_predicted
        fraction = bench_row.latency_ms / measured[0].latency_ms
        result = evaluate(model, tokenizer, examples, task="classify", labels=labels, reference=dense)
        rows.append(
            {
                "budget_kind": kind,
                "budget": budget,
                "flops_kept": report.flops_kept,
                "params_kept": report.params_kept,
                "predicted_latency_fraction": predicted,
                "measured_latency_fraction": fraction,
                "relative_error": abs(predicted - fraction) / fraction,
                "latency_ms": bench_row.latency_ms,
                "latency_p90_ms": bench_row.latency_p90_ms,
                "accuracy": result.accuracy,
                "agreement": result.agreement,
                "compress_seconds": round(seconds, 2),
                "compress_reported_latency": report.latency,
            }
        )
        print(
            f"{kind} {budget:g}: predicted {predicted:.3f} measured {fraction:.3f} "
            f"accuracy {result.accuracy:.4f}",
            flush=True,
        )

    flops_rows = [r for r in rows if r["budget_kind"] == "flops"]
    latency_row = next(r for r in rows if r["budget_kind"] == "latency")
    flops_points = [(r["measured_latency_fraction"], r["accuracy"]) for r in flops_rows]
    errors = [r["relative_error"] for r in rows]
    spreads = [r.latency_p90_ms / r.latency_ms for r in measured]
    out = {
        "model": bench.name,
        "asset": bench.asset,
        "command": "python benchmarks/latency_budget.py "
        + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "out"
        ),
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        },
        "protocol": {
            "batch": args.batch,
            "seq_len": args.seq_len,
            "kind": measured[0].kind,
            "trials": args.trials,
            "calibration_samples": args.samples,
            "eval_examples": dense_eval.n_examples,
        },
        "table": {
            "seconds": round(table_seconds, 2),
            "source": table.source,
            "dense_ms": table.dense_ms,
            "rest_ms": table.rest,
            "spread": table.spread,
            "layers": [t.to_dict() for t in table.layers],
        },
        "dense": {"latency_ms": measured[0].latency_ms, "accuracy": dense_eval.accuracy},
        "rows": rows,
        "median_relative_error": statistics.median(errors),
        "keep_latency": {
            "budget": args.keep_latency,
            "measured_fraction": latency_row["measured_latency_fraction"],
            "within_10_percent_of_budget": abs(latency_row["measured_latency_fraction"] - args.keep_latency)
            <= 0.1 * args.keep_latency,
            "accuracy": latency_row["accuracy"],
            "flops_sweep_accuracy_at_same_latency": interpolate(
                flops_points, latency_row["measured_latency_fraction"]
            ),
        },
        "noisy": max(spreads) > NOISY_SPREAD,
        "max_spread": max(spreads),
        "measure_seconds": round(measure_seconds, 2),
        "seconds": round(time.perf_counter() - started, 2),
    }
    busy = load_before[0] > QUIET_LOAD
    out["note"] = (
        f"1-minute load average above {QUIET_LOAD} before the run: other processes shared the "
        "cores; rerun on a quiet machine before quoting these timings"
        if busy
        else f"quiet machine: 1-minute load average at most {QUIET_LOAD} before the run"
        + (" (but a trial spread above the noise threshold: see max_spread)" if out["noisy"] else "")
    )
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in ("median_relative_error", "keep_latency", "max_spread", "seconds")}))


if __name__ == "__main__":
    main()
