"""The compression stages, in the order ``statprune.compress`` runs them.

1. :func:`resolve_options` — validate the options, resolve every ``auto`` (recorded in the report).
2. :func:`prepare_calibration` — sample and tokenize (or pack) the calibration examples.
3. :func:`capture_inputs` — the first transformer layer's inputs for every batch.
4. :func:`analyse` — the method's whole-model plan, then per layer (:func:`analyse_layer`):
   collect the statistics, select, and draw each block's error curve, weighted per block.
5. :func:`allocate_widths` — per-layer head and neuron counts under the global budget.
6. :func:`prune` — per layer (:func:`prune_layer`): select, correct (folded into the next
   projection) and slice, calibrating on the pruned upstream outputs (``sequential``) or
   reusing the analysis statistics (``original``).
7. :func:`build_report` — sizes before and after, per-layer kept units and errors, options.

Each stage takes and returns the typed records of ``statprune.pipeline.records``. The pruning
method (``statprune.methods``) makes every method-specific decision; device visits, checkpoints
and caching live in ``statprune.pipeline.execution``.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict

import torch
from torch import nn

from statprune.adapters import ModelAdapter, adapter_for
from statprune.allocation import BlockCurve, curve_from_errors
from statprune.argtypes import resolve_device
from statprune.calibration import (
    CalibrationBatch,
    CalibrationWarning,
    count_tokens,
    pack_examples,
    sample_examples,
    tokenize_examples,
)
from statprune.errors import DataError, ModelError
from statprune.fisher_grads import OutputSensitivity, has_loss_without_labels, output_sensitivity
from statprune.flops import LayerShape, model_shapes, total_cost
from statprune.guards import option
from statprune.linalg.heads import head_columns
from statprune.methods import get_method
from statprune.moe import pin_selection
from statprune.options import LATENCY_OPTIONS, make_options, resolve_auto
from statprune.pipeline.execution import (
    record_progress,
    restore_pruned_layers,
    resume_pass,
    save_pruned_layer,
    to_device,
    visiting,
)
from statprune.pipeline.records import Analysis, Calibration, Job, LayerResult, LayerStats, Plan, Pruned
from statprune.pipeline.statistics import collect, collect_with_targets, output_error, run_layer
from statprune.progress import progress_bar
from statprune.report import CompressionReport, LayerReport
from statprune.surgery import prune_heads, prune_neurons

# below this many calibration tokens per unit of the widest layer, the undamped corrections overfit
# (MiniLM-MR with 64 sentences, 1.1 tokens per FFN neuron: validation KL at 80 % FLOPs 0.0062
# undamped, 0.0022 with --correction-ridge 0.1; at 4.5-10 tokens per unit damping gained nothing)
THIN_TOKENS_PER_UNIT = 4


# ------------------------------------------------------------------------------ 1. options


def resolve_options(
    model: nn.Module,
    *,
    keep_flops: float | None = None,
    keep_params: float | None = None,
    offload: bool = False,
    **overrides: object,
) -> Plan:
    """Validated options with every ``auto`` resolved: activations by the family (sequential for
    decoders), layer weighting and error metric by the method (the gradient ones only where the
    model has a label-free loss and is not offloaded). Raises ``OptionsError``/``BudgetError``
    for bad options, ``ModelError`` for an unsupported model, ``DeviceError`` for a missing GPU."""
    options = make_options(keep_flops=keep_flops, keep_params=keep_params, **overrides)
    options.validate()
    kind, budget = options.budget()
    adapter = adapter_for(model.config)
    gradient = options.layer_weighting == "auto" and has_loss_without_labels(model) and not offload
    options = resolve_auto(options, is_decoder=adapter.is_decoder, gradient_available=gradient)
    device = resolve_device(options.device)
    return Plan(options, get_method(options.method), adapter, kind, budget, device)


def check_finite_weights(model: nn.Module) -> None:
    """``ModelError`` naming the first weight that holds NaN or Inf."""
    for name, param in model.named_parameters():
        if param.is_floating_point() and not torch.isfinite(param).all():
            raise ModelError(f"model weight {name} contains NaN or Inf; fix or re-export the checkpoint")


# -------------------------------------------------------------------------- 2. calibration


def prepare_calibration(
    tokenizer: object | None,
    data: Sequence[str] | Sequence[tuple[str, str]] | Iterable[CalibrationBatch] | None,
    *,
    samples: int,
    seed: int,
    seq_len: int,
    batch_size: int,
    pack: bool,
) -> list[CalibrationBatch]:
    """Tokenized calibration batches: ``data`` as given when it is batches already, else
    ``samples`` examples drawn with ``seed`` (or, with ``pack``, ``seq_len``-token windows of the
    joined texts). ``DataError`` for missing or empty data or a missing tokenizer."""
    if data is None:
        raise DataError("no calibration data given: pass a list of texts or tokenized batches")
    items = list(data)
    if not items:
        raise DataError("calibration data is empty: give a few hundred representative examples")
    if all(isinstance(x, CalibrationBatch) for x in items):
        return items
    if tokenizer is None:
        raise DataError("texts were given without a tokenizer; pass the model's tokenizer")
    if pack:
        return pack_examples(tokenizer, items, samples, seed, seq_len=seq_len, batch_size=batch_size)
    chosen = sample_examples(items, samples, seed)
    batches = tokenize_examples(tokenizer, chosen, seq_len=seq_len, batch_size=batch_size)
    if not batches:
        raise DataError("no calibration example produced any token")
    return batches


def check_enough_tokens(
    shapes: list[LayerShape],
    batches: Sequence[CalibrationBatch],
    plan: Plan,
    stacklevel: int = 3,
    requested: int | None = None,
) -> None:
    """Too few calibration tokens is a ``DataError``; few enough that the exact corrections
    overfit (under ``THIN_TOKENS_PER_UNIT`` per unit of the widest layer), a warning. Both name
    the ``--samples`` that reaches it at these examples' mean length, or, when the data gave fewer
    examples than the ``requested`` count (it is exhausted), ask for more data. Methods that read
    weights only need no calibration tokens."""
    if not plan.method.uses_activations:
        return
    tokens = count_tokens(batches)
    examples = sum(int(b.inputs["input_ids"].shape[0]) for b in batches)
    # routed experts (top-k of E, width I each): each sees about tokens * k / E, so it needs I * E / k
    widest = max(max(s.n_heads * s.head_dim, s.ffn_width // s.ffn_active[0]) for s in shapes)
    per_example = tokens / max(examples, 1)

    def reach(target: int) -> str:
        exhausted = requested is not None and examples < requested
        if exhausted or per_example <= 0:
            return f"the data gave only {examples} examples: give a larger file or longer examples"
        samples = option("samples", math.ceil(target / per_example))
        return f"give {samples} ({per_example:.0f} tokens per example)"

    if tokens < widest:
        pack = f", or {option('pack', True)} to join short lines into full windows"
        # packing joins lines across their boundaries: natural for a decoder's running text, not
        # for an encoder, which sees each example on its own
        raise DataError(
            f"calibration data has only {tokens} tokens; a meaningful factorization needs at least "
            f"{widest} (the widest layer), and {THIN_TOKENS_PER_UNIT * widest} for corrections that do not "
            f"overfit — {reach(THIN_TOKENS_PER_UNIT * widest)}{pack if plan.adapter.is_decoder else ''}"
        )
    thin = tokens < THIN_TOKENS_PER_UNIT * widest
    if thin and plan.method.warns_thin_data(plan.options):
        warnings.warn(
            CalibrationWarning(
                f"only {tokens} calibration tokens for {widest}-wide layers: the corrections may "
                f"overfit them; for ≥ {THIN_TOKENS_PER_UNIT * widest} tokens "
                f"{reach(THIN_TOKENS_PER_UNIT * widest)}, or damp them with --correction-ridge 0.1"
            ),
            stacklevel=stacklevel,
        )


# ------------------------------------------------------------------------------ 3. capture


class _Captured(Exception):
    pass


def capture_inputs(
    model: nn.Module, adapter: ModelAdapter, batches: Sequence[CalibrationBatch], device: torch.device
) -> Calibration:
    """Run the model up to its first transformer layer for every batch and keep that layer's
    inputs (hidden states, other arguments) on ``device``."""
    first = adapter.layers(model.base_model)[0]
    store: dict = {}

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        store["hidden"], store["args"], store["kwargs"] = hidden, tuple(args[1:]), kwargs
        raise _Captured

    calib = Calibration(hidden=[], args=[], kwargs=[], masks=[])
    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    model_device = next(model.parameters()).device
    try:
        for batch in progress_bar(batches, desc="capture inputs"):
            inputs = adapter.forward_inputs(model, to_device(batch.inputs, model_device))
            if adapter.is_decoder:
                inputs["use_cache"] = False
            try:
                model(**inputs)
            except _Captured:
                pass
            else:
                raise ModelError("the model never called its first transformer layer")
            calib.hidden.append(store["hidden"].detach().to(device))
            calib.args.append(to_device(store["args"], device))
            calib.kwargs.append(to_device(store["kwargs"], device))
            calib.masks.append(batch.token_mask.to(device))
    finally:
        handle.remove()
    calib.tokens = count_tokens(batches)
    calib.examples = sum(int(b.token_mask.shape[0]) for b in batches)
    return calib


# ------------------------------------------------------------------------------ 4. analyse


def measure_sensitivity(job: Job, analysis: Analysis) -> OutputSensitivity | None:
    """The blocks' output sensitivity (and with the fisher metric their gradient covariances),
    measured by one backward pass on first use and kept in ``analysis``; None if the method's
    options use no loss gradient."""
    options = job.options
    wanted = job.method.wants_output_sensitivity(options)
    if wanted and analysis.sensitivity is None:
        covariance = options.error_metric == "fisher"
        analysis.sensitivity = output_sensitivity(
            job.model, job.adapter, job.batches, options.prune, covariance=covariance
        )
    return analysis.sensitivity if wanted and analysis.sensitivity.usable else None


def analyse(job: Job, calib: Calibration) -> Analysis:
    """Analysis on the original model: the method's whole-model plan, then (when the method
    allocates from error curves, or the statistics are kept) every layer's error curves and,
    with ``job.keep_stats``, statistics and selections (None if any layer's are missing)."""
    analysis = Analysis()
    analysis.plan = job.method.whole_model_plan(job.model, job.adapter, job.batches, job.options)
    if job.method.needs_error_curves or job.keep_stats:
        analysis.curves, analysis.stats = analyse_layers(
            job, calib, lambda: measure_sensitivity(job, analysis)
        )
    return analysis


def analyse_layers(
    job: Job, calib: Calibration, measure: Callable[[], OutputSensitivity | None]
) -> tuple[list[BlockCurve], list[LayerStats] | None]:
    """Walk the layers (resuming from the checkpoint), feeding each one's outputs to the next.

    ``measure`` returns the blocks' output sensitivities (gradient weighting); it runs only if some
    layer is left to analyse (a resumed run's saved curves are already weighted)."""
    curves: list[BlockCurve] = []
    kept: list[LayerStats] | None = [] if job.keep_stats else None
    inputs, start = calib.hidden, 0
    state = resume_pass(job, "analyse", inputs)
    if state is not None:
        start, inputs = state.done + 1, state.inputs
        curves = [BlockCurve(**c) for c in state.data["curves"]]
        kept = None
    layers = job.layers()
    sensitivity = measure() if start < len(layers) else None

    def progress() -> tuple[dict, list[torch.Tensor]]:
        return {"curves": [asdict(c) for c in curves]}, inputs

    for i in progress_bar(range(start, len(layers)), desc="analyse layers"):
        with visiting(layers[i], job.visit):
            stats, inputs = analyse_layer(job, i, calib, inputs, curves, sensitivity)
        if kept is not None:
            kept.append(stats)
        record_progress(job, "analyse", i, progress)
    return curves, kept


def analyse_layer(
    job: Job,
    i: int,
    calib: Calibration,
    inputs: list[torch.Tensor],
    curves: list[BlockCurve],
    sensitivity: OutputSensitivity | None = None,
) -> tuple[LayerStats, list[torch.Tensor]]:
    """Error curves of layer ``i``'s blocks (appended to ``curves``); returns the layer's
    statistics (with their selections) and outputs."""
    adapter, options, method = job.adapter, job.options, job.method
    layer, shape = job.layers()[i], job.shapes[i]
    stats, outputs = collect(
        adapter, layer, calib, inputs, options, inputs[0].device, method.uses_activations
    )
    if not method.needs_error_curves:
        return stats, outputs
    weight = block_weights(job, stats, None if sensitivity is None else sensitivity.at(i))
    stats.token_energy.clear()
    kind, seq_len = job.cost_kind, options.seq_len
    if stats.heads is not None:
        factor = metric_factor(sensitivity, "heads", i)
        stats.head_selection = method.select_heads(adapter, layer, stats, options, factor=factor)
        errors = stats.head_selection.errors
        curves.append(curve_from_errors(i, "heads", shape, errors, weight["heads"], kind, seq_len))
    if stats.neurons is not None:
        factor = metric_factor(sensitivity, "neurons", i)
        stats.neuron_selection = pin_selection(
            method.select_neurons(adapter, layer, stats, options, factor=factor), stats.neurons
        )
        errors, order = stats.neuron_selection.errors, stats.neuron_selection.order
        curves.append(
            curve_from_errors(
                i, "neurons", shape, errors, weight["neurons"], kind, seq_len, options.round_to, order
            )
        )
    return stats, outputs


def block_weights(job: Job, stats: LayerStats, sensitivity: dict[str, float] | None) -> dict[str, float]:
    """What each block's error curve is multiplied by in the allocation (see ``layer_weighting``)."""
    rule = job.options.layer_weighting
    if rule == "none" or not job.method.weighs_blocks:
        return {"heads": 1.0, "neurons": 1.0}
    inverse_energy = 1.0 / max(typical_energy(stats.token_energy, rule), 1e-30)
    if sensitivity is None or not rule.startswith("gradient"):
        return {"heads": inverse_energy, "neurons": inverse_energy}
    if rule == "gradient-only":
        return sensitivity
    return {block: math.sqrt(value * inverse_energy) for block, value in sensitivity.items()}


def typical_energy(token_energy: list[torch.Tensor], rule: str) -> float:
    """The median (``residual``) or mean (``residual-mean``) of the tokens' ‖h‖².

    LLMs carry a few "massive activation" tokens (e.g. the first one) whose ‖h‖² exceeds the
    others' by 10⁴×, from some layer on; the mean jumps there and the allocation then guts the
    following layers (measured in benchmarks/ablation.py, variant ``mean-layer-weighting``).
    """
    energy = torch.cat(token_energy)
    return float(energy.mean() if rule == "residual-mean" else energy.median())


def metric_factor(sensitivity: OutputSensitivity | None, block: str, layer: int) -> torch.Tensor | None:
    """The fisher error metric's factor for one block (None: euclidean)."""
    return None if sensitivity is None else sensitivity.metric_factor(block, layer)


# ----------------------------------------------------------------------------- 5. allocate


def allocate_widths(job: Job, analysis: Analysis) -> list:
    """Per-layer ``(heads, neurons)`` kept under the budget, by the method's allocation (its
    entries are handed back to the method's selections as ``plan``)."""
    plan = job.plan
    return job.method.allocate(
        job.shapes, analysis.curves, analysis.plan, job.cost_kind, plan.budget, job.options, plan.device
    )


# -------------------------------------------------------------------------------- 6. prune


def prune(job: Job, calib: Calibration, counts: list, analysis: Analysis) -> Pruned:
    """Pruning pass: re-collect statistics layer by layer (or take the analysis pass's, one per
    layer), select (under the fisher metric when the options ask for it), correct and slice. A
    correction toward the original model carries the original model's hidden states
    (``originals``) beside the pruned model's."""
    options = job.options
    # selections not kept from the analysis pass are made again, under the same metric; measured
    # on the unpruned model, before a resumed run restores its pruned layers
    reselect = analysis.stats is None and options.error_metric == "fisher"
    sensitivity = measure_sensitivity(job, analysis) if reselect else None
    known_stats = analysis.stats
    inputs, start = calib.hidden, 0
    originals = calib.hidden if options.correction_target != "activations" else None
    layers = job.layers()
    reports: list[LayerReport] = []
    ops: list[dict] = []
    state = resume_pass(job, "prune", inputs)
    if state is not None:
        start, inputs, ops = state.done + 1, state.inputs, state.data["ops"]
        if originals is not None:  # saved after the pruned model's hidden states
            inputs, originals = inputs[: len(calib.hidden)], inputs[len(calib.hidden) :]
        reports = [LayerReport(**r) for r in state.data["reports"]]
        restore_pruned_layers(job, ops, state.done)

    def progress() -> tuple[dict, list[torch.Tensor]]:
        return {"ops": ops, "reports": [asdict(r) for r in reports]}, inputs + (originals or [])

    for i in progress_bar(range(start, len(layers)), desc="prune layers"):
        with visiting(layers[i], job.visit):
            known = known_stats[i] if known_stats else None
            result = prune_layer(job, i, calib, inputs, counts[i], known, originals, sensitivity)
            save_pruned_layer(job, i, layers[i])
        originals = result.originals
        reports.append(result.report)
        ops.extend(result.ops)
        inputs = result.outputs if options.activations == "sequential" else result.reference
        record_progress(job, "prune", i, progress)
    return Pruned(reports, ops)


def prune_layer(
    job: Job,
    i: int,
    calib: Calibration,
    inputs: list[torch.Tensor],
    count: tuple[int, int],
    known: LayerStats | None = None,
    originals: list[torch.Tensor] | None = None,
    sensitivity: OutputSensitivity | None = None,
) -> LayerResult:
    """Select, correct and slice layer ``i`` to ``count`` = (heads, neurons) kept (or the
    method's per-layer plan, which unpacks so).

    With ``known`` statistics (and selections) of this layer's inputs nothing is run. Only
    sequential mode runs the pruned layer (its outputs feed the next layer) and so measures the
    layer's output error; otherwise both are None.
    """
    adapter, options, method, base = job.adapter, job.options, job.method, job.base
    layer = adapter.layers(base)[i]
    ops: list[dict] = []
    attn, ffn = adapter.attention(layer), adapter.ffn(layer)
    want_heads, want_neurons = count
    if known is not None:  # (then ``inputs`` may be None: the analysis pass ran this layer)
        stats, reference = known, None
    elif originals is not None:
        device = inputs[0].device
        stats, reference, originals = collect_with_targets(
            adapter, layer, calib, inputs, originals, options, device
        )
    else:
        device = inputs[0].device
        stats, reference = collect(adapter, layer, calib, inputs, options, device, method.uses_activations)
    kept_heads, attn_err = list(range(attn.n_heads)), 0.0
    if stats.heads is not None and want_heads < attn.n_heads:
        selection = stats.head_selection or method.select_heads(
            adapter, layer, stats, options, count, metric_factor(sensitivity, "heads", i)
        )
        per_group = want_heads // attn.groups
        kept_heads, dropped_heads = selection.keep(per_group, attn.n_heads)
        attn_err = _relative(selection.errors, per_group)
        w, b = method.correct(
            layer,
            attn.o,
            stats.heads,
            head_columns(kept_heads, attn.head_dim),
            head_columns(dropped_heads, attn.head_dim),
            options,
            block=attn.head_dim,
            targets=stats.head_targets,
        )
        ops += prune_heads(adapter, base, i, kept_heads, w, b)
    kept_neurons, ffn_err = torch.arange(ffn.width), 0.0
    if stats.neurons is not None and want_neurons < ffn.width:
        factor = metric_factor(sensitivity, "neurons", i)
        ident = stats.neuron_selection or pin_selection(
            method.select_neurons(adapter, layer, stats, options, count, factor), stats.neurons
        )
        kept_neurons, dropped = ident.keep(want_neurons)
        ffn_err = _relative(ident.errors, want_neurons)
        w, b = method.correct(
            layer, ffn.output, stats.neurons, kept_neurons, dropped, options, targets=stats.neuron_targets
        )
        ops += prune_neurons(adapter, base, i, kept_neurons, w, b)
    del stats
    outputs, out_err = None, None
    if not method.uses_activations:
        outputs = inputs  # unused downstream
    elif options.activations == "sequential":  # the next layer's inputs; original mode needs none
        outputs = run_layer(layer, calib, inputs, None, {})
        out_err = output_error(outputs, reference, calib.masks)
    report = LayerReport(
        layer=i,
        heads_total=attn.n_heads,
        heads_kept=[int(h) for h in kept_heads],
        neurons_total=ffn.width,
        neurons_kept=[int(n) for n in kept_neurons],
        attention_error=attn_err,
        ffn_error=ffn_err,
        output_error=out_err,
    )
    return LayerResult(report, ops, outputs, reference, originals)


def _relative(errors: torch.Tensor, index: int) -> float:
    total = float(errors[0])
    return float(errors[index]) / total if total > 0 else 0.0


# ------------------------------------------------------------------------- latency budgets


def latency_cost(job: Job, offload: bool):
    """The latency budget's cost model: lookup tables of the model's layers measured on the
    device (or read from the cache; ``statprune.latency``). ``OptionsError`` with offloading."""
    from statprune.errors import OptionsError
    from statprune.latency import LatencyCost, latency_table

    if offload:
        raise OptionsError("--keep-latency needs the model on its device; drop --offload")
    options = job.options
    table = latency_table(
        job.model,
        job.adapter,
        job.shapes,
        batch=options.bench_batch,
        seq_len=options.latency_seq_len,
        backend=options.backend,
    )
    return LatencyCost(table)


def latency_report(job: Job, dense: nn.Module | None) -> dict:
    """Predicted latency of the pruned model (from the job's cost model), then measured:
    interleaved with ``dense`` when it is the untouched input on the same device."""
    from statprune.latency import measure_pruned, predicted_report

    after = model_shapes(job.adapter, job.model.base_model)
    counts = [(s.n_heads, s.ffn_width) for s in job.shapes]
    pruned_counts = [(s.n_heads, s.ffn_width) for s in after]
    prune_heads, prune_neurons = "heads" in job.options.prune, "neurons" in job.options.prune
    floor = [(0 if prune_heads else h, 0 if prune_neurons else n) for h, n in counts]
    # the pruned layers' shapes differ from the dense ones: price their widths with the dense tables
    report = predicted_report(job.cost.table, job.shapes, pruned_counts, floor)
    device = next(job.model.parameters()).device
    same = dense is not None and next(dense.parameters()).device == device
    measure_pruned(report, job.model, dense if same else None)
    return report.to_dict()


# ------------------------------------------------------------------------------- 7. report


def build_report(
    job: Job, pruned: Pruned, calib: Calibration, analysis: Analysis, start: float
) -> CompressionReport:
    """Sizes before and after (at ``seq_len``), per-layer kept units and errors, the resolved
    options (with the method's resolved extras), calibration size and versions."""
    import transformers

    from statprune import __version__

    options, shapes, model = job.options, job.shapes, job.model
    after = model_shapes(job.adapter, model.base_model)
    after_counts = [(s.n_heads, s.ffn_width) for s in after]
    dense = [(s.n_heads, s.ffn_width) for s in shapes]
    cost = {
        k: (
            total_cost(shapes, dense, k, options.seq_len),
            total_cost(after, after_counts, k, options.seq_len),
        )
        for k in ("flops", "params")
    }
    report = CompressionReport(
        budget_kind=job.plan.budget_kind,
        budget=job.plan.budget,
        flops_kept=cost["flops"][1] / cost["flops"][0],
        params_kept=cost["params"][1] / cost["params"][0],
        flops_before=cost["flops"][0],
        flops_after=cost["flops"][1],
        params_before=cost["params"][0],
        params_after=cost["params"][1],
        seq_len=options.seq_len,
        calibration_examples=calib.examples,
        calibration_tokens=calib.tokens,
        options={
            k: list(v) if isinstance(v, tuple) else v
            for k, v in asdict(options).items()
            if k not in ("keep_flops", "keep_params", "keep_latency")
            and (job.plan.budget_kind == "latency" or k not in LATENCY_OPTIONS)
        }
        | {"allocation": options.allocation_rule},
        seconds=round(time.perf_counter() - start, 3),
        layers=pruned.layers,
        versions={
            "statprune": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        architecture=type(model).__name__,
    )
    report.options.update(job.method.report_options(analysis.plan))
    return report
