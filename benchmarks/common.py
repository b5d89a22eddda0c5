"""What the benchmark scripts share, so that none imports another: the real assets, the benchmark
suite (models, data, budgets, protocol) and its sweep, the ablation variants and their table,
and the table of ``ffn_fit.json``.

The scripts run as ``python benchmarks/NAME.py``, so this folder is on ``sys.path`` and
``import common`` finds this module.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "scripts"))  # scripts/assets.py: fetch and cache the assets
sys.path.insert(0, str(HERE.parent / "tests"))  # tests/families.py: the tiny models of every family
import assets  # noqa: E402

from statprune import CompressionOptions  # noqa: E402
from statprune.sweep import sweep  # noqa: E402

# --- the benchmark suite -------------------------------------------------------------------------


@dataclass(frozen=True)
class Benchmark:
    name: str
    asset: str
    calib: str  # file in the corpora asset
    eval: str
    budget_kind: str
    budgets: tuple[float, ...]
    eval_samples: int | None = None
    note: str = ""
    pack: bool = False  # calibrate on 128-token windows of the joined lines (causal LMs)
    samples: int | None = None  # calibration examples, when not the run's --samples


BENCHMARKS = {
    "minilm-mr": Benchmark(
        "MiniLM-MR",
        "minilm-mr",
        "rt-calib.txt",
        "rt-test.jsonl",
        "flops",
        (0.9, 0.8, 0.7, 0.6, 0.5, 0.4),
        note="all-MiniLM-L6-v2 fine-tuned by scripts/assets.py on 3,200 Rotten-Tomatoes sentences; "
        "calibration = the training sentences (labels unused), test = the 800 held-out ones",
    ),
    "mpnet-mr": Benchmark(
        "MPNet-MR",
        "mpnet-mr",
        "rt-calib.txt",
        "rt-test.jsonl",
        "flops",
        (0.9, 0.8, 0.7, 0.6, 0.5, 0.4),
        note="all-mpnet-base-v2 (BERT-base sized) fine-tuned the same way",
    ),
    "smollm2": Benchmark(
        "SmolLM2-135M",
        "smollm2",
        "oanc-calib.txt",
        "wsj-heldout.txt",
        "params",
        (0.9, 0.8, 0.7, 0.6, 0.5),
        note="SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32, so dense scores sit slightly below "
        "the bf16 original); calibration = 128 windows of 128 tokens (16,384 tokens) cut from the "
        "joined OANC calibration lines (`--pack`) — 128 rather than 512 examples to fit the 2-core "
        "CPU budget (each sequential pruning pass of 30 layers over 65 k tokens takes ~5 min here); "
        "perplexity on held-out WSJ lines (non-overlapping 256-token windows)",
        pack=True,
        samples=128,
    ),
    "gemma3": Benchmark(
        "Gemma-3-270M",
        "gemma3",
        "oanc-calib.txt",
        "wsj-heldout.txt",
        "params",
        (0.9, 0.8, 0.7, 0.6, 0.5),
        note="Gemma-3-270M base LM (Gemma Terms of Use; Q4_K_M GGUF dequantized to fp32, so dense "
        "scores sit slightly below the bf16 original); the SmolLM2 protocol: 128 packed windows of "
        "128 OANC tokens, perplexity on held-out WSJ lines (256-token windows), every window starting "
        "with `<bos>` as Gemma's texts do; the budget counts "
        "the layers' parameters (the 170 M embedding parameters are not pruned)",
        pack=True,
        samples=128,
    ),
}


def run_sweep(bench: Benchmark, samples: int, methods, out: Path, budgets=None, **options):
    """The benchmark's sweep (same calibration, evaluation and protocol everywhere), into ``out``."""
    corpora = assets.ensure("corpora")
    return sweep(
        assets.ensure(bench.asset),
        corpora / bench.calib,
        corpora / bench.eval,
        budgets=bench.budgets if budgets is None else budgets,
        methods=methods,
        budget_kind=bench.budget_kind,
        samples=samples,
        seq_len=128,
        eval_samples=bench.eval_samples,
        pack=bench.pack,
        out=out,
        name=bench.name,
        device="cpu",
        **options,
    )


