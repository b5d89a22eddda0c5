"""Peak CPU memory of one model, measured in a fresh process (run by ``statprune.bench``).

    python -m statprune.bench_worker '{"path": ..., "backend": "torch", "batches": [1, 8], ...}'

The JSON argument holds ``path`` (model folder), ``onnx`` (exported file, onnxruntime backend),
``backend`` ("torch" or "onnxruntime"), ``batches``, ``seq_len``, ``spec`` (the synthetic-input
spec of ``statprune.export``), ``causal``, ``dtype`` and ``threads``. The process loads the
model (or the onnxruntime session) and runs one forward per batch size, smallest first; for each
it reports the peak resident set size during that forward minus the resident size before loading,
in MB (weights + activations, without the interpreter's import baseline). The peak is reset
before each forward through ``/proc/self/clear_refs`` ("rss-peak"); where that is unavailable,
``getrusage`` maxrss is used ("maxrss"), which also counts transient loading memory.

Output: one line ``STATPRUNE-MEMORY {"method": ..., "mb": {batch: MB}}`` on stdout. Only the
standard library is imported at module level; the onnxruntime backend never imports torch.
"""

from __future__ import annotations

import gc
import json
import resource
import sys
from collections.abc import Callable, Sequence

PREFIX = "STATPRUNE-MEMORY "


def status_kb(field: str) -> int | None:
    """A ``/proc/self/status`` field in kB (``VmRSS``, ``VmHWM``), or None where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def maxrss_kb() -> int:
    """This process's peak resident set size so far, in kB (macOS reports bytes)."""
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value // 1024 if sys.platform == "darwin" else value


def reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux ``clear_refs`` 5); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return status_kb("VmHWM") is not None
    except OSError:
        return False


def _onnxruntime_runner(args: dict) -> tuple[Callable[[int], None], int]:
    """numpy and onnxruntime only: no torch import to wait for."""
    import numpy as np
    import onnxruntime as ort

    spec, seq_len = args["spec"], args["seq_len"]

    def run_batch(batch: int) -> None:
        rng = np.random.default_rng(batch)
        feed = {
            "input_ids": rng.integers(min(4, spec["vocab_size"] - 1), spec["vocab_size"], (batch, seq_len)),
            "attention_mask": np.ones((batch, seq_len), dtype=np.int64),
            "token_type_ids": np.zeros((batch, seq_len), dtype=np.int64),
        }
        session.run(None, {k: v.astype(np.int64) for k, v in feed.items() if k in names})

    options = ort.SessionOptions()
    if args["threads"]:
        options.intra_op_num_threads = args["threads"]
        options.inter_op_num_threads = 1
    gc.collect()
    base = status_kb("VmRSS") or maxrss_kb()
    session = ort.InferenceSession(args["onnx"], sess_options=options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return run_batch, base


def _torch_runner(args: dict) -> tuple[Callable[[int], None], int]:
    import torch

    if args["threads"]:
        torch.set_num_threads(args["threads"])
    from statprune.export import load_model, token_inputs

    spec, seq_len = args["spec"], args["seq_len"]

    def run_batch(batch: int) -> None:
        inputs = token_inputs(spec, batch, seq_len, seed=batch)
        if args["causal"]:
            inputs["use_cache"] = False
        with torch.inference_mode():
            model(**inputs)

    gc.collect()
    base = status_kb("VmRSS") or maxrss_kb()
    model = load_model(args["path"], dtype=getattr(torch, args["dtype"]))
    return run_batch, base


def measure(args: dict) -> dict:
    """``{"method": "rss-peak" | "maxrss", "mb": {batch: MB}}`` for the model ``args`` describe."""
    runner = _onnxruntime_runner if args["backend"] == "onnxruntime" else _torch_runner
    run_batch, base = runner(args)
    gc.collect()
    result, method = {}, "rss-peak"
    for batch in sorted(args["batches"]):
        if not reset_peak():
            method = "maxrss"
        run_batch(batch)
        peak = status_kb("VmHWM") if method == "rss-peak" else maxrss_kb()
        result[batch] = max(0, peak - base) / 1024
    return {"method": method, "mb": result}


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    print(PREFIX + json.dumps(measure(json.loads(argv[0]))))


if __name__ == "__main__":
    main()
