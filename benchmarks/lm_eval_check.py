"""Zero-shot multiple-choice accuracy through lm-evaluation-harness, dense vs compressed SmolLM2.

    python benchmarks/lm_eval_check.py                      # 500 items, compresses if needed
    python benchmarks/lm_eval_check.py --limit 100 --compressed ~/.cache/statprune/serve-vllm/smollm2-p80-s32

1. builds the local task (``scripts/statprune_assets/mc_task.py``: held-out WSJ/OANC sentences cut in
   the middle, the true second half vs three from other sentences) into the cache;
2. compresses SmolLM2 (``CACHE/smollm2``) to 80 % of its attention+FFN parameters with the default
   options (OANC calibration text, ``--pack --samples 128``) into ``CACHE/lm-eval-check/smollm2-80``,
   unless that folder exists or ``--compressed DIR`` names another compressed SmolLM2;
3. ``statprune eval COMPRESSED --lm-eval-tasks TASK.yaml --against DENSE`` (statprune's loader, no
   remote code), then lm-eval's own command line on the compressed folder
   (``lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True …``), the plain route a
   harness user takes, on the same items;
4. writes ``benchmarks/lm_eval_check.json`` (after each step) and ``lm_eval_check.md``.

Needs lm-eval (``pip install 'statprune[harness]'``) and the assets ``corpora`` and ``smollm2``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common  # puts scripts/ (the assets package) on the import path
from statprune_assets.cache import cache_dir
from statprune_assets.mc_task import TASK_NAME, build_continuation_task

HERE = common.HERE
REPO = HERE.parent

CACHE = cache_dir()
CALIB = "oanc-calib.txt"
COMPRESS = ["--keep-params", "0.8", "--pack", "--samples", "128"]


def _env(threads: int) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }


def _run(cmd: list[str], env: dict[str, str], log: Path) -> float:
    """Run ``cmd`` with its output appended to ``log``; seconds taken. Fails loudly."""
    start = time.perf_counter()
    with log.open("a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        subprocess.run(cmd, check=True, env=env, stdout=fh, stderr=subprocess.STDOUT)
    return round(time.perf_counter() - start, 1)


def _write(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def markdown(res: dict) -> str:
    s = res["statprune_eval"]
    lines = [
        "# lm-evaluation-harness: zero-shot multiple choice, dense vs compressed SmolLM2",
        "",
        f"Task: {res['task']['description']}; the first {res['task']['items_scored']} of the "
        f"{res['task']['built']['items']} items built were scored (`--limit`), 4 choices, chance 0.25, "
        "zero-shot. Model: SmolLM2-135M-Instruct (the 4-bit GGUF dequantized, see ASSETS), "
        f"compressed to {res['compressed']['params_kept']:.3f} of its attention+FFN parameters "
        f"({res['compressed']['calibration']}; {res['compressed'].get('note') or 'folder given'}).",
        "",
        "| metric | dense | compressed | change (95 % CI, paired) | lm-eval CLI on the compressed folder |",
        "|---|---|---|---|---|",
    ]
    cli = res.get("lm_eval_cli", {}).get("metrics", {})
    for row in s["rows"]:
        lo, hi = row["change_interval"] or (float("nan"), float("nan"))
        other = cli.get(row["metric"])
        other_txt = "–" if other is None else f"{other['value']:.4f}"
        lines.append(
            f"| {row['metric']} | {row['reference']:.4f} ± {row['reference_stderr']:.4f} | "
            f"{row['value']:.4f} ± {row['stderr']:.4f} | {row['change']:+.4f} ({lo:+.4f} to {hi:+.4f}) | "
            f"{other_txt} |"
        )
    lines += [
        "",
        f"`statprune eval … --lm-eval-tasks` (dense and compressed): {s['seconds']} s; lm-eval's own "
        f"command line (`--model hf --model_args pretrained=DIR,trust_remote_code=True`, compressed "
        f"only): {res.get('lm_eval_cli', {}).get('seconds', '–')} s; "
        f"same numbers: {res.get('lm_eval_cli', {}).get('matches_statprune', '–')}.",
        f"Machine: {res['machine']}. Command: `{res['command']}`.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=500, help="items in the built task")
    parser.add_argument("--limit", type=int, help="score the first N items only (lm-eval's --limit)")
    parser.add_argument("--compressed", type=Path, help="an existing compressed SmolLM2 folder to reuse")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-cli", action="store_true", help="do not run lm-eval's own command line")
    parser.add_argument("--out", type=Path, default=HERE / "lm_eval_check.json")
    parser.add_argument("--compressed-note", help="how --compressed was made (calibration file, options)")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md from the saved JSON")
    args = parser.parse_args()
    if args.render:  # (with --compressed-note: that note added to the saved JSON first)
        res = json.loads(args.out.read_text())
        if args.compressed_note:
            res["compressed"]["note"] = args.compressed_note
            _write(args.out, res)
        args.out.with_suffix(".md").write_text(markdown(res))
        return 0

    env = _env(args.threads)
    work = CACHE / "lm-eval-check"
    work.mkdir(parents=True, exist_ok=True)
    log = work / "run.log"
    dense = CACHE / "smollm2"
    task = build_continuation_task(CACHE / "corpora", CACHE / "lm-eval-tasks", n=args.items)
    marker = json.loads((task.parent / "DONE.json").read_text())
    load = os.getloadavg()[0]
    res: dict = {
        "command": "python benchmarks/lm_eval_check.py " + " ".join(sys.argv[1:]),
        "machine": f"{os.cpu_count()} CPU cores, {args.threads} threads, load average {load:.1f} at start",
        "task": {
            "yaml": str(task),
            "description": "held-out WSJ/OANC sentences cut in the middle; the true second half vs "
            "three second halves of other sentences, drawn with seed 0",
            "built": marker["info"],
            "items_scored": args.limit or args.items,
        },
    }
    compressed = args.compressed or work / "smollm2-80"
    if args.compressed is None and not (compressed / "config.json").is_file():
        cmd = [sys.executable, "-m", "statprune.cli", "compress", str(dense), "--out", str(compressed)]
        cmd += ["--data", str(CACHE / "corpora" / CALIB), *COMPRESS, "--quiet"]
        res["compress_seconds"] = _run(cmd, env, log)
    report = json.loads((compressed / "statprune.json").read_text())
    res["compressed"] = {
        "folder": str(compressed),
        "params_kept": report["params_kept"],
        "calibration": f"{report['calibration_examples']} packed windows, {report['calibration_tokens']} "
        f"tokens; options {report['options']['allocation']} allocation, "
        f"{report['options']['layer_weighting']} weighting",
        "compress_seconds": report.get("seconds"),
        "note": args.compressed_note
        or ("made by this script: " + " ".join([CALIB, *COMPRESS]) if args.compressed is None else None),
    }
    _write(args.out, res)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "eval.json"
        cmd = [sys.executable, "-m", "statprune.cli", "eval", str(compressed), "--lm-eval-tasks", str(task)]
        cmd += ["--against", str(dense), "--device", "cpu", "--batch-size", str(args.batch_size)]
        cmd += ["--json", str(out)] + (["--samples", str(args.limit)] if args.limit else [])
        seconds = _run(cmd, env, log)
        res["statprune_eval"] = {**json.loads(out.read_text())["lm_eval"], "seconds": seconds}
        _write(args.out, res)

        if not args.skip_cli:
            outdir = Path(tmp) / "cli"
            cmd = [sys.executable, "-m", "lm_eval", "--model", "hf"]
            cmd += ["--model_args", f"pretrained={compressed},trust_remote_code=True,dtype=float32"]
            cmd += ["--include_path", str(task.parent), "--tasks", TASK_NAME, "--device", "cpu"]
            cmd += ["--batch_size", str(args.batch_size), "--output_path", str(outdir)]
            cmd += ["--limit", str(args.limit)] if args.limit else []
            seconds = _run(cmd, env, log)
            found = sorted(outdir.rglob("results_*.json"))
            cli = json.loads(found[-1].read_text())["results"][TASK_NAME]
            metrics = {
                m: {"value": cli[f"{m},none"], "stderr": cli[f"{m}_stderr,none"]} for m in ("acc", "acc_norm")
            }
            ours = {r["metric"]: r["value"] for r in res["statprune_eval"]["rows"]}
            res["lm_eval_cli"] = {
                "command": " ".join(cmd).replace(str(outdir), "OUT").replace(f"{sys.executable} -m ", ""),
                "metrics": metrics,
                "max_abs_difference": max(abs(metrics[m]["value"] - ours[m]) for m in metrics),
                "matches_statprune": all(abs(metrics[m]["value"] - ours[m]) < 1e-9 for m in metrics),
                "seconds": seconds,
            }
            _write(args.out, res)
    args.out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
