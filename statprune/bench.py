"""Side-by-side inference benchmark of model folders (e.g. an original and its compressed copies).

All models are loaded at once and measured in one run. Each trial round times one call of every
model, in an order rotated from round to round, so slow drift (thermal throttling, other
processes, frequency scaling) hits every model alike instead of whichever ran last. Inputs are
synthetic token ids of exactly ``seq_len`` real tokens (no padding).

Per model and batch size: median and 90th-percentile latency, throughput (sequences/s), parameter
count, peak memory, and ratios to the first model (``speedup`` = its latency / this latency).
Causal LMs also get prefill (one forward filling the KV cache, logits of the last token only) and
greedy generation of exactly ``new_tokens`` tokens (``min_new_tokens = max_new_tokens``) at
``lm_batches``; generation needs a KV cache, so only the torch backend measures these.

Peak memory:
- torch on CUDA: ``torch.cuda.max_memory_allocated`` during one forward, minus what was allocated
  before it, plus this model's weights and buffers (the other loaded models do not count);
- CPU (both backends): measured in a fresh child process per model (``statprune.bench_worker``),
  which loads the model (or the onnxruntime session) and runs one forward per batch size; the value
  is the peak resident set size during that forward minus the resident size before loading (so
  weights + activations, without the Python/torch import baseline). The peak is reset before each
  forward through ``/proc/self/clear_refs``; where that is unavailable, ``getrusage`` maxrss is
  used and the value also includes transient loading memory (``memory_method`` says which);
- onnxruntime on CUDA: not measured (None).

Memory is in MiB (2^20 bytes; the fields keep their historical ``_mb`` names). Next to the peak,
every row gives ``weight_mb``, the model's own parameters and buffers (exact): on CPU the peak RSS
also counts the runtime's allocations (allocator arenas, lazily loaded kernels, thread pools),
which for a model of a few MiB outweigh its weights, so a pruned model's peak can come out above
the dense one's. With two or more models on CPU the first is measured twice and
``memory_noise_mb`` is the gap; :func:`memory_caveat` flags peaks that are not below the first
model's or only by less than that noise, and the table marks them with a footnote.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from statprune import bench_worker
from statprune.argtypes import positive_int
from statprune.errors import DeviceError, ModelError, OutputError, StatpruneError

BACKENDS = ("torch", "onnxruntime")
DTYPES = ("float32", "float16", "bfloat16")
# trial spread (90th percentile / median latency) above which a measurement is called noisy: on a
# quiet machine the spread of 10 trials stays below ~1.1; other processes competing for the cores
# push it up (see ``noisy``)
NOISY_SPREAD = 1.25


@dataclass
class BenchRow:
    """One measurement: a model at one batch size, for one kind of call."""

    model: str  # the folder as given
    label: str  # short unique name (the folder name)
    backend: str
    device: str
    kind: str  # "forward" (full sequence, no cache), "prefill" or "generate" (causal LMs)
    batch: int
    seq_len: int
    new_tokens: int  # generated tokens per sequence ("generate" rows), else 0
    params: int
    latency_ms: float  # median over the trials
    latency_p90_ms: float
    throughput: float  # sequences/s; generated tokens/s for "generate" rows
    unit: str  # "seq/s" or "tok/s"
    peak_memory_mb: float | None
    memory_method: str
    speedup: float  # latency of the first model (same kind and batch) / this latency
    params_ratio: float  # params / params of the first model
    trials: int
    threads: int | None  # torch / onnxruntime intra-op threads on CPU
    # the model's own parameters and buffers in MiB (exact, from the tensors): what pruning shrinks
    weight_mb: float | None = None
    # |difference| of two peak-memory measurements of the first model in separate child processes
    # (CPU, 2+ models): differences between models below it are measurement noise
    memory_noise_mb: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Model:
    path: str
    label: str
    params: int
    causal: bool
    spec: dict
    model: Any = None  # torch module (torch backend)
    session: Any = None  # onnxruntime session
    onnx_path: Path | None = None
    weight_bytes: int = 0


# --- the benchmark ----------------------------------------------------------------------------


def benchmark(
    models: Sequence[str | Path],
    *,
    batches: Sequence[int] = (1, 8, 32),
    seq_len: int = 128,
    backend: str = "torch",
    device: str = "cpu",
    warmup: int = 3,
    trials: int = 10,
    threads: int | None = None,
    dtype: str = "float32",
    lm_batches: Sequence[int] = (1, 16),
    new_tokens: int = 32,
    memory: bool = True,
    generate: bool = True,
    failures: dict[str, str] | None = None,
) -> list[BenchRow]:
    """Benchmark ``models`` side by side; returns rows in model order within each (kind, batch).

    ``backend="onnxruntime"`` first exports every model with ``statprune.export.export_onnx``
    (checked against PyTorch) to a temporary folder. ``memory=False`` skips the peak-memory
    measurement (the child processes cost a few seconds per model on CPU); ``generate=False``
    skips the generation rows of causal LMs (prefill only).

    ``failures``: when a dict is given, a model that cannot be loaded, exported or run is recorded
    there (``str(path)`` as given -> a one-line reason) and left out of the rows instead of
    failing the whole benchmark; a model whose peak memory cannot be measured (the child process
    died) keeps its latency rows with ``peak_memory_mb`` None and is recorded too. Without it,
    the first failure raises (``ModelError`` or the library's error).
    """
    import torch

    if not models:
        raise ValueError("give at least one model folder")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    require_backend(backend)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if backend == "onnxruntime" and dtype != "float32":
        raise StatpruneError("--dtype applies to the torch backend only; ONNX exports are float32")
    batches, lm_batches = (
        _sizes(batches, "batch sizes"),
        _sizes(lm_batches, "LM batch sizes", allow_empty=True),
    )
    if seq_len < 1 or trials < 1 or warmup < 0 or new_tokens < 1:
        raise ValueError("seq_len, trials and new_tokens must be positive and warmup not negative")
    device = _check_device(device, backend)

    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    # one thread count for every backend, recorded in each row: ``threads``, else torch's
    # (OMP_NUM_THREADS or one per core), set explicitly on onnxruntime sessions too, whose own
    # default differs, so both backends are compared at the same count
    used_threads = torch.get_num_threads() if device == "cpu" else None
    threads = used_threads or threads
    try:
        with contextlib.ExitStack() as stack:
            tmp = None
            if backend == "onnxruntime":
                tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="statprune-bench-")))
            loaded = _load_all(models, backend, device, dtype, seq_len, tmp, threads, failures)
            if failures is not None:  # one forward each, so a model that cannot run is dropped here
                loaded = _runnable(loaded, batches, seq_len, backend, device, failures)
            memory_mb, method, noise = _memory(
                loaded, batches, seq_len, backend, device, dtype, threads, memory, failures
            )
            rows: list[BenchRow] = []
            common = {"backend": backend, "device": device, "seq_len": seq_len, "threads": used_threads}
            with torch.inference_mode():
                for batch in batches:
                    calls = [_forward_call(m, batch, seq_len, backend, device) for m in loaded]
                    times = time_calls(calls, warmup, trials, _sync(device, backend))
                    for m, ts in zip(loaded, times, strict=True):
                        mem = memory_mb.get((m.label, batch))
                        row = _row(m, "forward", batch, 0, ts, batch, "seq/s", mem, method, common)
                        row.memory_noise_mb = noise.get(batch) if mem is not None else None
                        rows.append(row)
                lm = [m for m in loaded if m.causal] if backend == "torch" else []
                for batch in lm_batches if lm else ():
                    calls = [_prefill_call(m, batch, seq_len, device) for m in lm]
                    times = time_calls(calls, warmup, trials, _sync(device, backend))
                    for m, ts in zip(lm, times, strict=True):
                        rows.append(_row(m, "prefill", batch, 0, ts, batch, "seq/s", None, "", common))
                    if not generate:
                        continue
                    made = [_generate_call(m, batch, seq_len, new_tokens, device) for m in lm]
                    calls, produced = [c for c, _ in made], [n for _, n in made]
                    times = time_calls(calls, warmup, trials, _sync(device, backend))
                    for m, ts, n in zip(lm, times, produced, strict=True):
                        rows.append(_row(m, "generate", batch, n, ts, batch * n, "tok/s", None, "", common))
    finally:
        torch.set_num_threads(previous_threads)
    return _with_ratios(rows)


def module_calls(
    models: Sequence[Any], labels: Sequence[str], *, batch: int, seq_len: int, kind: str = "forward"
) -> tuple[list[_Model], list[Callable[[], Any]], str]:
    """The entries, timed calls (``benchmark``'s own) and device of in-memory torch models, for
    ``time_calls``. ``kind``: ``forward`` (full sequence, no cache) or ``prefill`` (causal LMs:
    one forward filling the KV cache, next-token logits only; other models: forward)."""
    if kind not in ("forward", "prefill"):
        raise ValueError(f"kind must be forward or prefill, not {kind!r}")
    from statprune.export import input_spec, is_causal_lm

    entries, calls, devices = [], [], []
    for model, label in zip(models, labels, strict=True):
        params = sum(p.numel() for p in model.parameters())
        m = _Model(label, label, params, is_causal_lm(model), input_spec(model), model=model)
        m.weight_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        device = str(next(model.parameters()).device)
        use_prefill = kind == "prefill" and m.causal
        call = (
            _prefill_call(m, batch, seq_len, device)
            if use_prefill
            else _forward_call(m, batch, seq_len, "torch", device)
        )
        entries.append(m)
        calls.append(call)
        devices.append(device)
    cuda = next((d for d in devices if d.startswith("cuda")), None)
    return entries, calls, cuda or devices[0]


def measure_modules(
    models: Sequence[Any],
    labels: Sequence[str],
    *,
    batch: int = 32,
    seq_len: int = 128,
    kind: str = "forward",
    warmup: int = 2,
    trials: int = 7,
) -> list[BenchRow]:
    """Latency of in-memory torch models side by side, with ``benchmark``'s calls and timing loop
    (``module_calls``, ``time_calls``; no peak memory): one row per model, in order, ``speedup``
    relative to the first. Each model runs on the device it is on."""
    import torch

    entries, calls, device = module_calls(models, labels, batch=batch, seq_len=seq_len, kind=kind)
    with torch.inference_mode():
        times = time_calls(calls, warmup, trials, _sync(device, "torch"))
    threads = None if device.startswith("cuda") else torch.get_num_threads()
    common = {"backend": "torch", "device": device, "seq_len": seq_len, "threads": threads}
    rows = [
        _row(m, kind, batch, 0, ts, batch, "seq/s", None, "", common)
        for m, ts in zip(entries, times, strict=True)
    ]
    return _with_ratios(rows)


def _sizes(values: Sequence[int], what: str, allow_empty: bool = False) -> tuple[int, ...]:
    sizes = tuple(int(v) for v in values)
    if (not sizes and not allow_empty) or any(v < 1 for v in sizes):
        raise ValueError(f"{what} must be positive integers, not {list(values)}")
    return tuple(dict.fromkeys(sizes))


def require_backend(backend: str) -> None:
    """``OptionsError`` for an unknown backend; ``StatpruneError`` naming the package when the
    onnxruntime backend is asked for and onnxruntime is not installed."""
    import importlib.util

    from statprune.errors import OptionsError

    if backend not in BACKENDS:
        raise OptionsError(f"unknown backend {backend!r}: choose {', '.join(BACKENDS)}")
    if backend == "onnxruntime" and importlib.util.find_spec("onnxruntime") is None:
        raise StatpruneError(
            "--backend onnxruntime needs the onnxruntime package: pip install 'statprune[onnx]' "
            "(or use --backend torch)"
        )


def _check_device(device: str, backend: str) -> str:
    import torch

    name = str(device)
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise DeviceError(f"unknown device {name!r}: use cpu or cuda")
    if name.startswith("cuda"):
        if backend == "onnxruntime":
            import onnxruntime as ort

            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise DeviceError(
                    "--device cuda was asked for but this onnxruntime has no CUDA support; "
                    "install onnxruntime-gpu or use --device cpu"
                )
        elif not torch.cuda.is_available():
            raise DeviceError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return name


def _labels(models: Sequence[str | Path]) -> list[str]:
    labels: list[str] = []
    for path in models:
        name = Path(path).name or str(path)
        label, n = name, 2
        while label in labels:
            label, n = f"{name}#{n}", n + 1
        labels.append(label)
    return labels


def _reason(exc: BaseException) -> str:
    """A failure in one line: the error's own first line (its type when it has no message)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _runnable(loaded, batches, seq_len, backend, device, failures) -> list[_Model]:
    """The models whose forward runs at every batch size; the others go into ``failures``."""
    import torch

    kept = []
    for m in loaded:
        try:
            with torch.inference_mode():
                for batch in batches:
                    _forward_call(m, batch, seq_len, backend, device)()
        except Exception as exc:  # any backend error: recorded for this model only
            failures[m.path] = f"its forward failed ({_reason(exc)})"
            continue
        kept.append(m)
    return kept


def _load_all(models, backend, device, dtype, seq_len, tmp, threads, failures=None) -> list[_Model]:
    loaded = []
    for i, (path, label) in enumerate(zip(models, _labels(models), strict=True)):
        if failures is None:
            loaded.append(_load_one(i, path, label, backend, device, dtype, seq_len, tmp, threads))
            continue
        try:
            loaded.append(_load_one(i, path, label, backend, device, dtype, seq_len, tmp, threads))
        except Exception as exc:  # one model that cannot be loaded or exported: recorded, skipped
            failures[str(path)] = f"it could not be loaded for {backend} ({_reason(exc)})"
    return loaded


def _load_one(i, path, label, backend, device, dtype, seq_len, tmp, threads) -> _Model:
    import torch

    from statprune.adapters import task_head
    from statprune.export import (
        check_seq_len,
        export_onnx,
        input_spec,
        is_causal_lm,
        load_model,
        max_positions,
        onnx_session,
    )

    with _no_progress_bars():
        model = load_model(path, device=device if backend == "torch" else None, dtype=getattr(torch, dtype))
    if getattr(task_head(model), "kind", None) == "multiple-choice":
        raise ModelError(f"{path}: multiple-choice models take 3-D inputs; bench the base model instead")
    check_seq_len(model, seq_len)
    params = sum(p.numel() for p in model.parameters())
    entry = _Model(str(path), label, params, is_causal_lm(model), input_spec(model))
    entry.weight_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    if backend == "torch":
        entry.model = model
    else:
        limit = max_positions(model)
        del model
        entry.onnx_path = tmp / f"model{i}.onnx"
        with _no_progress_bars():
            export_onnx(
                path, entry.onnx_path, seq_len=max(2, min(16, limit or 16)), past=False, pooling=False
            )
        entry.session = onnx_session(entry.onnx_path, device, threads)
    return entry


@contextlib.contextmanager
def _no_progress_bars():
    """transformers' "Loading weights" bars would clutter the table on stdout/stderr."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _sync(device: str, backend: str) -> Callable[[], None]:
    if backend == "torch" and device.startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    return lambda: None


def _torch_inputs(m: _Model, batch: int, seq_len: int, device: str) -> dict:
    from statprune.export import token_inputs

    return {k: v.to(device) for k, v in token_inputs(m.spec, batch, seq_len, seed=batch).items()}


def _forward_call(m: _Model, batch: int, seq_len: int, backend: str, device: str) -> Callable[[], Any]:
    if backend == "onnxruntime":
        from statprune.export import token_inputs

        inputs = token_inputs(m.spec, batch, seq_len, seed=batch)
        names = {i.name for i in m.session.get_inputs()}
        feed = {k: v.numpy() for k, v in inputs.items() if k in names}
        return lambda: m.session.run(None, feed)
    inputs = _torch_inputs(m, batch, seq_len, device)
    if m.causal:
        inputs["use_cache"] = False
    return lambda: m.model(**inputs)


def _prefill_call(m: _Model, batch: int, seq_len: int, device: str) -> Callable[[], Any]:
    import inspect

    inputs = _torch_inputs(m, batch, seq_len, device)
    inputs["use_cache"] = True
    if "logits_to_keep" in inspect.signature(m.model.forward).parameters:
        inputs["logits_to_keep"] = 1  # what generation computes: the next token's logits only
    return lambda: m.model(**inputs)


def _generate_call(m: _Model, batch: int, seq_len: int, new_tokens: int, device: str):
    import transformers

    inputs = _torch_inputs(m, batch, seq_len, device)
    config = m.model.config
    eos = getattr(m.model.generation_config, "eos_token_id", None) or getattr(config, "eos_token_id", None)
    pad = config.pad_token_id
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    generation = transformers.GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        pad_token_id=0 if pad is None else pad,
        eos_token_id=eos,
    )

    def call():
        return m.model.generate(**inputs, generation_config=generation)

    produced = int(call().shape[1]) - seq_len  # also a first warm-up call
    if produced != new_tokens:
        raise ModelError(f"{m.path} generated {produced} tokens instead of {new_tokens}; cannot time it")
    return call, produced


def time_calls(
    calls: Sequence[Callable[[], Any]], warmup: int, trials: int, sync: Callable[[], None] = lambda: None
) -> list[list[float]]:
    """Seconds per call: ``warmup`` untimed calls of each, then ``trials`` rounds, each timing every
    call once in an order rotated from round to round (drift hits every call alike).

    The one timing loop of statprune: ``benchmark``, ``measure_modules`` (sweeps, latency budgets)
    and the latency lookup tables (``statprune.latency``) all use it. ``sync``: called around each
    timed call (``torch.cuda.synchronize`` on a GPU)."""
    for call in calls:
        for _ in range(warmup):
            call()
    sync()
    times: list[list[float]] = [[] for _ in calls]
    n = len(calls)
    for r in range(trials):
        for k in range(n):
            i = (r + k) % n
            sync()
            start = time.perf_counter()
            calls[i]()
            sync()
            times[i].append(time.perf_counter() - start)
    return times


def spread(seconds: Sequence[float]) -> float:
    """90th percentile / median of one call's trial times (1.0: perfectly steady)."""
    median = statistics.median(seconds)
    return _percentile(list(seconds), 0.9) / median if median > 0 else 1.0


def noisy(rows: Sequence[BenchRow], threshold: float = NOISY_SPREAD) -> list[BenchRow]:
    """The rows whose trial spread (``latency_p90_ms / latency_ms``) exceeds ``threshold``."""
    return [r for r in rows if r.latency_ms > 0 and r.latency_p90_ms / r.latency_ms > threshold]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _row(m: _Model, kind, batch, new_tokens, seconds, units, unit, mem, method, common) -> BenchRow:
    median = statistics.median(seconds)
    return BenchRow(
        model=m.path,
        label=m.label,
        kind=kind,
        batch=batch,
        new_tokens=new_tokens,
        params=m.params,
        latency_ms=median * 1e3,
        latency_p90_ms=_percentile(seconds, 0.9) * 1e3,
        throughput=units / median if median > 0 else float("inf"),
        unit=unit,
        peak_memory_mb=mem,
        memory_method=method if mem is not None else "not measured",
        speedup=1.0,
        params_ratio=1.0,
        trials=len(seconds),
        **common,
        weight_mb=m.weight_bytes / 2**20 if m.weight_bytes else None,
    )


def _with_ratios(rows: list[BenchRow]) -> list[BenchRow]:
    first: dict[tuple[str, int], BenchRow] = {}
    for row in rows:
        ref = first.setdefault((row.kind, row.batch), row)
        row.speedup = ref.latency_ms / row.latency_ms if row.latency_ms > 0 else float("inf")
        row.params_ratio = row.params / ref.params if ref.params else float("nan")
    return rows


# --- peak memory ------------------------------------------------------------------------------

_METHODS = {
    "rss-peak": "child process: peak RSS during the forward − RSS before loading",
    "maxrss": "child process: maxrss − RSS before loading (includes loading transients)",
    "cuda": "cuda max_memory_allocated during the forward + this model's weights",
}


def _memory(loaded, batches, seq_len, backend, device, dtype, threads, enabled, failures=None):
    """``({(label, batch): MiB}, method description, {batch: noise MiB})``; empty when not measured.

    On CPU with two or more models the first one is measured twice, in two child processes: the
    gap between the two is the noise floor of comparing models (allocator arenas, lazily loaded
    kernels and thread pools weigh as much as a tiny model's weights); its value is their mean.
    A model whose child process fails is recorded in ``failures`` (when given) and left out."""
    if not enabled:
        return {}, "not measured", {}
    if device.startswith("cuda"):
        if backend != "torch":
            return {}, "not measured (onnxruntime on CUDA)", {}
        return _cuda_memory(loaded, batches, seq_len, device), _METHODS["cuda"], {}
    out: dict[tuple[str, int], float] = {}
    noise: dict[int, float] = {}
    method = "rss-peak"
    for i, m in enumerate(loaded):
        try:
            measured, used = _child_memory(m, batches, seq_len, backend, dtype, threads)
            if i == 0 and len(loaded) > 1:
                again, _ = _child_memory(m, batches, seq_len, backend, dtype, threads)
                noise = {b: abs(mb - again[b]) for b, mb in measured.items()}
                measured = {b: (mb + again[b]) / 2 for b, mb in measured.items()}
        except ModelError as exc:
            if failures is None:
                raise
            failures[m.path] = f"its peak memory could not be measured ({_reason(exc)})"
            continue
        method = used if used != "rss-peak" else method
        out.update({(m.label, b): mb for b, mb in measured.items()})
    return out, _METHODS[method], noise


def _child_memory(m: _Model, batches, seq_len, backend, dtype, threads):
    args = {  # absolute: the child runs elsewhere
        "path": str(Path(m.path).resolve()),
        "onnx": None if m.onnx_path is None else str(Path(m.onnx_path).resolve()),
        "backend": backend,
        "batches": list(batches),
        "seq_len": seq_len,
        "spec": m.spec,
        "causal": m.causal,
        "dtype": dtype,
        "threads": threads,
    }
    package_root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    # run from the package's own root: ``-m`` puts the working directory first on the import path,
    # where another checkout's ``statprune/`` would shadow this one
    result = subprocess.run(
        [sys.executable, "-m", "statprune.bench_worker", json.dumps(args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=package_root,
    )
    line = next((x for x in result.stdout.splitlines() if x.startswith(bench_worker.PREFIX)), None)
    if result.returncode != 0 or line is None:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        code = result.returncode
        died = f"killed by signal {-code}" if code < 0 else f"exit status {code}" if code else "no result"
        raise ModelError(
            f"the memory-measuring child process for {m.path} failed ({died}: {tail}); "
            "pass --no-memory (sweep: --bench-no-memory) to skip it"
        )
    data = json.loads(line.split(" ", 1)[1])
    return {int(b): float(mb) for b, mb in data["mb"].items()}, data["method"]


def _cuda_memory(loaded, batches, seq_len, device):
    import torch

    out = {}
    with torch.inference_mode():
        for m in loaded:
            for batch in batches:
                call = _forward_call(m, batch, seq_len, "torch", device)
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
                call()
                torch.cuda.synchronize()
                extra = torch.cuda.max_memory_allocated(device) - before
                out[(m.label, batch)] = (extra + m.weight_bytes) / 2**20
    return out


# the smallest peak-memory difference a comparison claims, as a share of the reference's peak: one
# repeat of the reference measures the noise only roughly (page-granular RSS, allocator arenas)
MEMORY_RESOLUTION = 0.01


def memory_caveat(peak_mb: float | None, reference_mb: float | None, noise_mb: float | None) -> str | None:
    """Why a model's peak memory shows no real saving against the reference (dense) model's:
    ``"above"`` (its peak is not below the reference's), ``"noise"`` (below it by no more than the
    noise: ``noise_mb``, the gap between two measurements of the reference, or
    ``MEMORY_RESOLUTION`` of the reference's peak, whichever is larger), or None (a saving, or not
    measured). Peak RSS includes the runtime's own allocations (allocator arenas, kernels, thread
    pools), which dominate for models of a few MiB; their weights (``weight_mb``) still compare
    exactly."""
    if peak_mb is None or reference_mb is None:
        return None
    if peak_mb >= reference_mb:
        return "above"
    if reference_mb - peak_mb <= max(noise_mb or 0.0, MEMORY_RESOLUTION * reference_mb):
        return "noise"
    return None


def weight_share(weight_mb: float | None, peak_mb: float | None) -> str | None:
    """``"the weights are 0.1% of the peak memory"`` (None when either is unknown): how much of a
    peak the model itself explains."""
    if weight_mb is None or not peak_mb:
        return None
    return f"the weights are {weight_mb / peak_mb:.1%} of the peak memory"


MEMORY_CAVEAT_NOTE = (
    "peak memory not below the dense (first) model's, or below it by less than the measurement "
    f"noise (the gap of two measurements of it, at least {MEMORY_RESOLUTION:.0%} of its peak); peak "
    "RSS also counts the runtime's own allocations (allocator arenas, kernels, thread pools), which "
    "outweigh the weights of a small model: compare the weights column"
)


# --- output -----------------------------------------------------------------------------------


def to_dict(rows: Sequence[BenchRow]) -> dict[str, Any]:
    """Rows plus the environment they were measured in, ready for ``json.dump``."""
    import torch
    import transformers

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    with contextlib.suppress(ImportError):
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
    if any(r.device.startswith("cuda") for r in rows) and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return {"environment": env, "rows": [r.to_dict() for r in rows]}


def _count(n: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.1f}{suffix}"
    return str(n)


def format_table(rows: Sequence[BenchRow]) -> str:
    """A plain-text table, one block per (kind, batch), models in the order given."""
    if not rows:
        return "(no measurements)"
    head = rows[0]
    threads = f", {head.threads} thread{'' if head.threads == 1 else 's'}" if head.threads else ""
    lines = [
        f"backend {head.backend} on {head.device}{threads}, {head.seq_len} tokens per sequence, "
        f"{head.trials} trials (median / p90)"
    ]
    header = [
        "model",
        "kind",
        "batch",
        "params",
        "median ms",
        "p90 ms",
        "throughput",
        "weights MiB",
        "peak MiB",
        "speedup",
    ]
    table = []
    first: dict[tuple[str, int], BenchRow] = {}
    flagged = False
    for r in rows:
        ref = first.setdefault((r.kind, r.batch), r)
        kind = f"generate {r.new_tokens}" if r.kind == "generate" else r.kind
        peak = "-" if r.peak_memory_mb is None else f"{r.peak_memory_mb:,.1f}"
        if r is not ref and memory_caveat(r.peak_memory_mb, ref.peak_memory_mb, r.memory_noise_mb):
            peak, flagged = peak + " †", True
        table.append(
            [
                r.label,
                kind,
                str(r.batch),
                f"{_count(r.params)} ({r.params_ratio:.2f}×)",
                f"{r.latency_ms:.2f}",
                f"{r.latency_p90_ms:.2f}",
                f"{r.throughput:,.1f} {r.unit}",
                "-" if r.weight_mb is None else f"{r.weight_mb:,.1f}",
                peak,
                f"{r.speedup:.2f}×",
            ]
        )
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(header)]
    left = {0, 1}

    def fmt(cells):
        return "  ".join(
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    lines += [fmt(header), fmt(["-" * w for w in widths])]
    previous = None
    for r, cells in zip(rows, table, strict=True):
        if previous is not None and (r.kind, r.batch) != previous:
            lines.append("")
        previous = (r.kind, r.batch)
        lines.append(fmt(cells))
    methods = sorted({r.memory_method for r in rows if r.peak_memory_mb is not None})
    lines.append("")
    lines.append("speedup: latency of the first model / latency; params ratio to the first model in ()")
    lines += [f"peak MiB: {m}" for m in methods] or ["peak MiB: not measured"]
    noise = max((r.memory_noise_mb for r in rows if r.memory_noise_mb is not None), default=None)
    if noise is not None:
        lines.append(f"peak MiB noise: {noise:,.1f} MiB (two measurements of the first model)")
    lines.append("weights MiB: the model's parameters and buffers (2^20 bytes)")
    if flagged:
        lines.append(f"†: {MEMORY_CAVEAT_NOTE}")
    share = weight_share(head.weight_mb, head.peak_memory_mb)
    if share:
        lines.append(f"first model: {share} ({head.label}, batch {head.batch})")
    if head.backend == "onnxruntime" and any(r.kind == "forward" for r in rows):
        lines.append("onnxruntime: full-sequence forward only (prefill/generation need the torch backend)")
    return "\n".join(lines)


# --- command line -----------------------------------------------------------------------------


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of positive integers")
    return values


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-negative integer")
    return value


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``bench MODEL [MODEL ...]`` on a ``parser.add_subparsers()`` object."""
    p = subparsers.add_parser(
        "bench", help="measure latency, throughput and memory of model folders side by side"
    )
    p.add_argument(
        "models", nargs="+", type=Path, metavar="MODEL", help="model folders; the first is the reference"
    )
    p.add_argument("--batch", type=_int_list, default=(1, 8, 32), help="batch sizes, e.g. 1,8,32")
    p.add_argument("--seq-len", type=positive_int, default=128, help="tokens per sequence (all real)")
    p.add_argument("--backend", choices=BACKENDS, default="torch")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="torch backend only")
    p.add_argument(
        "--trials", type=positive_int, default=10, help="timed rounds (each times every model once)"
    )
    p.add_argument("--warmup", type=_non_negative, default=3, help="untimed calls per model and batch")
    p.add_argument(
        "--threads", type=positive_int, default=None, help="CPU intra-op threads (default: library's)"
    )
    p.add_argument("--lm-batch", type=_int_list, default=(1, 16), help="causal LMs: prefill/generate batches")
    p.add_argument(
        "--new-tokens", type=positive_int, default=32, help="causal LMs: tokens generated per sequence"
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--json", type=Path, default=None, metavar="OUT.json", help="also write the rows as JSON")
    p.set_defaults(func=run_bench)
    return p


def run_bench(args: argparse.Namespace) -> int:
    if args.json is not None:
        parent = args.json.expanduser().absolute().parent
        if not parent.is_dir():
            raise OutputError(f"--json {args.json}: folder {parent} does not exist")
        if args.json.is_dir():
            raise OutputError(f"--json {args.json} is a folder; give a file name")
    rows = benchmark(
        args.models,
        batches=args.batch,
        seq_len=args.seq_len,
        backend=args.backend,
        device=args.device,
        warmup=args.warmup,
        trials=args.trials,
        threads=args.threads,
        dtype=args.dtype,
        lm_batches=args.lm_batch,
        new_tokens=args.new_tokens,
        memory=not args.no_memory,
    )
    print(format_table(rows))
    if args.json is not None:
        _write_json(args.json, to_dict(rows))
        print(f"\nwrote {args.json}")
    return 0


def _write_json(path: Path, data: dict) -> None:
    from statprune.atomic import write_text

    write_text(path.expanduser().absolute(), json.dumps(data, indent=2) + "\n")
