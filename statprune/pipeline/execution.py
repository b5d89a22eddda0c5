"""Data movement, kept apart from the algorithm: devices, offloading, timing, the analysis cache
and the identities of checkpointed or cached jobs."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from statprune.calibration import CalibrationBatch
from statprune.checkpoint import Checkpoint, PassState, fingerprint, weights_digest
from statprune.flops import LayerShape
from statprune.modeling_statprune import apply_ops
from statprune.options import CompressionOptions
from statprune.pipeline.records import Analysis, Job

KEEP_STATS_BYTES = 4 * 2**30  # beyond this, original activations recompute the statistics instead


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor inside (tuples, lists, dicts) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


@contextlib.contextmanager
def visiting(layer: nn.Module, device: torch.device | None) -> Iterator[None]:
    """With offloading, a layer lives on the CPU and visits ``device`` while it is processed."""
    if device is None:
        yield
        return
    layer.to(device)
    try:
        yield
    finally:
        layer.to("cpu")


@contextlib.contextmanager
def timed(stages: dict[str, float], name: str) -> Iterator[None]:
    """Record the wall time of the block in ``stages[name]`` (seconds)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        stages[name] = time.perf_counter() - start


def stats_bytes(shapes: list[LayerShape]) -> int:
    """Memory of every layer's float64 Gram matrices (heads and neurons; routed experts: one
    block per expert, ``statprune.moe``)."""
    return sum(8 * ((s.n_heads * s.head_dim) ** 2 + s.ffn_width**2 // s.ffn_active[1]) for s in shapes)


def keeps_stats(options: CompressionOptions, offload: bool, checkpointed: bool) -> bool:
    """Original activations: the pruning pass would see the analysis pass's inputs again, so keep
    its statistics (one Gram per block in memory) instead of recomputing them. Not with
    offloading (models too large for that) or checkpoints (a resumed run has no statistics); the
    memory bound (``KEEP_STATS_BYTES``) is checked once the shapes are known."""
    return options.activations == "original" and not offload and not checkpointed


def open_checkpoint(
    folder: str | None,
    resume: bool,
    model: nn.Module,
    options: CompressionOptions,
    batches: list[CalibrationBatch],
) -> Checkpoint | None:
    """The checkpoint of this job (model config, resolved options, calibration tokens), or None."""
    if folder is None:
        return None
    job = fingerprint(model.config.to_json_string(), asdict(options), batches, weights_digest(model))
    return Checkpoint(folder, job, resume)


def resume_pass(job: Job, stage: str, inputs: list[torch.Tensor]) -> PassState | None:
    """The saved progress of pass ``stage`` (``analyse`` or ``prune``) of a resumed job, its
    tensors on the device of ``inputs``; None when there is none (start at layer 0)."""
    return job.checkpoint.load(stage, inputs[0].device) if job.checkpoint is not None else None


def record_progress(
    job: Job, stage: str, layer: int, state: Callable[[], tuple[dict, list[torch.Tensor]]]
) -> None:
    """Layers ``0 … layer`` of ``stage`` are done: when the job is checkpointed, save what
    ``state()`` returns (only built then): JSON data and the tensors the next layer needs."""
    if job.checkpoint is not None:
        data, inputs = state()
        job.checkpoint.save(stage, layer, data, inputs)


def save_pruned_layer(job: Job, index: int, layer: nn.Module) -> None:
    """Keep a pruned layer's weights for a resumed run (checkpointed jobs only)."""
    if job.checkpoint is not None:
        job.checkpoint.save_layer(index, layer)


def restore_pruned_layers(job: Job, ops: list[dict], done: int) -> None:
    """A resumed pruning pass: replay the saved surgery ops, then load layers ``0 … done``."""
    apply_ops(job.base, ops)
    layers = job.layers()
    for i in range(done + 1):
        job.checkpoint.restore_layer(i, layers[i])


class AnalysisCache:
    """Reuse one analysis across budgets: pass the same cache to ``compress`` for every budget.

    Holds the most recent analysis, keyed by the model object, its config, the calibration
    batches and every option except the budget; the model must not change in between.
    """

    def __init__(self) -> None:
        self._key: str | None = None
        self._analysis: Analysis | None = None

    @staticmethod
    def key_for(model: nn.Module, options: CompressionOptions, batches: list[CalibrationBatch]) -> str:
        # curves are priced in the budget kind's unit: a cached analysis serves budgets of one kind
        unbudgeted = asdict(options) | {"keep_flops": None, "keep_params": None, "keep_latency": None}
        unbudgeted["budget_kind"] = options.budget()[0]
        return f"{id(model)}:{fingerprint(model.config.to_json_string(), unbudgeted, batches)}"

    def get(self, key: str) -> Analysis | None:
        return self._analysis if key == self._key else None

    def put(self, key: str, analysis: Analysis) -> None:
        self._key, self._analysis = key, analysis

    def clear(self) -> None:
        self._key = self._analysis = None
