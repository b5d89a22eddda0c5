"""The STAT driver: walk the layers in order, stream statistics, allocate, prune and correct.

1. Capture the inputs of the first layer for every calibration batch.
2. Analysis pass: run each layer over the batches with hooks that stream the Gram matrices of
   the head outputs (input of the attention output projection) and of the FFN neurons (input of
   the down projection); factorize them into error curves; feed the outputs to the next layer.
3. Allocate per-layer head and neuron counts under the global budget.
4. Pruning pass: select the units, fold the least-squares correction into the next projection,
   and slice the layer. In ``sequential`` mode each layer is run again on the outputs of the
   already-pruned layers; in ``original`` mode the analysis statistics are reused (no forward).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from statprune.adapters import ModelAdapter, adapter_for
from statprune.allocation import BlockCurve, allocate, curve_from_errors
from statprune.argtypes import resolve_device
from statprune.calibration import (
    CalibrationBatch,
    CalibrationWarning,
    count_tokens,
    pack_examples,
    sample_examples,
    tokenize_examples,
)
from statprune.checkpoint import Checkpoint, fingerprint
from statprune.errors import BudgetError, DataError, ModelError
from statprune.fisher_grads import (
    UNLABELLED_LOSSES,
    LayerPlan,
    MaskGradients,
    OutputSensitivity,
    collect_mask_gradients,
    has_loss_without_labels,
    output_sensitivity,
    plan_masks,
)
from statprune.flops import LayerShape, model_shapes, total_cost
from statprune.guards import check_calibration, check_seq_len, non_finite, record_fallback
from statprune.linalg import (
    CrossAccumulator,
    GramAccumulator,
    fit_to_targets,
    fold_correction,
    interpolation_matrix,
    select_columns,
    select_heads,
)
from statprune.linalg.baselines import BASELINES, channel_scores, head_ranking, neuron_ranking
from statprune.linalg.fisher import tune_mask_scales
from statprune.linalg.heads import HeadSelection, head_columns
from statprune.linalg.interpolative import InterpolativeDecomposition
from statprune.modeling_statprune import apply_ops
from statprune.progress import progress_bar
from statprune.report import CompressionReport, LayerReport
from statprune.surgery import prune_heads, prune_neurons

CORRECTION_TARGETS = ("activations", "original")
# below this many calibration tokens per unit of the widest layer, the undamped corrections overfit
# (MiniLM-MR with 64 sentences, 1.1 tokens per FFN neuron: validation KL at 80 % FLOPs 0.0062
# undamped, 0.0022 with --correction-ridge 0.1; at 4.5-10 tokens per unit damping gained nothing)
THIN_TOKENS_PER_UNIT = 4
LAYER_WEIGHTINGS = ("auto", "residual", "residual-mean", "gradient", "gradient-only", "none")
ERROR_METRICS = ("auto", "euclidean", "fisher")


@dataclass(frozen=True)
class CompressionOptions:
    """How to compress. Exactly one of ``keep_flops`` / ``keep_params`` is the budget."""

    keep_flops: float | None = None
    keep_params: float | None = None
    prune: tuple[str, ...] = ("heads", "neurons")
    seq_len: int = 128
    # "sequential" (pruned upstream), "original", or "auto": sequential for decoders (causal LMs),
    # original for encoders — the better of the two on each in benchmarks/ablation.py
    activations: str = "auto"
    bias_compensation: bool = True  # intercept: the next bias absorbs the mean of what is removed
    correction: bool = True  # fold the least-squares correction (False: plain removal, for ablations)
    # what the correction reproduces (sequential activations): "activations", the block's own
    # removed activations (the ID), or "original", each block's output in the original model
    # (repairing upstream error in-sample; it overfits a few hundred examples: benchmarks/ablation.py)
    correction_target: str = "activations"
    # damping of the correction's least squares: λ times the mean diagonal of the kept units' Gram
    # is added before solving, shrinking the correction toward plain removal where the calibration
    # data cannot pin it down (few tokens per unit); 0: the exact least squares
    correction_ridge: float = 0.0
    method: str = "stat"  # "stat", or a baseline: "magnitude", "wanda-sp", "flap", "fisher"
    allocation: str = "auto"  # "greedy" (global, error per cost), "uniform", or "auto" (per method)
    # how each block's errors are weighted in the allocation: "residual" (divided by the median
    # token's residual-stream ‖h‖², robust to the few massive-activation tokens of LLMs),
    # "residual-mean", "gradient-only" (times the loss-gradient energy at the block's output, from
    # one backward pass with the model's own predictions as labels; needs a task head: the
    # first-order loss increase), "gradient" (the geometric mean of the two), "none", or "auto":
    # gradient where the model has a head to differentiate (classifier, causal LM) and is not
    # offloaded, else residual — the better on training-portion data (benchmarks/validate.py)
    layer_weighting: str = "auto"
    # how a block's output error is measured when choosing its units (and drawing its error curve):
    # "euclidean", the squared error it adds to the residual stream, or "fisher", that error
    # weighed by the covariance of the loss gradients at the block's output (normalized to trace
    # hidden: the directions the loss reacts to count more; measured in the gradient weighting's
    # backward pass); "auto": fisher with the gradient layer weightings, else euclidean
    error_metric: str = "auto"
    round_to: int = 1  # kept FFN widths are multiples of this
    # fisher on a classifier whose calibration data has no labels: cross entropy against its argmax
    # ("predicted"), or the "expected" Fisher under the model's predictive distribution
    fisher_labels: str = "predicted"
    device: str = "auto"
    gram_dtype: str = "float32"  # precision of each batch's Gram product (sums are float64)

    def budget(self) -> tuple[str, float]:
        if (self.keep_flops is None) == (self.keep_params is None):
            raise BudgetError("give exactly one budget: --keep-flops F or --keep-params F")
        kind, value = (
            ("flops", self.keep_flops) if self.keep_flops is not None else ("params", self.keep_params)
        )
        if not 0.0 < float(value) <= 1.0:
            raise BudgetError(f"budget {value} is outside (0, 1]: give the fraction to keep, e.g. 0.6")
        return kind, float(value)

    @property
    def allocation_rule(self) -> str:
        """``auto``: greedy for STAT and FLAP (adaptive), uniform for magnitude and Wanda-sp;
        fisher always runs its own mask search (Kwon et al. 2022, Algorithm 1)."""
        if self.method == "fisher":
            return "mask-search"
        if self.allocation != "auto":
            return self.allocation
        return "uniform" if self.method in ("magnitude", "wanda-sp") else "greedy"

    def validate(self) -> None:
        self.budget()
        unknown = set(self.prune) - {"heads", "neurons"}
        if unknown or not self.prune:
            raise BudgetError(f"--prune takes heads, neurons or both, not {','.join(self.prune)!r}")
        if self.method not in ("stat", *BASELINES):
            raise BudgetError(f"unknown method {self.method!r}; choose stat, {', '.join(BASELINES)}")
        if self.method == "fisher" and self.allocation != "auto":
            raise BudgetError("fisher sets the per-layer widths by its own mask search; drop --allocation")
        if self.activations not in ("auto", "sequential", "original"):
            raise ValueError(f"activations must be auto, sequential or original, not {self.activations!r}")
        if self.correction_target not in CORRECTION_TARGETS:
            choices = ", ".join(CORRECTION_TARGETS)
            raise BudgetError(f"unknown correction target {self.correction_target!r}; choose {choices}")
        if self.correction_target != "activations" and self.activations == "original":
            raise BudgetError(
                f"--correction-target {self.correction_target} needs --activations sequential (with "
                "original activations the pruned model's inputs are the original ones)"
            )
        if self.layer_weighting not in LAYER_WEIGHTINGS:
            choices = ", ".join(LAYER_WEIGHTINGS)
            raise ValueError(f"layer_weighting must be one of {choices}, not {self.layer_weighting!r}")
        if self.error_metric not in ERROR_METRICS:
            choices = ", ".join(ERROR_METRICS)
            raise ValueError(f"error_metric must be one of {choices}, not {self.error_metric!r}")
        if self.error_metric == "fisher" and self.method != "stat":
            raise BudgetError(f"--error-metric fisher is STAT's; {self.method} ranks units by its own scores")
        if self.fisher_labels not in UNLABELLED_LOSSES:
            raise ValueError(f"fisher_labels must be one of {UNLABELLED_LOSSES}, not {self.fisher_labels!r}")
        if not 0.0 <= self.correction_ridge < float("inf"):
            raise BudgetError(f"--correction-ridge must be a finite number ≥ 0, not {self.correction_ridge}")
        if self.seq_len < 1 or self.round_to < 1:
            raise ValueError("seq_len and round_to must be positive")


@dataclass
class _LayerStats:
    """Streamed statistics of one layer over the calibration batches."""

    heads: GramAccumulator | None
    neurons: GramAccumulator | None
    token_energy: list[torch.Tensor] = field(default_factory=list)  # ‖h‖² of each real input token
    # selections made from these statistics (kept when the pruning pass reuses them)
    head_selection: HeadSelection | None = None
    neuron_selection: InterpolativeDecomposition | None = None
    # how far the corrected output projections should move their outputs (``correction_target``
    # other than "activations"): ZᵀΔ of the activations and the shifts Δ toward the targets
    head_targets: CrossAccumulator | None = None
    neuron_targets: CrossAccumulator | None = None

    def add_token_energy(self, rows: torch.Tensor) -> None:
        """Record ‖h‖² of each real input token (rows of the layer input)."""
        real = rows.double()
        self.token_energy.append((real * real).sum(dim=1).cpu())


@dataclass
class Analysis:
    """What the analysis pass learns, independent of the budget.

    ``curves`` drive the allocation; ``stats`` (one per layer, with ``activations="original"``)
    let the pruning pass skip its forward passes, since its inputs would be the same; ``grads``
    are fisher's mask gradients; ``sensitivity`` the blocks' output gradients (measured when first
    needed: by the analysis pass, or by a pruning pass that selects under the fisher metric).
    """

    curves: list[BlockCurve] | None = None
    stats: list[_LayerStats] | None = None
    grads: MaskGradients | None = None
    sensitivity: OutputSensitivity | None = None


class AnalysisCache:
    """Reuse one analysis across budgets: pass the same cache to ``compress`` for every budget.

    Holds the most recent analysis, keyed by the model object, its config, the calibration
    batches and every option except the budget; the model must not change in between.
    """

    def __init__(self) -> None:
        self._key: str | None = None
        self._analysis: Analysis | None = None

    def get(self, key: str) -> Analysis | None:
        return self._analysis if key == self._key else None

    def put(self, key: str, analysis: Analysis) -> None:
        self._key, self._analysis = key, analysis

    def clear(self) -> None:
        self._key = self._analysis = None


@dataclass
class _Calibration:
    """Layer inputs for every batch: hidden states plus the other call arguments."""

    hidden: list[torch.Tensor]
    args: list[tuple]
    kwargs: list[dict]
    masks: list[torch.Tensor]
    examples: int = 0
    tokens: int = 0


class _Captured(Exception):
    pass


def check_finite_weights(model: nn.Module) -> None:
    for name, param in model.named_parameters():
        if param.is_floating_point() and not torch.isfinite(param).all():
            raise ModelError(f"model weight {name} contains NaN or Inf; fix or re-export the checkpoint")


def _to(obj, device: torch.device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _layer_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _capture_inputs(
    model: nn.Module, adapter: ModelAdapter, batches: Sequence[CalibrationBatch], device: torch.device
) -> _Calibration:
    first = adapter.layers(model.base_model)[0]
    store: dict = {}

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        store["hidden"], store["args"], store["kwargs"] = hidden, tuple(args[1:]), kwargs
        raise _Captured

    calib = _Calibration(hidden=[], args=[], kwargs=[], masks=[])
    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    model_device = next(model.parameters()).device
    try:
        for batch in progress_bar(batches, desc="capture inputs"):
            inputs = _to(batch.inputs, model_device)
            if adapter.is_decoder:
                inputs["use_cache"] = False
            try:
                model(**inputs)
            except _Captured:
                pass
            else:
                raise ModelError("the model never called its first transformer layer")
            calib.hidden.append(store["hidden"].detach().to(device))
            calib.args.append(_to(store["args"], device))
            calib.kwargs.append(_to(store["kwargs"], device))
            calib.masks.append(batch.token_mask.to(device))
    finally:
        handle.remove()
    calib.tokens = count_tokens(batches)
    calib.examples = sum(int(b.token_mask.shape[0]) for b in batches)
    return calib


def _run_layer(
    layer: nn.Module,
    calib: _Calibration,
    inputs: list[torch.Tensor],
    stats: _LayerStats | None,
    hooks: dict[str, GramAccumulator],
) -> list[torch.Tensor]:
    """Run one layer over every batch; stream the hooked activations into the accumulators."""
    current: dict[str, torch.Tensor] = {}
    handles = []
    for path, acc in hooks.items():

        def pre_hook(module, args, acc=acc):
            x = args[0]
            acc.add_batch(x.reshape(-1, x.shape[-1])[current["mask"]])

        handles.append(layer.get_submodule(path).register_forward_pre_hook(pre_hook))
    outputs = []
    with _hooked(handles):
        for hidden, args, kwargs, mask in zip(inputs, calib.args, calib.kwargs, calib.masks, strict=True):
            current["mask"] = mask.reshape(-1)
            if stats is not None:
                stats.add_token_energy(hidden.reshape(-1, hidden.shape[-1])[current["mask"]])
            outputs.append(_finite(_layer_output(layer(hidden, *args, **kwargs))))
    return outputs


@contextlib.contextmanager
def _hooked(handles: list):
    """Remove ``handles`` afterwards; non-finite activations met by an accumulator are a ModelError."""
    try:
        yield
    except FloatingPointError as exc:
        raise non_finite(str(exc).replace(" contain NaN or Inf", "")) from None
    finally:
        for h in handles:
            h.remove()


def _finite(out: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(out).all():
        raise non_finite("activations", out.dtype)
    return out


def _collect(
    adapter: ModelAdapter,
    layer: nn.Module,
    calib: _Calibration,
    inputs: list[torch.Tensor],
    options: CompressionOptions,
    device: torch.device,
) -> tuple[_LayerStats, list[torch.Tensor]]:
    attn, ffn = adapter.attention(layer), adapter.ffn(layer)
    stats = _new_stats(adapter, layer, options, device)
    if not _uses_activations(options):  # nothing is measured: the inputs pass through unused
        return stats, inputs
    hooks = {}
    if stats.heads is not None:
        hooks[attn.o] = stats.heads
    if stats.neurons is not None:
        hooks[ffn.output] = stats.neurons
    outputs = _run_layer(layer, calib, inputs, stats, hooks)
    return stats, outputs


def _new_stats(adapter, layer: nn.Module, options: CompressionOptions, device: torch.device) -> _LayerStats:
    attn, ffn = adapter.attention(layer), adapter.ffn(layer)
    dtype = getattr(torch, options.gram_dtype)
    return _LayerStats(
        heads=GramAccumulator(attn.n_heads * attn.head_dim, device, dtype)
        if "heads" in options.prune and attn.n_heads
        else None,
        neurons=GramAccumulator(ffn.width, device, dtype)
        if "neurons" in options.prune and ffn.width
        else None,
    )


def _collect_with_targets(
    adapter,
    layer: nn.Module,
    calib: _Calibration,
    inputs: list[torch.Tensor],
    originals: list[torch.Tensor],
    options: CompressionOptions,
    device: torch.device,
) -> tuple[_LayerStats, list[torch.Tensor], list[torch.Tensor]]:
    """Statistics on the pruned model's inputs plus the correction targets.

    Every batch runs through the (still unpruned) layer twice: on the original model's inputs,
    recording each block's output there, and on the pruned model's inputs, streaming the Gram
    matrices and ``ZᵀΔ`` for the shifts Δ from each block's output to its target. Returns the
    statistics, the outputs on the pruned inputs and those on the original inputs (the next
    layer's original inputs).
    """
    attn, ffn = adapter.attention(layer), adapter.ffn(layer)
    stats = _new_stats(adapter, layer, options, device)
    blocks = {"heads": (attn.o, stats.heads), "neurons": (ffn.output, stats.neurons)}
    blocks = {name: block for name, block in blocks.items() if block[1] is not None}
    dtype = getattr(torch, options.gram_dtype)
    shifts = {
        name: CrossAccumulator(acc.width, layer.get_submodule(path).weight.shape[0], device, dtype)
        for name, (path, acc) in blocks.items()
    }
    stats.head_targets, stats.neuron_targets = shifts.get("heads"), shifts.get("neurons")
    current: dict = {}
    seen: dict[str, torch.Tensor] = {}  # this batch's block inputs and outputs, per pass

    def rows(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, x.shape[-1])[current["mask"]]

    def block_hooks(name: str, acc: GramAccumulator):
        def before(module, args):
            if current["pass"] == "pruned":
                seen[f"in:{name}"] = rows(args[0])
                acc.add_batch(seen[f"in:{name}"])

        def after(module, args, output):
            seen[f"{current['pass']}:{name}"] = rows(output)

        return before, after

    handles = []
    for name, (path, acc) in blocks.items():
        before, after = block_hooks(name, acc)
        module = layer.get_submodule(path)
        handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    outputs, original_outputs = [], []
    with _hooked(handles):
        batches = zip(inputs, originals, calib.args, calib.kwargs, calib.masks, strict=True)
        for hidden, original, args, kwargs, mask in batches:
            current["mask"] = mask.reshape(-1)
            current["pass"] = "original"
            original_outputs.append(_finite(_layer_output(layer(original, *args, **kwargs))))
            current["pass"] = "pruned"
            stats.add_token_energy(rows(hidden))
            outputs.append(_finite(_layer_output(layer(hidden, *args, **kwargs))))
            for name, acc in shifts.items():  # how far the block's output must move
                acc.add_batch(seen[f"in:{name}"], seen[f"original:{name}"] - seen[f"pruned:{name}"])
            seen.clear()
    return stats, outputs, original_outputs


def _uses_activations(options: CompressionOptions) -> bool:
    """Whether the method reads calibration activations (magnitude scores weights alone)."""
    return options.method != "magnitude"


def _metric_factor(sensitivity: OutputSensitivity | None, block: str, layer: int) -> torch.Tensor | None:
    return None if sensitivity is None else sensitivity.metric_factor(block, layer)


def _head_selection(
    adapter,
    layer,
    stats: _LayerStats,
    options: CompressionOptions,
    plan: LayerPlan | None = None,
    factor: torch.Tensor | None = None,
) -> HeadSelection:
    """The order heads are kept in; STAT measures errors after ``factor @ W_O`` (the fisher
    metric's factor, see ``OutputSensitivity.metric_factor``) when one is given."""
    if options.method == "fisher":  # decided up front from the mask gradients
        return plan.head_selection
    attn = adapter.attention(layer)
    finished = stats.heads.finish() if _uses_activations(options) else None
    w_o = layer.get_submodule(attn.o).weight.detach()
    if options.method == "stat":
        gram = finished.second_moment(options.bias_compensation)
        if factor is not None:
            w_o = factor.to(w_o.device) @ w_o.double()
        return select_heads(gram, w_o, attn.n_heads, attn.head_dim, attn.groups)
    channel = channel_scores(options.method, finished, w_o)
    if options.method == "magnitude":  # weight norms of each head's query rows and output columns
        q_rows = layer.get_submodule(attn.q).weight.detach().double().cpu()
        channel = channel * torch.linalg.vector_norm(q_rows, dim=1)
    return head_ranking(
        channel, attn.n_heads, attn.head_dim, attn.groups, standardize=options.method == "flap"
    )


def _neuron_selection(
    adapter,
    layer,
    stats: _LayerStats,
    options: CompressionOptions,
    plan: LayerPlan | None = None,
    factor: torch.Tensor | None = None,
) -> InterpolativeDecomposition:
    """The order FFN neurons are kept in (STAT: pivoting scaled by ‖factor @ w_j‖, see
    :func:`_head_selection`)."""
    if options.method == "fisher":
        return plan.neuron_selection
    ffn = adapter.ffn(layer)
    finished = stats.neurons.finish() if _uses_activations(options) else None
    w = layer.get_submodule(ffn.output).weight.detach().double()
    if options.method == "stat":
        gram = finished.second_moment(options.bias_compensation)
        seen = w if factor is None else factor.to(w.device) @ w
        return select_columns(gram, scale=torch.linalg.vector_norm(seen, dim=0))
    w_in = torch.cat([layer.get_submodule(p).weight.detach() for p in ffn.inputs], dim=1)
    scores = channel_scores(options.method, finished, w, w_in)
    return neuron_ranking(scores, standardize=options.method == "flap")


def _correct(
    layer: nn.Module,
    out_path: str,
    stats,
    kept: torch.Tensor,
    dropped: torch.Tensor,
    options: CompressionOptions,
    block: int = 1,
    targets: CrossAccumulator | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Least-squares interpolation of the dropped columns, folded into the next projection; with
    ``targets`` (shifts toward target outputs), refitted to reproduce those (``fit_to_targets``).

    fisher instead rescales the kept units (``block`` columns each) by Kwon's least-squares mask
    tuning, ``W_S diag(m)``, bias unchanged."""
    out = layer.get_submodule(out_path)
    bias = getattr(out, "bias", None)
    if not options.correction or options.method in ("magnitude", "wanda-sp"):
        return out.weight.detach()[:, kept.to(out.weight.device)], None if bias is None else bias.detach()
    if options.method == "fisher":
        w = out.weight.detach()
        scales = tune_mask_scales(stats.finish().gram, w, kept, block).scales
        cols = kept.to(w.device)
        tuned = w.double()[:, cols] * scales.to(w.device).repeat_interleave(block)[None, :]
        return tuned, None if bias is None else bias.detach()
    centered = options.bias_compensation
    ridge = options.correction_ridge
    finished = stats.finish()
    if targets is not None and options.method == "stat":
        b = None if bias is None else bias.detach()
        return fit_to_targets(
            out.weight.detach(), b, kept, dropped, finished, targets.finish(), centered, ridge
        )
    if options.method == "flap":  # bias compensation only: the bias absorbs the removed means
        interp = torch.zeros(kept.numel(), dropped.numel(), dtype=torch.float64)
    else:
        interp = interpolation_matrix(finished.second_moment(centered), kept, dropped, ridge)
    return fold_correction(
        out.weight.detach(),
        None if bias is None else bias.detach(),
        kept,
        dropped,
        interp,
        mean=finished.mean if centered else None,
    )


def _relative(errors: torch.Tensor, index: int) -> float:
    total = float(errors[0])
    return float(errors[index]) / total if total > 0 else 0.0


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
    keyword arguments are ``CompressionOptions`` fields. The input model is copied unless
    ``inplace``. With ``checkpoint_dir`` progress is saved after every layer; ``resume`` continues
    an interrupted run of the same job from there, with identical results. With ``offload`` the
    model stays in CPU memory and one layer at a time visits the device (for models larger than
    the GPU). With ``pack`` the texts are joined and cut into ``seq_len``-token windows, of which
    ``samples`` are drawn (the usual calibration for causal LMs). ``cache`` (an
    ``AnalysisCache``) reuses the budget-independent analysis when the same model is compressed
    at several budgets.
    """
    options = CompressionOptions(keep_flops=keep_flops, keep_params=keep_params, **option_overrides)
    options.validate()
    kind, budget = options.budget()
    adapter = adapter_for(model.config)
    if options.activations == "auto":
        options = replace(options, activations="sequential" if adapter.is_decoder else "original")
        options.validate()  # e.g. a correction target that needs sequential activations
    if options.layer_weighting == "auto":  # baselines weigh no block (their own scores rank)
        gradient = has_loss_without_labels(model) and not offload
        rule = "gradient" if gradient else "residual"
        options = replace(options, layer_weighting=rule if options.method == "stat" else "none")
    if options.error_metric == "auto":
        fisher = options.method == "stat" and options.layer_weighting.startswith("gradient")
        options = replace(options, error_metric="fisher" if fisher else "euclidean")
    device = resolve_device(options.device)
    check_finite_weights(model)
    check_seq_len(model, options.seq_len)
    batches = _prepare_batches(tokenizer, data, samples, seed, options.seq_len, batch_size, pack)
    checkpoint = None
    if checkpoint_dir is not None:
        job = fingerprint(model.config.to_json_string(), asdict(options), batches)
        checkpoint = Checkpoint(checkpoint_dir, job, resume)
    cache_key = None
    if cache is not None:
        unbudgeted = asdict(options) | {"keep_flops": None, "keep_params": None}
        cache_key = f"{id(model)}:{fingerprint(model.config.to_json_string(), unbudgeted, batches)}"
    analysis = cache.get(cache_key) if cache is not None else None
    # Original activations: the pruning pass would see the analysis pass's inputs again, so keep
    # its statistics (one Gram per block in memory) instead of recomputing them. Not with
    # offloading (models too large for that) or checkpoints (a resumed run has no statistics).
    keep_stats = options.activations == "original" and not offload and checkpoint is None
    start = time.perf_counter()
    if not inplace:
        model = copy.deepcopy(model)
    was_training = model.training
    model.eval()
    model.to("cpu" if offload else device)
    base = model.base_model
    visit = device if offload else None
    stages: dict[str, float] = {}
    with torch.no_grad(), progress_bar.enabled(progress):
        shapes = model_shapes(adapter, base)
        keep_stats = keep_stats and _stats_bytes(shapes) <= KEEP_STATS_BYTES
        _check_enough_tokens(shapes, count_tokens(batches), options)
        check_calibration(batches, shapes, model)
        with _timed(stages, "capture"):
            calib = _capture_inputs(model, adapter, batches, device)
        with _timed(stages, "analyse"):
            if analysis is None:
                analysis = Analysis()
                if options.method == "fisher":  # mask gradients of the whole model (Kwon et al.)
                    analysis.grads = collect_mask_gradients(
                        model, adapter, batches, options.prune, options.fisher_labels
                    )
                if options.method != "fisher" or keep_stats:
                    analysis.curves, analysis.stats = _analyse(
                        adapter,
                        base,
                        calib,
                        shapes,
                        options,
                        kind,
                        checkpoint,
                        visit,
                        keep_stats,
                        functools.partial(_sensitivity, analysis, model, adapter, batches, options),
                    )
                if cache is not None:
                    cache.put(cache_key, analysis)
            curves, grads = analysis.curves, analysis.grads
        with _timed(stages, "allocate"):
            if options.method == "fisher":
                counts = plan_masks(shapes, grads, kind, budget, options.seq_len, options.round_to, device)
            else:
                counts = allocate(
                    shapes,
                    curves,
                    kind,
                    budget,
                    options.seq_len,
                    options.allocation_rule,
                    reserve=_bias_reserve(shapes, curves, kind, options),
                )
        with _timed(stages, "prune"):
            # selections not kept from the analysis pass are made again, under the same metric;
            # measured on the unpruned model, before a resumed run restores its pruned layers
            reselect = analysis.stats is None and options.error_metric == "fisher"
            sensitivity = _sensitivity(analysis, model, adapter, batches, options) if reselect else None
            layer_reports, ops = _prune(
                adapter, base, calib, counts, options, checkpoint, visit, analysis.stats, sensitivity
            )
    if checkpoint is not None:
        checkpoint.finish()
    model.config.statprune_ops = list(getattr(model.config, "statprune_ops", None) or []) + ops
    model.train(was_training)
    report = _report(adapter, model, shapes, counts, layer_reports, options, calib, kind, budget, start)
    report.stage_seconds = {k: round(v, 3) for k, v in stages.items()}
    record_fallback(report, analysis.sensitivity)
    if options.method == "fisher":
        report.options["fisher_labels"] = grads.labels
    if device.type == "cuda":
        report.peak_device_mb = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return model, report


def _sensitivity(analysis: Analysis, model, adapter, batches, options) -> OutputSensitivity | None:
    """The blocks' output sensitivity (and with the fisher metric their gradient covariances),
    measured by one backward pass on first use and kept in ``analysis``; None if STAT's options
    use no loss gradient."""
    wanted = options.method == "stat" and (
        options.layer_weighting.startswith("gradient") or options.error_metric == "fisher"
    )
    if wanted and analysis.sensitivity is None:
        covariance = options.error_metric == "fisher"
        analysis.sensitivity = output_sensitivity(
            model, adapter, batches, options.prune, covariance=covariance
        )
    return analysis.sensitivity if wanted and analysis.sensitivity.usable else None


@contextlib.contextmanager
def _timed(stages: dict[str, float], name: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        stages[name] = time.perf_counter() - start


@contextlib.contextmanager
def _visiting(layer: nn.Module, device: torch.device | None):
    """With offloading, a layer lives on the CPU and visits ``device`` while it is processed."""
    if device is None:
        yield
        return
    layer.to(device)
    try:
        yield
    finally:
        layer.to("cpu")


KEEP_STATS_BYTES = 4 * 2**30  # beyond this, original activations recompute the statistics instead


def _stats_bytes(shapes: list[LayerShape]) -> int:
    """Memory of every layer's float64 Gram matrices (heads and neurons)."""
    return sum(8 * ((s.n_heads * s.head_dim) ** 2 + s.ffn_width**2) for s in shapes)


def _prepare_batches(tokenizer, data, samples, seed, seq_len, batch_size, pack) -> list[CalibrationBatch]:
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


def _check_enough_tokens(shapes: list[LayerShape], tokens: int, options: CompressionOptions) -> None:
    """Too few tokens is an error; few enough that the exact corrections overfit, a warning."""
    widest = max(max(s.n_heads * s.head_dim, s.ffn_width) for s in shapes)
    if tokens < widest:
        raise DataError(
            f"calibration data has only {tokens} tokens; a meaningful factorization needs at least "
            f"{widest} (the widest layer) — give more or longer examples"
        )
    thin = tokens < THIN_TOKENS_PER_UNIT * widest
    if thin and options.correction_ridge == 0.0 and options.method == "stat":
        warnings.warn(
            CalibrationWarning(
                f"only {tokens} calibration tokens for {widest}-wide layers: the corrections may "
                f"overfit them; give more data (≥ {THIN_TOKENS_PER_UNIT * widest} tokens) or damp "
                "them with --correction-ridge 0.1"
            ),
            stacklevel=3,
        )


def _analyse(
    adapter, base, calib, shapes, options, kind, checkpoint, visit, keep_stats, measure=None
) -> tuple[list[BlockCurve], list[_LayerStats] | None]:
    """Analysis pass on the original model: error curves of every prunable block, and with
    ``keep_stats`` every layer's statistics and selections (None if any layer's are missing).

    ``measure`` returns the blocks' output sensitivities (gradient weighting); it runs only if some
    layer is left to analyse (a resumed run's saved curves are already weighted)."""
    curves: list[BlockCurve] = []
    kept: list[_LayerStats] | None = [] if keep_stats else None
    inputs, start = calib.hidden, 0
    state = checkpoint.load("analyse", inputs[0].device) if checkpoint else None
    if state is not None:
        start, inputs = state.done + 1, state.inputs
        curves = [BlockCurve(**c) for c in state.data["curves"]]
        kept = None
    layers = adapter.layers(base)
    sensitivity = measure() if measure is not None and start < len(layers) else None
    for i in progress_bar(range(start, len(layers)), desc="analyse layers"):
        with _visiting(layers[i], visit):
            stats, inputs = _analyse_layer(
                adapter, layers[i], i, calib, inputs, shapes, options, kind, curves, sensitivity
            )
        if kept is not None:
            kept.append(stats)
        if checkpoint is not None:
            checkpoint.save("analyse", i, {"curves": [asdict(c) for c in curves]}, inputs)
    return curves, kept


def _analyse_layer(
    adapter, layer, i, calib, inputs, shapes, options, kind, curves, sensitivity=None
) -> tuple[_LayerStats, list[torch.Tensor]]:
    """Error curves of one layer's blocks (appended to ``curves``); returns the layer's statistics
    (with their selections) and outputs."""
    stats, outputs = _collect(adapter, layer, calib, inputs, options, inputs[0].device)
    if options.method == "fisher":  # its allocation comes from the mask gradients
        return stats, outputs
    weight = _block_weights(stats, options, None if sensitivity is None else sensitivity.at(i))
    stats.token_energy.clear()
    if stats.heads is not None:
        factor = _metric_factor(sensitivity, "heads", i)
        stats.head_selection = _head_selection(adapter, layer, stats, options, factor=factor)
        errors = stats.head_selection.errors
        curves.append(
            curve_from_errors(i, "heads", shapes[i], errors, weight["heads"], kind, options.seq_len)
        )
    if stats.neurons is not None:
        factor = _metric_factor(sensitivity, "neurons", i)
        stats.neuron_selection = _neuron_selection(adapter, layer, stats, options, factor=factor)
        curves.append(
            curve_from_errors(
                i,
                "neurons",
                shapes[i],
                stats.neuron_selection.errors,
                weight["neurons"],
                kind,
                options.seq_len,
                options.round_to,
            )
        )
    return stats, outputs


def _block_weights(stats: _LayerStats, options, sensitivity: dict[str, float] | None) -> dict[str, float]:
    """What each block's error curve is multiplied by in the allocation (see ``layer_weighting``)."""
    rule = options.layer_weighting
    if rule == "none" or options.method != "stat":
        return {"heads": 1.0, "neurons": 1.0}
    inverse_energy = 1.0 / max(_typical_energy(stats.token_energy, rule), 1e-30)
    if sensitivity is None or not rule.startswith("gradient"):
        return {"heads": inverse_energy, "neurons": inverse_energy}
    if rule == "gradient-only":
        return sensitivity
    return {block: math.sqrt(value * inverse_energy) for block, value in sensitivity.items()}


def _typical_energy(token_energy: list[torch.Tensor], rule: str) -> float:
    """The median (``residual``) or mean (``residual-mean``) of the tokens' ‖h‖².

    LLMs carry a few "massive activation" tokens (e.g. the first one) whose ‖h‖² exceeds the
    others' by 10⁴×, from some layer on; the mean jumps there and the allocation then guts the
    following layers (measured in benchmarks/ablation.py, variant ``mean-layer-weighting``).
    """
    energy = torch.cat(token_energy)
    return float(energy.mean() if rule == "residual-mean" else energy.median())


def _bias_reserve(shapes: list[LayerShape], curves: list[BlockCurve], kind: str, options) -> int:
    """Parameters that bias compensation may add (a bias on a pruned block that had none)."""
    plain = options.method in ("magnitude", "wanda-sp") or not options.correction
    if kind != "params" or not options.bias_compensation or plain:
        return 0
    reserve = 0
    for curve in curves:
        shape = shapes[curve.layer]
        has_bias = shape.o_bias if curve.kind == "heads" else shape.ffn_out_bias
        reserve += 0 if has_bias else shape.hidden
    return reserve


def _prune(
    adapter, base, calib, counts, options, checkpoint, visit, known_stats=None, sensitivity=None
) -> tuple[list[LayerReport], list[dict]]:
    """Pruning pass: re-collect statistics layer by layer (or take ``known_stats``, one per layer,
    from the analysis pass), select (under ``sensitivity``'s fisher metric when given), correct
    and slice. A correction toward the original model carries the original model's hidden states
    (``originals``) beside the pruned model's."""
    inputs, start = calib.hidden, 0
    originals = calib.hidden if options.correction_target != "activations" else None
    layers = adapter.layers(base)
    reports: list[LayerReport] = []
    ops: list[dict] = []
    state = checkpoint.load("prune", inputs[0].device) if checkpoint else None
    if state is not None:
        start, inputs, ops = state.done + 1, state.inputs, state.data["ops"]
        if originals is not None:  # saved after the pruned model's hidden states
            inputs, originals = inputs[: len(calib.hidden)], inputs[len(calib.hidden) :]
        reports = [LayerReport(**r) for r in state.data["reports"]]
        apply_ops(base, ops)
        for i in range(start):
            checkpoint.restore_layer(i, layers[i])
    for i in progress_bar(range(start, len(layers)), desc="prune layers"):
        with _visiting(layers[i], visit):
            known = known_stats[i] if known_stats else None
            report, layer_ops, outputs, reference, originals = _prune_layer(
                adapter, base, i, calib, inputs, counts[i], options, known, originals, sensitivity
            )
            if checkpoint is not None:
                checkpoint.save_layer(i, layers[i])
        reports.append(report)
        ops += layer_ops
        inputs = outputs if options.activations == "sequential" else reference
        if checkpoint is not None:
            data = {"ops": ops, "reports": [asdict(r) for r in reports]}
            checkpoint.save("prune", i, data, inputs + (originals or []))
    return reports, ops


def _prune_layer(
    adapter,
    base,
    i,
    calib,
    inputs,
    count,
    options,
    known: _LayerStats | None = None,
    originals=None,
    sensitivity: OutputSensitivity | None = None,
):
    """Select, correct and slice one layer; returns its report, ops, new outputs, the unpruned
    layer's outputs on the same inputs, and the original model's outputs (with ``originals``,
    its inputs; else None).

    With ``known`` statistics (and selections) of this layer's inputs nothing is run. Only
    sequential mode runs the pruned layer (its outputs feed the next layer) and so measures the
    layer's output error; otherwise both are None.
    """
    layer = adapter.layers(base)[i]
    ops: list[dict] = []
    attn, ffn = adapter.attention(layer), adapter.ffn(layer)
    want_heads, want_neurons = count
    if known is not None:
        stats, reference = known, None
    elif originals is not None:
        stats, reference, originals = _collect_with_targets(
            adapter, layer, calib, inputs, originals, options, inputs[0].device
        )
    else:
        stats, reference = _collect(adapter, layer, calib, inputs, options, inputs[0].device)
    kept_heads, attn_err = list(range(attn.n_heads)), 0.0
    if stats.heads is not None and want_heads < attn.n_heads:
        selection = stats.head_selection or _head_selection(
            adapter, layer, stats, options, count, _metric_factor(sensitivity, "heads", i)
        )
        per_group = want_heads // attn.groups
        kept_heads, dropped_heads = selection.keep(per_group, attn.n_heads)
        attn_err = _relative(selection.errors, per_group)
        w, b = _correct(
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
        ident = stats.neuron_selection or _neuron_selection(
            adapter, layer, stats, options, count, _metric_factor(sensitivity, "neurons", i)
        )
        kept_neurons, dropped = ident.keep(want_neurons)
        ffn_err = _relative(ident.errors, want_neurons)
        w, b = _correct(
            layer, ffn.output, stats.neurons, kept_neurons, dropped, options, targets=stats.neuron_targets
        )
        ops += prune_neurons(adapter, base, i, kept_neurons, w, b)
    del stats
    outputs, out_err = None, None
    if not _uses_activations(options):
        outputs = inputs  # unused downstream
    elif options.activations == "sequential":  # the next layer's inputs; original mode needs none
        outputs = _run_layer(layer, calib, inputs, None, {})
        out_err = _output_error(outputs, reference, calib.masks)
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
    return report, ops, outputs, reference, originals


def _output_error(outputs, reference, masks) -> float:
    num = den = 0.0
    for out, ref, mask in zip(outputs, reference, masks, strict=True):
        m = mask.reshape(-1)
        o = out.reshape(-1, out.shape[-1])[m].double()
        r = ref.reshape(-1, ref.shape[-1])[m].double()
        num += float(((o - r) ** 2).sum())
        den += float((r * r).sum())
    return (num / den) ** 0.5 if den > 0 else 0.0


def _report(adapter, model, shapes, counts, layer_reports, options, calib, kind, budget, start):
    import transformers

    from statprune import __version__

    after = model_shapes(adapter, model.base_model)
    after_counts = [(s.n_heads, s.ffn_width) for s in after]
    dense = [(s.n_heads, s.ffn_width) for s in shapes]
    cost = {
        k: (
            total_cost(shapes, dense, k, options.seq_len),
            total_cost(after, after_counts, k, options.seq_len),
        )
        for k in ("flops", "params")
    }
    return CompressionReport(
        budget_kind=kind,
        budget=budget,
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
            if k not in ("keep_flops", "keep_params")
        }
        | {"allocation": options.allocation_rule},
        seconds=round(time.perf_counter() - start, 3),
        layers=layer_reports,
        versions={
            "statprune": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        architecture=type(model).__name__,
    )