# --- ablation variants (benchmarks/ablation.py, validate.py) and their table in RESULTS.md ------

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
        'default before) and `gradient-only-weighting`; rows labelled "default median layer '
        'weighting" were measured when residual was the default. And for the error metric: `fisher` '
        "(the default with the gradient weighting since it measured best there) against "
        '`euclidean-metric`; rows labelled "euclidean error metric" were measured when that was the '
        "default (their `gradient-weighting` row is then the default of the time). The current "
        "default's own numbers are the `stat` columns of the tables above.\n"
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        budgets = sorted({r["budget"] for r in mine}, reverse=True)
        metric, dense = mine[0]["metric"], mine[0]["dense_value"]
        # rows measured under another protocol than the model's usual one say so in their label
        setups = [row_setup(r) for r in mine]
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
        for variant, setup in dict.fromkeys((r["variant"], row_setup(r)) for r in mine):
            cells = []
            for b in budgets:
                r = next(
                    (
                        x
                        for x in mine
                        if (x["variant"], row_setup(x)) == (variant, setup) and x["budget"] == b
                    ),
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


def row_setup(row: dict) -> tuple:
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
    return row_setup(row)[2:] == (DEFAULT_WEIGHTING, DEFAULT_METRIC)


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


# --- benchmarks/ffn_fit.py's table ---------------------------------------------------------------


def ffn_fit_markdown(rows: list[dict]) -> str:
    lines = [
        "| windows | rule | keep | ridge | calibration | wsj-validation |",
        "|---|---|---|---|---|---|",
    ]
    fields = ("calibration_windows", "rule", "keep_neurons", "ridge", "scored_on")
    index = {tuple(r[f] for f in fields): r for r in rows}
    for w, rule, keep, ridge, _ in sorted({k for k in index if k[4] == "calibration"}):
        cal = index[(w, rule, keep, ridge, "calibration")]["relative_error"]
        val = index[(w, rule, keep, ridge, "wsj-validation")]["relative_error"]
        lines.append(f"| {w} | {rule} | {keep} | {ridge} | {cal:.4f} | {val:.4f} |")
    return "\n".join(lines)


# --- serving checks (serve_vllm.py, serve_check.py): one compressed model, prompts, reference -------

SERVE_CACHE = Path.home() / ".cache" / "statprune"


def serve_arguments(description: str, prompts: int, prompt_tokens: int, out: Path) -> argparse.ArgumentParser:
    """The options every serving check takes: the model, its compression, the prompts, the output."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", type=Path, default=SERVE_CACHE / "smollm2")
    parser.add_argument("--keep-params", type=float, default=0.8)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=prompts)
    parser.add_argument("--prompt-tokens", type=int, default=prompt_tokens)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=out)
    return parser


def serve_folder(model: Path, keep_params: float, samples: int, uniform: bool = False) -> Path:
    """Where the serving checks keep ``model`` compressed to ``keep_params`` (shared by all engines)."""
    name = f"{model.name}-p{round(keep_params * 100)}-s{samples}" + ("-uniform" if uniform else "")
    return SERVE_CACHE / "serve-vllm" / name


def serve_compress(
    source: Path, out: Path, keep_params: float, samples: int, uniform: bool = False
) -> float | None:
    """Compress ``source`` into ``out`` with the CLI (default options, packed WSJ calibration;
    ``uniform``: ``--uniform``, the stock architecture) unless it is there; returns the seconds
    taken (None: cached)."""
    import os
    import subprocess
    import time

    if (out / "config.json").is_file():
        return None
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "statprune.cli", "compress", str(source)]
    cmd += ["--data", str(SERVE_CACHE / "corpora" / "wsj-calib.txt"), "--pack", "--samples", str(samples)]
    cmd += ["--keep-params", str(keep_params), "--out", str(out), "--quiet"] + (
        ["--uniform"] if uniform else []
    )
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    return time.perf_counter() - start


def serve_prompts(tokenizer, n: int, max_tokens: int) -> tuple[list[str], list[list[int]]]:
    """The first ``n`` WSJ held-out lines and their token ids, cut to ``max_tokens``."""
    lines = [
        line
        for line in (SERVE_CACHE / "corpora" / "wsj-heldout.txt").read_text().splitlines()
        if line.strip()
    ]
    return lines[:n], [tokenizer(line)["input_ids"][:max_tokens] for line in lines[:n]]


def transformers_generate(folder: Path, compressed: bool, ids: list[list[int]], new_tokens: int) -> dict:
    """transformers' greedy continuations (KV cache, batch 1, float32), their time after one
    warm-up and the tokens generated per second: ``{"tokens": [[int]], "seconds": float,
    "tok_s": float}``. Dense: ``AutoModelForCausalLM``; compressed: ``statprune.load``."""
    import time

    import torch
    import transformers

    import statprune

    if compressed:
        model = statprune.load(folder, dtype=torch.float32)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    def generate(p):
        with torch.no_grad():
            out = model.generate(
                torch.tensor([p]), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
            )
        return out[0, len(p) :].tolist()

    generate(ids[0])  # warm-up
    start = time.perf_counter()
    tokens = [generate(p) for p in ids]
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "tok_s": new_tokens * len(ids) / seconds}


def run_child(
    python: Path, script: str, spec: dict, env: dict[str, str], cwd: str | None = None, tail: int = 15
) -> tuple[dict | None, str]:
    """Run ``script`` (``python -c``) in another venv's ``python`` with ``spec`` as its JSON
    argument and ``env`` added to the environment, without this checkout's ``PYTHONPATH`` (the
    venv's own packages). The script prints its result as one line ``RESULT <json>``; returns
    ``(result, "")``, or ``(None, the last tail lines of its stderr or stdout)`` when it failed."""
    import json
    import os
    import subprocess

    env = {**os.environ, **env}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [str(python), "-c", script, json.dumps(spec)], capture_output=True, text=True, env=env, cwd=cwd
    )
    result = next((line for line in proc.stdout.splitlines() if line.startswith("RESULT ")), None)
    if proc.returncode or result is None:
        return None, "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-tail:])
    return json.loads(result[len("RESULT ") :]), ""


def token_agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Positions where two greedy continuations agree (fraction), and the common prefix length."""
    same = sum(x == y for p, q in zip(a, b, strict=True) for x, y in zip(p, q, strict=False))
    total = sum(len(p) for p in a)
    prefix = []
    for p, q in zip(a, b, strict=True):
        k = 0
        while k < min(len(p), len(q)) and p[k] == q[k]:
            k += 1
        prefix.append(k)
    return {"token_agreement": same / total, "common_prefix": prefix}
