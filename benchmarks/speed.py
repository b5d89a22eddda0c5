"""Real speed of compressed models on this machine: benchmarks/speed.json (rows of kind "inference").

    python benchmarks/speed.py --model mpnet-mr --budget 0.5 --round-to 1,64  # BERT-base sized classifier
    python benchmarks/speed.py --model smollm2 --budget 0.5 --params --calib oanc-calib.txt \
        --samples 128 --pack --backends torch                        # Llama decoder (prefill, decode)

Compresses the asset at the budget (STAT, 512 calibration sentences unless --samples), then
measures the dense and the compressed folders side by side in one run (`statprune.bench`: warm-up,
interleaved trials, median and p90) with PyTorch and with ONNX Runtime. Inference rows for the
same model, budget and round-to in the output file are replaced; others are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from common import HERE, assets

import statprune
from statprune.bench import benchmark
from statprune.calibration import read_examples
from statprune.persist import load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mpnet", help="asset name (scripts/assets.py)")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--params", action="store_true", help="budget is a parameter fraction")
    parser.add_argument("--calib", default="rt-calib.txt", help="file in the corpora asset")
    parser.add_argument("--samples", type=int, default=512, help="calibration examples")
    parser.add_argument("--pack", action="store_true", help="calibrate on packed windows (causal LMs)")
    parser.add_argument("--batch", default="32")
    parser.add_argument("--lm-batch", default="1,16", help="prefill / generate batch sizes (causal LMs)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--backends", default="torch,onnxruntime")
    parser.add_argument(
        "--round-to",
        default="1",
        help="kept FFN widths a multiple of N; several (1,64) are compressed and measured side by side",
    )
    parser.add_argument(
        "--base-model",
        action="store_true",
        help="measure the bare encoder (for checkpoints saved without their task head)",
    )
    parser.add_argument("--out", type=Path, default=HERE / "speed.json")
    args = parser.parse_args()
    model_dir = assets.ensure(args.model)
    texts = read_examples(assets.ensure("corpora") / args.calib)
    kind = "params" if args.params else "flops"
    rows = json.loads(args.out.read_text()) if args.out.exists() else []
    multiples = [int(n) for n in args.round_to.split(",")]

    def label(n: int) -> str:
        return f"{args.model}@{kind}{args.budget}" + (f"/round{n}" if n > 1 else "")

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = load_tokenizer(model_dir)
        if args.base_model:  # e.g. all-mpnet-base-v2: config names MPNetForMaskedLM, weights are bare
            import transformers

            bare = transformers.AutoModel.from_pretrained(model_dir, local_files_only=True)
            model_dir = statprune.save(bare, Path(tmp) / "dense", tokenizer=tokenizer)
        small, reports = {}, {}
        for n in multiples:
            model = statprune.load(model_dir)
            pruned, reports[n] = statprune.compress(
                model,
                tokenizer,
                texts,
                inplace=True,
                round_to=n,
                samples=args.samples,
                pack=args.pack,
                **{f"keep_{kind}": args.budget},
            )
            small[n] = statprune.save(pruned, Path(tmp) / f"small{n}", tokenizer=tokenizer, report=reports[n])
            del model, pruned
        names = {Path(small[n]).name: n for n in multiples}
        new = []
        for backend in args.backends.split(","):
            measured = benchmark(
                [model_dir, *small.values()],
                batches=[int(b) for b in args.batch.split(",")],
                lm_batches=[int(b) for b in args.lm_batch.split(",")],
                seq_len=args.seq_len,
                backend=backend,
                trials=args.trials,
                warmup=2,
            )
            for r in measured:
                if r.label not in names:
                    continue
                n, report = names[r.label], reports[names[r.label]]
                dense = next(
                    d for d in measured if d.label not in names and d.kind == r.kind and d.batch == r.batch
                )
                new.append(
                    {
                        "kind": "inference",
                        "model": label(n),
                        "budget": args.budget,
                        "backend": backend,
                        "device": r.device,
                        "batch": r.batch,
                        "seq_len": r.seq_len,
                        "value": r.latency_ms,
                        "unit": "ms",
                        "dense_value": dense.latency_ms,
                        "speedup": r.speedup,
                        "peak_mb": r.peak_memory_mb,
                        "forward_ratio": None,
                        "call": r.kind,
                        "p90_ms": r.latency_p90_ms,
                        "dense_p90_ms": dense.latency_p90_ms,
                        "dense_peak_mb": dense.peak_memory_mb,
                        "threads": r.threads,
                        "trials": r.trials,
                        "flops_kept": report.flops_kept,
                        "params_kept": report.params_kept,
                        "round_to": n,
                        # 1-min load average when the measurement ended: above the thread count,
                        # other jobs shared the cores (the interleaved trials still share it evenly)
                        "load_avg": round(os.getloadavg()[0], 2),
                        "throughput": r.throughput,
                        "dense_throughput": dense.throughput,
                        "throughput_unit": r.unit,
                    }
                )
                print(
                    f"{backend:<12} {label(n):<28} {r.kind:<8} batch {r.batch:>3}: "
                    f"dense {dense.latency_ms:8.1f} ms, compressed {r.latency_ms:8.1f} ms, "
                    f"speedup {r.speedup:.2f}x, {r.throughput:.1f} {r.unit} "
                    f"(FLOPs kept {report.flops_kept:.3f}, params kept {report.params_kept:.3f})"
                )
    labels = {label(n) for n in multiples}
    rows = [r for r in rows if not (r.get("model") in labels and r.get("kind") == "inference")] + new
    args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
