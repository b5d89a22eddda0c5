"""7B-scale feasibility: compress a random-initialised model with Llama-2-7B's shapes on one GPU.

    python benchmarks/gpu_scale.py                 # 32 layers, hidden 4096, 32 heads x 128, FFN 11008,
                                                   # bf16, 128 x 2048 calibration tokens, keep 50% params
    python benchmarks/gpu_scale.py --offload       # the model lives in CPU memory, layers visit the GPU
    python benchmarks/gpu_scale.py --tiny          # same code path with tiny shapes (runs on a CPU)

Random weights say nothing about quality; this measures time per stage and peak memory only.
Prints a table and writes JSON rows (``kind: gpu-scale``) to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import transformers

import statprune
from statprune.calibration import batches_from_tensors

SHAPES = {
    "7b": {
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "intermediate_size": 11008,
        "vocab_size": 32000,
    },
    "tiny": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "intermediate_size": 176,
        "vocab_size": 128,
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (smoke test)")
    parser.add_argument("--offload", action="store_true")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--keep-params", type=float, default=0.5)
    parser.add_argument("--json", help="write the result rows here")
    args = parser.parse_args()
    shape = SHAPES["tiny" if args.tiny else "7b"]
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    samples, seq_len = (16, 64) if args.tiny else (args.samples, args.seq_len)
    config = transformers.LlamaConfig(**shape, max_position_embeddings=max(seq_len, 128))
    start = time.perf_counter()
    with torch.device("cpu" if args.offload or args.tiny else device):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).to(dtype)
    build_s = time.perf_counter() - start
    ids = torch.randint(0, shape["vocab_size"], (samples, seq_len))
    batches = batches_from_tensors(ids, batch_size=args.batch_size)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    _, report = statprune.compress(
        model,
        data=batches,
        keep_params=args.keep_params,
        device=device.type,
        inplace=True,
        offload=args.offload,
        progress=True,
    )
    total_s = time.perf_counter() - start
    rows = [
        {
            "kind": "gpu-scale",
            "model": "llama-2-7b-shapes" if not args.tiny else "tiny-llama",
            "budget": args.keep_params,
            "backend": "torch",
            "device": str(device),
            "batch": args.batch_size,
            "seq_len": seq_len,
            "value": round(total_s, 2),
            "unit": "s",
            "dense_value": None,
            "speedup": None,
            "peak_mb": report.peak_device_mb,
            "forward_ratio": None,
            "stages": report.stage_seconds,
            "params_kept": report.params_kept,
            "offload": args.offload,
            "calibration_tokens": report.calibration_tokens,
            "build_seconds": round(build_s, 1),
        }
    ]
    print(f"{'stage':<10} {'seconds':>8}")
    for stage, seconds in report.stage_seconds.items():
        print(f"{stage:<10} {seconds:>8.1f}")
    print(f"{'total':<10} {total_s:>8.1f}")
    print(
        f"params kept {report.params_kept:.3f}; calibration tokens {report.calibration_tokens}; "
        f"peak GPU memory {report.peak_device_mb} MB; offload {args.offload}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
