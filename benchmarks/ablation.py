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
import tempfile
import time
from pathlib import Path

from common import (
    BENCHMARKS,
    DEFAULT_METRIC,
    DEFAULT_WEIGHTING,
    HERE,
    VARIANTS,
    ablation_markdown,
    parse_variants,
    row_setup,
    run_sweep,
)


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
        rows = [r for r in rows if (r["model"], r["variant"], row_setup(r)) != (bench.name, name, setup)]
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


if __name__ == "__main__":
    main()
