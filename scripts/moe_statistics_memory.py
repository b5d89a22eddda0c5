#!/usr/bin/env python
"""Measure the memory of one MoE layer's neuron statistics on synthetic batches (docs/MOE.md).

A ``StatprunedExperts`` layer of E experts of I neurons (Qwen3-30B-A3B's E = 128, I = 768,
top-8 by default; a small hidden size, which only sets the cost of the input projections) gets
``--batches`` calibration batches of ``--tokens`` random tokens with random top-k routing, fed
to ``ExpertGramAccumulator.add_call`` as the statistics pass does, then ``finish``. Each mode
runs in its own process and prints one JSON line:

- ``largest_tensor_bytes``: the largest tensor any op returns during ``add_call`` (one batch,
  recorded by a ``TorchDispatchMode``);
- ``peak_rss_growth_bytes``: the process's peak resident memory (``ru_maxrss``) over its
  resident memory just before the first batch: the row buffers and every temporary (the Gram
  blocks are allocated, zero-filled, before it);
- ``seconds``: wall time of the accumulation and ``finish``.

Modes: ``sparse`` (statprune: expert by expert, ``EXPERT_BLOCK_ROWS`` buffered rows per expert)
and ``dense`` (the former code: dense ``z~`` rows, the reference implementation in
``tests/test_moe.py``, 4096 buffered rows per expert). 16 batches of 4096 tokens route about
4096 rows to each expert (so the 4096-row buffers fill). Usage::

    OMP_NUM_THREADS=1 python scripts/moe_statistics_memory.py            # both modes
    python scripts/moe_statistics_memory.py --mode sparse --block-rows 4096  # one change alone
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _largest_tensor(fn) -> int:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    Largest.largest = max(Largest.largest, t.numel() * t.element_size())
            return out

    with Largest():
        fn()
    return Largest.largest


def measure(args: argparse.Namespace) -> dict:
    import torch

    from statprune.modeling_statprune import StatprunedExperts
    from statprune.moe import EXPERT_BLOCK_ROWS, ExpertGramAccumulator

    torch.manual_seed(0)
    widths = (args.width,) * args.experts
    module = StatprunedExperts(args.hidden, list(widths), "silu")
    batches = []
    for _ in range(args.batches):
        x = torch.randn(args.tokens, args.hidden)
        probs = torch.softmax(torch.randn(args.tokens, args.experts), dim=-1)
        weights, index = torch.topk(probs, args.top_k, dim=-1)
        batches.append((x, index, weights / weights.sum(-1, keepdim=True)))
    mask = torch.ones(args.tokens, dtype=torch.bool)
    if args.mode == "dense":
        sys.path[:0] = [str(ROOT / "tests")]
        from test_moe import _dense_add_call as add_call
    else:
        add_call = ExpertGramAccumulator.add_call

    if args.block_rows is None:  # the former code buffered 4096 rows per expert
        args.block_rows = 4096 if args.mode == "dense" else EXPERT_BLOCK_ROWS

    def new_accumulator():
        return ExpertGramAccumulator(widths, "cpu", torch.float32, "synthetic", args.block_rows)

    with torch.no_grad():
        acc = new_accumulator()
        before, start = _rss_bytes(), time.perf_counter()
        for batch in batches:
            add_call(acc, module, batch, mask)
        acc.finish()
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        del acc
        probed = new_accumulator()  # (its zero Gram blocks allocated outside the probe)
        largest = _largest_tensor(lambda: add_call(probed, module, batches[0], mask))
    return {
        "mode": args.mode,
        "experts": args.experts,
        "width": args.width,
        "top_k": args.top_k,
        "tokens_per_batch": args.tokens,
        "batches": args.batches,
        "block_rows": args.block_rows,
        "largest_tensor_bytes": largest,
        "peak_rss_growth_bytes": max(peak - before, 0),
        "seconds": round(seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--mode", choices=["sparse", "dense"], help="one mode (default: both, each in a process)"
    )
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per calibration batch")
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument(
        "--block-rows",
        type=int,
        default=None,
        help="rows each expert buffers (default: 4096 for dense, as the former code; statprune's for sparse)",
    )
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args)))
        return
    for mode in ("dense", "sparse"):
        argv = [a for a in sys.argv[1:]] + ["--mode", mode]
        subprocess.run([sys.executable, __file__, *argv], check=True)


if __name__ == "__main__":
    main()
