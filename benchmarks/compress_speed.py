"""The compressor's own cost on the CPU: end-to-end time and peak memory of `statprune compress`,
and its ratio to one plain forward pass of the dense model over the same calibration batches.

    python benchmarks/compress_speed.py MODEL_DIR CALIB.txt [--keep-flops 0.5] [--samples 512]

Both measurements run in fresh subprocesses (peak RSS from getrusage), one after the other.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FORWARD = """
import sys, time, torch, transformers, statprune
from statprune.calibration import read_examples, sample_examples, tokenize_examples
model_dir, calib, samples, seq_len = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
tok = transformers.AutoTokenizer.from_pretrained(model_dir)
model = statprune.load(model_dir)
texts = sample_examples(read_examples(calib), samples, 0)
batches = tokenize_examples(tok, texts, seq_len=seq_len, batch_size=16)
start = time.perf_counter()
with torch.no_grad():
    for b in batches:
        model(**b.inputs)
print(time.perf_counter() - start)
"""


BARE = """
import sys, transformers, statprune
tok = transformers.AutoTokenizer.from_pretrained(sys.argv[1])
statprune.save(transformers.AutoModel.from_pretrained(sys.argv[1]), sys.argv[2], tokenizer=tok)
"""


def _run(cmd: list[str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MB) of the child, stdout."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return wall, max(peak, before) / 1024, result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("calib", type=Path)
    parser.add_argument("--name", default=None)
    parser.add_argument("--keep-flops", type=float, default=0.5)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--activations", default="sequential", choices=["sequential", "original"])
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--base-model",
        action="store_true",
        help="use the bare encoder (for checkpoints saved without their task head)",
    )
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    os.environ.update(env)
    with tempfile.TemporaryDirectory() as tmp:
        if args.base_model:  # e.g. all-mpnet-base-v2: config names MPNetForMaskedLM, weights are bare
            bare = Path(tmp) / "dense"
            subprocess.run([sys.executable, "-c", BARE, str(args.model), str(bare)], check=True)
            args.model = bare
        compress_cmd = [
            sys.executable,
            "-m",
            "statprune.cli",
            "compress",
            str(args.model),
            "--data",
            str(args.calib),
            "--keep-flops",
            str(args.keep_flops),
            "--samples",
            str(args.samples),
            "--seq-len",
            str(args.seq_len),
            "--activations",
            args.activations,
            "--out",
            f"{tmp}/out",
            "--quiet",
        ]
        wall, peak, _ = _run(compress_cmd)
        report = json.loads(Path(tmp, "out", "statprune.json").read_text())
        fwd_cmd = [
            sys.executable,
            "-c",
            FORWARD,
            str(args.model),
            str(args.calib),
            str(args.samples),
            str(args.seq_len),
        ]
        _, _, out = _run(fwd_cmd)
    forward_s = float(out.strip().splitlines()[-1])
    compress_s = report["seconds"]
    row = {
        "kind": "compression",
        "model": args.name or args.model.name,
        "budget": args.keep_flops,
        "activations": args.activations,
        "layer_weighting": report["options"].get("layer_weighting"),
        "error_metric": report["options"].get("error_metric"),
        "backend": "torch",
        "device": "cpu",
        "batch": 16,
        "seq_len": args.seq_len,
        "value": round(wall, 1),
        "unit": "s",
        "dense_value": None,
        "speedup": None,
        "peak_mb": round(peak, 0),
        "forward_ratio": round(compress_s / forward_s, 2),
        "compress_seconds": compress_s,
        "forward_seconds": round(forward_s, 2),
        "stages": report.get("stage_seconds"),
        "threads": os.cpu_count(),
        "calibration_examples": report["calibration_examples"],
        "calibration_tokens": report["calibration_tokens"],
    }
    print(json.dumps(row, indent=2))
    if args.json:  # merge: replace this model's compression row, keep every other row
        rows = json.loads(args.json.read_text()) if args.json.exists() else []

        def key(r: dict) -> tuple:  # rows from before --activations existed were sequential,
            # rows from before the gradient weighting used the residual one, and rows from before
            # the fisher error metric the euclidean one
            return (
                r["kind"],
                r["model"],
                r.get("activations", "sequential"),
                r.get("layer_weighting", "residual"),
                r.get("error_metric") or "euclidean",
            )

        rows = [r for r in rows if key(r) != key(row)]
        args.json.write_text(json.dumps([*rows, row], indent=2) + "\n")


if __name__ == "__main__":
    main()
