"""STAT design choices measured side by side: benchmarks/ablation.json and RESULTS.md's ablation section.

    python benchmarks/ablation.py --model mpnet-mr --budgets 0.5,0.4
    python benchmarks/ablation.py --model smollm2 --budgets 0.8,0.6 --samples 512 --no-pack

    python benchmarks/ablation.py --model mpnet-mr --budgets 0.5,0.4 --variants default --samples 128

Each variant changes one option of the default STAT run (same calibration sample, same
evaluation as benchmarks/run.py) and is compressed and evaluated at every budget; the compression
time of every run is recorded beside its quality, since the variants differ in cost as well.
``default`` with another ``--samples`` measures the calibration size. Rows for the same model,
variant and protocol (calibration size and form, default layer weighting) are replaced; others
are kept.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import BENCHMARKS, run_sweep  # noqa: E402

from statprune import CompressionOptions  # noqa: E402

DEFAULT_WEIGHTING = CompressionOptions().layer_weighting
DEFAULT_METRIC = CompressionOptions().error_metric
# name -> CompressionOptions overrides of the default run
VARIANTS: dict[str, dict] = {
    "default": {},  # with --samples: the calibration-size ablation
    "original-activations": {"activations": "original"},
    "sequential-activations": {"activations": "sequential"},
    "uniform-allocation": {"allocation": "uniform"},
    "no-bias-compensation": {"bias_compensation": False},
    "no-layer-weighting": {"layer_weighting": "none"},
    "mean-layer-weighting": {"layer_weighting": "residual-mean"},
    "residual-weighting": {"layer_weighting": "residual"},
    "gradient-weighting": {"layer_weighting": "gradient"},
    "gradient-only-weighting": {"layer_weighting": "gradient-only"},
    "euclidean-metric": {"error_metric": "euclidean"},
    "no-correction": {"correction": False},
    "original-target": {"activations": "sequential", "correction_target": "original"},
    "correction-ridge-0.01": {"correction_ridge": 0.01},
    "correction-ridge-0.1": {"correction_ridge": 0.1},
    "round-to-8": {"round_to": 8},
    "round-to-64": {"round_to": 64},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm-mr", help=f"one of {','.join(BENCHMARKS)}")
    parser.add_argument("--budgets", default="0.6")
    parser.add_argument("--variants", default="original-activations,sequential-activations")
    parser.add_argument("--samples", type=int, help="default: the benchmark's (512, SmolLM2 128)")
    parser.add_argument("--no-pack", action="store_true", help="calibrate on lines even for LMs")
    parser.add_argument("--out", type=Path, default=HERE / "ablation.json")
    args = parser.parse_args()
    bench = BENCHMARKS[args.model]
    if args.no_pack:
        bench = dataclasses.replace(bench, pack=False)
    names = parse_variants(parser, args.variants)
    samples = args.samples or bench.samples or 512
    rows = json.loads(args.out.read_text()) if args.out.exists() else []
    for name in names:
        tic = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            result = run_sweep(
                bench, samples, ["stat"], Path(tmp) / "sweep", budgets=args.budgets, **VARIANTS[name]
            )
        setup = (samples, bench.pack, DEFAULT_WEIGHTING, DEFAULT_METRIC)
        rows = [r for r in rows if (r["model"], r["variant"], _setup(r)) != (bench.name, name, setup)]
        for r in result.rows:
            rows.append(
                {
                    "model": bench.name,
                    "variant": name,
                    "options": VARIANTS[name],
                    "budget_kind": r.budget_kind,
                    "budget": r.budget,
                    "achieved": r.achieved,
                    "metric": r.metric,
                    "value": r.value,
                    "dense_value": r.dense_value,
                    "agreement": r.agreement,
                    "seconds": r.seconds,
                    "samples": samples,
                    "packed": bench.pack,
                    "base_layer_weighting": DEFAULT_WEIGHTING,  # what the variant's other options were
                    "base_error_metric": DEFAULT_METRIC,
                    "error": r.error,
                }
            )
        print(f"{name}: {time.perf_counter() - tic:.0f} s", flush=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print(ablation_markdown(rows))


def parse_variants(parser: argparse.ArgumentParser, text: str) -> list[str]:
    names = text.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {','.join(VARIANTS)}")
    return names


def ablation_markdown(rows: list[dict]) -> str:
    """One table per model: variants by budgets, quality and compression seconds."""
    if not rows:
        return ""
    parts = [
        "## Ablations (`benchmarks/ablation.py`)\n\n"
        "STAT with one option changed at a time; same calibration sample and evaluation as the "
        "tables above unless stated. Each cell: quality (compression seconds; with budgets of one "
        "variant sharing an analysis pass, the first budget carries it; measured on a machine "
        "shared with other jobs, so treat them as indicative). The default run is "
        "`original-activations` for the encoders and `sequential-activations` for SmolLM2; "
        "`default` rows repeat it with another calibration size. `original-target` is sequential "
        "activations with `--correction-target original` (compare it with `sequential-activations`); "
        "whether to make it the default was judged on training-portion data by `benchmarks/validate.py` "
        "(`validation.json`), not on these test-split numbers. The same holds for the layer weighting: "
        "`gradient` (the default since it measured best there) against `residual-weighting` (the "
        "default before) and `gradient-only-weighting`; rows labelled \"default median layer "
        "weighting\" were measured when residual was the default. And for the error metric: `fisher` "
        "(the default with the gradient weighting since it measured best there) against "
        "`euclidean-metric`; rows labelled \"euclidean error metric\" were measured when that was the "
        "default (their `gradient-weighting` row is then the default of the time). The current "
        "default's own numbers are the `stat` columns of the tables above.\n"
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        budgets = sorted({r["budget"] for r in mine}, reverse=True)
        metric, dense = mine[0]["metric"], mine[0]["dense_value"]
        # rows measured under another protocol than the model's usual one say so in their label
        setups = [_setup(r) for r in mine]
        latest = max(
            setups, key=lambda s: (s[2] == DEFAULT_WEIGHTING, s[3] == DEFAULT_METRIC, setups.count(s))
        )
        head = f"| variant | {' | '.join(f'{b:g}' for b in budgets)} |"
        lines = [
            f"\n### {model}\n",
            f"{metric}; dense {dense:.4g}; {_describe(latest)} unless the variant says otherwise.\n",
            head,
            "|" + "---|" * (len(budgets) + 1),
        ]
        for variant, setup in dict.fromkeys((r["variant"], _setup(r)) for r in mine):
            cells = []
            for b in budgets:
                r = next(
                    (x for x in mine if (x["variant"], _setup(x)) == (variant, setup) and x["budget"] == b),
                    None,
                )
                if r is None or r["value"] is None:
                    cells.append("—")
                else:
                    cells.append(f"{r['value']:.4g} ({r['seconds']:.0f} s)")
            label = variant if setup == latest else f"{variant} ({_describe(setup)})"
            lines.append(f"| {label} | {' | '.join(cells)} |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def _setup(row: dict) -> tuple:
    """The protocol a row was measured under: calibration size and form, and the default layer
    weighting and error metric of the time (rows from before the median rule have no record of
    the weighting: the mean; from before the fisher metric none of the metric: euclidean)."""
    return (
        row["samples"],
        bool(row.get("packed")),
        row.get("base_layer_weighting", "residual-mean"),
        row.get("base_error_metric", "euclidean"),
    )


def current_setup(row: dict) -> bool:
    """Whether a row's other options were today's defaults (layer weighting and error metric)."""
    return _setup(row)[2:] == (DEFAULT_WEIGHTING, DEFAULT_METRIC)


def _describe(setup: tuple) -> str:
    samples, packed, weighting, metric = setup
    unit = "packed 128-token windows" if packed else "calibration examples (one per line)"
    rule = {"residual": "median", "residual-mean": "mean", "none": "no", "auto": "gradient (auto)"}.get(
        weighting, weighting
    )
    described = f"{samples} {unit}, default {rule} layer weighting"
    if metric == "euclidean" and weighting == "auto":  # the gradient weighting before the fisher metric
        described += ", euclidean error metric"
    return described


if __name__ == "__main__":
    main()
