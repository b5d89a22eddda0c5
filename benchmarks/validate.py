"""STAT design choices judged on validation data from the training portions (test splits untouched).

    python benchmarks/validate.py --model minilm-mr --budgets 0.6,0.4 \
        --variants sequential-activations,original-target --samples 512,2048
    python benchmarks/validate.py --model smollm2 --budgets 0.8 \
        --variants sequential-activations,original-target

    # the error metric under the gradient weighting (the default became fisher from these)
    python benchmarks/validate.py --model minilm-mr --budgets 0.9,0.8,0.6,0.5,0.4 \
        --variants default,euclidean-metric
    python benchmarks/validate.py --model mpnet-mr --budgets 0.7,0.5,0.4 --variants default
    python benchmarks/validate.py --model smollm2 --budgets 0.8,0.6 --variants default

    # the allocation's layer weighting (the default became gradient from these)
    python benchmarks/validate.py --model minilm-mr --budgets 0.9,0.8,0.6,0.5,0.4 \
        --variants residual-weighting,gradient-weighting,gradient-only-weighting
    python benchmarks/validate.py --model mpnet-mr --budgets 0.7,0.5,0.4 \
        --variants residual-weighting,gradient-weighting,gradient-only-weighting
    python benchmarks/validate.py --model smollm2 --budgets 0.8,0.6 \
        --variants residual-weighting,gradient-weighting,gradient-only-weighting

benchmarks/ablation.py reports variants on the test splits; deciding a default from those would
be tuning on the test split. This script gives the numbers a decision may use:
- MR classifiers: 800 training sentences that are not among the calibration sample (drawn with
  seed 1 from the rest of the 3,200), accuracy plus agreement and mean KL against the dense model;
  ``--in-sample`` scores the calibration sentences themselves instead, which shows how much of a
  variant's fit is overfitting the calibration sample.
- SmolLM2: perplexity on the WSJ calibration portion (``wsj-calib.txt``; the model calibrates on
  OANC, and the benchmark evaluates on ``wsj-heldout.txt``), with ratio, agreement and KL. With
  ``--wsj-split`` the evaluation is lines 601-800 of ``wsj-calib.txt`` only, and ``--lm-calib wsj``
  calibrates on lines 1-600 (in-domain calibration) instead of OANC, so the two compare on text
  neither saw:

    python benchmarks/validate.py --model smollm2 --budgets 0.8,0.6 --variants default --wsj-split
    python benchmarks/validate.py --model smollm2 --budgets 0.8,0.6 --variants default --wsj-split \
        --lm-calib wsj
Variants are those of benchmarks/ablation.py. Rows are appended to benchmarks/validation.json
(same model, variant, budget, calibration size and split replaced).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from common import BENCHMARKS, HERE, VARIANTS, assets, parse_variants

import statprune
from statprune.calibration import read_examples, sample_examples
from statprune.evaluate import evaluate
from statprune.persist import load, load_tokenizer

WSJ_SPLIT = 600  # --wsj-split: wsj-calib.txt lines before it may calibrate, lines from it evaluate
ROW_KEY = ("model", "variant", "budget", "samples", "split", "data")  # with "calibration": one row


def _classifier_split(corpora: Path, calib: list[str], samples: int, in_sample: bool):
    chosen = set(sample_examples(calib, samples, 0))
    train = [json.loads(line) for line in (corpora / "rt-train.jsonl").read_text().splitlines()]
    if in_sample:
        rows = [r for r in train if r["text"] in chosen]
    else:
        rows = [r for r in train if r["text"] not in chosen]
        random.Random(1).shuffle(rows)
        rows = rows[:800]
    return [r["text"] for r in rows], [r["label"] for r in rows]


def _row_key(row: dict, benchmark_calib: str) -> tuple:
    """What identifies a row (rows without "calibration" used the benchmark's calibration file)."""
    return (*(row[k] for k in ROW_KEY), row.get("calibration", benchmark_calib))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm-mr", help="minilm-mr, mpnet-mr or smollm2")
    parser.add_argument("--budgets", default="0.6,0.4")
    parser.add_argument("--variants", default="sequential-activations,original-target")
    parser.add_argument("--samples", default=None, help="calibration sizes (default: the benchmark's)")
    parser.add_argument("--in-sample", action="store_true", help="score the calibration examples")
    parser.add_argument("--out", type=Path, default=HERE / "validation.json")
    parser.add_argument(
        "--wsj-split", action="store_true", help="SmolLM2: evaluate on wsj-calib.txt lines 601-800"
    )
    parser.add_argument(
        "--lm-calib",
        choices=("oanc", "wsj"),
        default="oanc",
        help="SmolLM2 calibration text: the benchmark's OANC lines, or wsj-calib.txt lines 1-600 "
        "(needs --wsj-split)",
    )
    args = parser.parse_args()
    bench = BENCHMARKS[args.model]
    names = parse_variants(parser, args.variants)
    corpora, model_dir = assets.ensure("corpora"), assets.ensure(bench.asset)
    tokenizer, dense = load_tokenizer(model_dir), load(model_dir)
    calib = read_examples(corpora / bench.calib)
    calib_name = bench.calib
    if args.lm_calib == "wsj":
        if not (args.wsj_split and bench.budget_kind == "params"):
            parser.error("--lm-calib wsj is for --model smollm2 with --wsj-split")
        calib = read_examples(corpora / "wsj-calib.txt")[:WSJ_SPLIT]
        calib_name = f"wsj-calib.txt lines 1-{WSJ_SPLIT}"
    sizes = [int(s) for s in args.samples.split(",")] if args.samples else [bench.samples or 512]
    split = "calibration" if args.in_sample else "validation"
    rows = json.loads(args.out.read_text()) if args.out.exists() else []
    for samples in sizes:
        if bench.budget_kind == "params":  # causal LM: a text the compression never sees
            texts, labels = read_examples(corpora / "wsj-calib.txt"), None
            data_name = "wsj-calib.txt"
            if args.wsj_split:
                texts, data_name = texts[WSJ_SPLIT:], f"wsj-calib.txt lines {WSJ_SPLIT + 1}-{len(texts)}"
        else:
            texts, labels = _classifier_split(corpora, calib, samples, args.in_sample)
            data_name = f"rt-train ({'the calibration sample' if args.in_sample else 'not in it'})"
        for name in names:
            cache = statprune.AnalysisCache()
            for budget in (float(b) for b in args.budgets.split(",")):
                tic = time.perf_counter()
                model, report = statprune.compress(
                    dense,
                    tokenizer,
                    calib,
                    **{f"keep_{bench.budget_kind}": budget},
                    samples=samples,
                    pack=bench.pack,
                    progress=False,
                    cache=cache,
                    device="cpu",
                    **VARIANTS[name],
                )
                seconds = time.perf_counter() - tic
                result = evaluate(model, tokenizer, texts, labels=labels, reference=dense)
                row = {
                    "model": bench.name,
                    "variant": name,
                    "options": VARIANTS[name],
                    # as resolved from "auto" (rows without it: gradient weighting meant euclidean)
                    "layer_weighting": report.options["layer_weighting"],
                    "error_metric": report.options["error_metric"],
                    "budget_kind": bench.budget_kind,
                    "budget": budget,
                    "samples": samples,
                    "split": split,
                    "data": data_name,
                    "calibration": calib_name,
                    "examples": len(texts),
                    "accuracy": result.accuracy,
                    "perplexity": result.perplexity,
                    "perplexity_ratio": result.perplexity_ratio,
                    "agreement": result.agreement,
                    "kl": result.kl,
                    "seconds": round(seconds, 1),
                }
                rows = [r for r in rows if _row_key(r, bench.calib) != _row_key(row, bench.calib)]
                rows.append(row)
                args.out.write_text(json.dumps(rows, indent=2) + "\n")
                quality = (
                    f"accuracy {result.accuracy:.4f}"
                    if result.accuracy is not None
                    else f"perplexity {result.perplexity:.2f} (ratio {result.perplexity_ratio:.3f})"
                )
                print(
                    f"{bench.name} {name} keep {budget:g}, {samples} samples, {split}: {quality}, "
                    f"agreement {result.agreement:.4f}, KL {result.kl:.4f} ({seconds:.0f} s)",
                    flush=True,
                )
                del model


if __name__ == "__main__":
    main()
