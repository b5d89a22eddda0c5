"""``statprune.compress``: the compression stages in order (see ``statprune.pipeline.stages``).

    resolve options → prepare calibration → capture layer inputs → analyse (per layer: collect
    statistics, select, error curves) → allocate → prune (per layer: select, correct, slice) → report

The names that lived here before the pipeline was split out (``CompressionOptions``,
``AnalysisCache``, ``Analysis``, ``check_finite_weights``, ``resolve_device``, the option choice
lists) are re-exported.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from statprune.allocation import adds_biases, check_reachable
from statprune.argtypes import resolve_device
from statprune.calibration import CalibrationBatch
from statprune.flops import model_shapes
from statprune.guards import check_calibration, check_seq_len, record_fallback
from statprune.options import (
    CORRECTION_TARGETS,
    ERROR_METRICS,
    LAYER_WEIGHTINGS,
    CompressionOptions,
)
from statprune.pipeline import stages
from statprune.pipeline.execution import (
    KEEP_STATS_BYTES,
    AnalysisCache,
    keeps_stats,
    open_checkpoint,
    stats_bytes,
    timed,
)
from statprune.pipeline.records import Analysis, Job
from statprune.pipeline.stages import THIN_TOKENS_PER_UNIT, check_finite_weights
from statprune.progress import progress_bar
from statprune.report import CompressionReport

__all__ = [
    "CORRECTION_TARGETS",
    "ERROR_METRICS",
    "KEEP_STATS_BYTES",
    "LAYER_WEIGHTINGS",
    "THIN_TOKENS_PER_UNIT",
    "Analysis",
    "AnalysisCache",
    "CompressionOptions",
    "check_finite_weights",
    "compress",
    "resolve_device",
]


def compress(
    model: nn.Module,
    tokenizer=None,
    data: Sequence[str] | Sequence[tuple[str, str]] | Iterable[CalibrationBatch] | None = None,
    *,
    keep_flops: float | None = None,
    keep_params: float | None = None,
    samples: int = 512,
    seed: int = 0,
    batch_size: int = 16,
    inplace: bool = False,
    progress: bool = True,
    checkpoint_dir: str | None = None,
    resume: bool = False,
    offload: bool = False,
    cache: AnalysisCache | None = None,
    pack: bool = False,
    **option_overrides,
) -> tuple[nn.Module, CompressionReport]:
    """Compress a transformers model with STAT; returns the pruned model and its report.

    ``data`` is a list of strings (or (text, pair) tuples), tokenized with ``tokenizer``, or an
    iterable of ``CalibrationBatch`` (see ``statprune.calibration.batches_from_tensors``). Other
    keyword arguments are ``CompressionOptions`` fields (``statprune.options``). The input model is
    copied unless ``inplace``. With ``checkpoint_dir`` progress is saved after every layer;
    ``resume`` continues an interrupted run of the same job from there, with identical results.
    With ``offload`` the model stays in CPU memory and one layer at a time visits the device (for
    models larger than the GPU). With ``pack`` the texts are joined and cut into
    ``seq_len``-token windows, of which ``samples`` are drawn (the usual calibration for causal
    LMs). ``cache`` (an ``AnalysisCache``) reuses the budget-independent analysis when the same
    model is compressed at several budgets.

    Raises ``OptionsError`` (bad options), ``BudgetError`` (a budget that cannot be met),
    ``ModelError``, ``DataError``, ``DeviceError`` or ``OutputError`` (checkpoint folder) — all
    ``StatpruneError``s.
    """
    plan = stages.resolve_options(
        model, keep_flops=keep_flops, keep_params=keep_params, offload=offload, **option_overrides
    )
    options, device = plan.options, plan.device
    check_finite_weights(model)
    check_seq_len(model, options.seq_len)
    if plan.budget_kind != "latency":  # a budget below the reachable floor, from the shapes alone
        dense_shapes = model_shapes(plan.adapter, model.base_model)
        kind, keep = plan.budget_kind, plan.budget
        check_reachable(dense_shapes, kind, keep, options.seq_len, options.prune, adds_biases(plan))
    batches = stages.prepare_calibration(
        tokenizer, data, samples=samples, seed=seed, seq_len=options.seq_len, batch_size=batch_size, pack=pack
    )
    checkpoint = open_checkpoint(checkpoint_dir, resume, model, options, batches)
    cache_key = AnalysisCache.key_for(model, options, batches) if cache is not None else None
    analysis = cache.get(cache_key) if cache is not None else None
    keep_stats = keeps_stats(options, offload, checkpoint is not None)
    start = time.perf_counter()
    original = model
    if not inplace:
        model = copy.deepcopy(model)
    was_training = model.training
    model.eval()
    model.to("cpu" if offload else device)
    timings: dict[str, float] = {}
    with torch.no_grad(), progress_bar.enabled(progress):
        prepared = plan.adapter.prepare(model.base_model)  # GPT-2: Conv1D → nn.Linear; MoE: per-expert widths
        shapes = model_shapes(plan.adapter, model.base_model)
        keep_stats = keep_stats and stats_bytes(shapes) <= KEEP_STATS_BYTES
        job = Job(plan, model, batches, shapes, checkpoint, device if offload else None, keep_stats)
        given = isinstance(data, list | tuple) and all(isinstance(x, CalibrationBatch) for x in data)
        stages.check_enough_tokens(shapes, batches, plan, requested=None if given else samples)
        check_calibration(batches, shapes, model)
        if plan.budget_kind == "latency":
            with timed(timings, "latency table"):
                job.cost = stages.latency_cost(job, offload)
            # below the embeddings-only floor of the tables: refused before any calibration
            check_reachable(shapes, job.cost, plan.budget, options.seq_len, options.prune, adds_biases(plan))
        with timed(timings, "capture"):
            calib = stages.capture_inputs(model, plan.adapter, batches, device)
        # after capture: checks of the captured layer inputs go here
        with timed(timings, "analyse"):
            if analysis is None:
                analysis = stages.analyse(job, calib)
                if cache is not None:
                    cache.put(cache_key, analysis)
        # after analysis: checks of the statistics and error curves go here
        with timed(timings, "allocate"):
            counts = stages.allocate_widths(job, analysis)
        with timed(timings, "prune"):
            pruned = stages.prune(job, calib, counts, analysis)
    if checkpoint is not None:
        checkpoint.finish()
    earlier = list(getattr(model.config, "statprune_ops", None) or [])
    model.config.statprune_ops = earlier + prepared + pruned.ops
    model.train(was_training)
    report = stages.build_report(job, pruned, calib, analysis, start)
    if job.cost is not None:
        with torch.no_grad():
            report.latency = stages.latency_report(job, None if inplace else original)
    report.stage_seconds = {k: round(v, 3) for k, v in timings.items()}
    record_fallback(report, analysis.sensitivity)
    if device.type == "cuda":
        report.peak_device_mb = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return model, report
