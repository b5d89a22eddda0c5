"""Compression options: the one place that defines each option's default, choices, help and group.

``CompressionOptions`` (the Python API's keyword arguments of ``statprune.compress``), its
validation, the ``compress`` command's flags and the compression flags of ``sweep`` are all derived
from the field definitions below. Each field says whether it is a **user** option (budget, what
may be pruned, data shape, method, device) or a **research** switch (ablations and the measured
alternatives to the defaults: activations, correction target and ridge, layer weighting, error
metric, Gram precision...). ``"auto"`` values are resolved once, before any work, by
:func:`resolve_auto` (the method decides its own), and the resolved values are what the report and
the checkpoint fingerprint record.

Bad options raise :class:`~statprune.errors.OptionsError` with a one-line message. This module
imports neither torch nor transformers (the command line builds its parser from it).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields, replace
from typing import Any

from statprune.errors import BudgetError, OptionsError

USER = "user"
RESEARCH = "research"
PRUNABLE = ("heads", "neurons")
ACTIVATIONS = ("auto", "sequential", "original")
CORRECTION_TARGETS = ("activations", "original")
ALLOCATIONS = ("auto", "greedy", "uniform")
LAYER_WEIGHTINGS = ("auto", "residual", "residual-mean", "gradient", "gradient-only", "none")
ERROR_METRICS = ("auto", "euclidean", "fisher")
FISHER_LABELS = ("predicted", "expected")  # statprune.fisher_grads.UNLABELLED_LOSSES
GRAM_DTYPES = ("float32", "float64")
BUDGET_KINDS = ("flops", "params", "latency")
BACKENDS = ("torch", "onnxruntime")  # statprune.bench.BACKENDS
# options that only matter to a latency budget (left out of the report of other budgets)
LATENCY_OPTIONS = ("bench_batch", "bench_seq_len", "backend")


def method_names() -> tuple[str, ...]:
    """The registered pruning methods (``statprune.methods``), in their listing order."""
    from statprune.methods import method_names as names

    return names()


def _option(
    default: Any,
    group: str,
    help: str,
    *,
    flag: str | None = None,
    choices: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None,
    label: str | None = None,
    cli: str = "value",
    sweep: bool = True,
    **extra: Any,
) -> Any:
    """A dataclass field carrying its option metadata.

    ``flag``: the command-line flag (None: Python API only); ``cli``: ``value``, ``list``
    (comma-separated), ``negate`` (``--no-…`` stores False) or ``custom`` (declared elsewhere);
    ``sweep``: whether ``statprune sweep`` passes it through; ``label``: the words used in errors."""
    metadata = {
        "group": group,
        "help": help,
        "flag": flag,
        "choices": choices,
        "label": label,
        "cli": cli,
        "sweep": sweep,
        **extra,
    }
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class CompressionOptions:
    """How to compress. Exactly one of ``keep_flops`` / ``keep_params`` / ``keep_latency`` is the
    budget.

    Field groups (``option_names(USER)`` / ``option_names(RESEARCH)``): the user options are the
    budget, ``prune``, ``seq_len``, ``method``, ``allocation``, ``round_to``, ``fisher_labels`` and
    ``device``; the rest are research switches whose defaults were chosen by the measurements in
    ``benchmarks/`` (see each field's help)."""

    keep_flops: float | None = _option(
        None, USER, "fraction of attention+FFN FLOPs to keep", flag="--keep-flops", cli="custom"
    )
    keep_params: float | None = _option(
        None, USER, "fraction of attention+FFN params to keep", flag="--keep-params", cli="custom"
    )
    keep_latency: float | None = _option(
        None,
        USER,
        "fraction of the dense model's latency to keep, measured on this machine at --bench-batch, "
        "--bench-seq-len, --device and --backend (causal LMs: prefill latency)",
        flag="--keep-latency",
        cli="custom",
    )
    prune: tuple[str, ...] = _option(
        PRUNABLE, USER, "what may be removed: heads,neurons", flag="--prune", cli="list"
    )
    seq_len: int = _option(
        128, USER, "max tokens per example (and FLOPs s)", flag="--seq-len", type="positive_int", sweep=False
    )
    # "sequential" (pruned upstream), "original", or "auto": sequential for decoders (causal LMs),
    # original for encoders — the better of the two on each in benchmarks/ablation.py
    activations: str = _option(
        "auto",
        RESEARCH,
        "calibrate each layer on the pruned (sequential) or original upstream outputs; original "
        "reuses the analysis pass (about half the time); auto: sequential for causal LMs, original "
        "for encoders (default)",
        flag="--activations",
        choices=ACTIVATIONS,
        label="activations",
    )
    bias_compensation: bool = _option(
        True,
        RESEARCH,
        "do not let the next bias absorb the mean of removed units",
        flag="--no-bias-compensation",
        cli="negate",
    )
    # fold the least-squares correction (False: plain removal, for ablations)
    correction: bool = _option(True, RESEARCH, "fold the least-squares correction (False: plain removal)")
    # what the correction reproduces (sequential activations): "activations", the block's own
    # removed activations (the ID), or "original", each block's output in the original model
    # (repairing upstream error in-sample; it overfits a few hundred examples: benchmarks/ablation.py)
    correction_target: str = _option(
        "activations",
        RESEARCH,
        "with --activations sequential, what each correction reproduces: the block's own removed "
        "activations (the ID, default) or the block's output in the original model (repairs upstream "
        "error on the calibration data, but overfits a few hundred examples)",
        flag="--correction-target",
        choices=CORRECTION_TARGETS,
        label="correction target",
    )
    # damping of the correction's least squares: λ times the mean diagonal of the kept units' Gram
    # is added before solving, shrinking the correction toward plain removal where the calibration
    # data cannot pin it down (few tokens per unit); 0: the exact least squares
    correction_ridge: float = _option(
        0.0,
        RESEARCH,
        "damp the correction's least squares by LAMBDA × the mean diagonal of the kept units' "
        "Gram (shrinks it toward plain removal where the calibration data is thin; default 0)",
        flag="--correction-ridge",
        type="float",
        metavar="LAMBDA",
    )
    method: str = _option(
        "stat",
        USER,
        "stat (default) or a retraining-free baseline, for comparisons (fisher: Kwon et al. "
        "2022, needs a classifier or causal-LM head)",
        flag="--method",
        choices=method_names,
        label="method",
        sweep=False,
    )
    # "greedy" (global, error per cost), "uniform", or "auto" (the method's default)
    allocation: str = _option(
        "auto",
        USER,
        "per-layer widths: greedy (global error per cost) or uniform; auto picks per method",
        flag="--allocation",
        choices=ALLOCATIONS,
        label="allocation",
    )
    # how each block's errors are weighted in the allocation: "residual" (divided by the median
    # token's residual-stream ‖h‖², robust to the few massive-activation tokens of LLMs),
    # "residual-mean", "gradient-only" (times the loss-gradient energy at the block's output, from
    # one backward pass with the model's own predictions as labels; needs a task head: the
    # first-order loss increase), "gradient" (the geometric mean of the two), "none", or "auto":
    # gradient where the model has a head to differentiate (classifier, causal LM) and is not
    # offloaded, else residual — the better on training-portion data (benchmarks/validate.py)
    layer_weighting: str = _option(
        "auto",
        RESEARCH,
        "how the allocation weighs each block's error: by the loss-gradient energy at the "
        "block's output (gradient-only; one backward pass, needs a task head), by the median "
        "token's residual-stream energy (residual; residual-mean: the mean, skewed by LLMs' "
        "massive-activation tokens), by the geometric mean of the two (gradient), or not at all; "
        "auto (default): gradient where the model has a classifier or LM head, else residual",
        flag="--layer-weighting",
        choices=LAYER_WEIGHTINGS,
        label="layer weighting",
    )
    # how a block's output error is measured when choosing its units (and drawing its error curve):
    # "euclidean", the squared error it adds to the residual stream, or "fisher", that error
    # weighed by the covariance of the loss gradients at the block's output (normalized to trace
    # hidden: the directions the loss reacts to count more; measured in the gradient weighting's
    # backward pass); "auto": fisher with the gradient layer weightings, else euclidean
    error_metric: str = _option(
        "auto",
        RESEARCH,
        "how a block's output error is measured when choosing which units to keep: the squared "
        "error added to the residual stream (euclidean), or weighed by the covariance of the loss "
        "gradients there (fisher: errors in directions the loss reacts to count more; hidden² "
        "floats per block); auto (default): fisher with the gradient layer weightings",
        flag="--error-metric",
        choices=ERROR_METRICS,
        label="error metric",
    )
    round_to: int = _option(
        1, USER, "kept FFN widths are multiples of N", flag="--round-to", type="positive_int"
    )
    # fisher on a classifier whose calibration data has no labels: cross entropy against its argmax
    # ("predicted"), or the "expected" Fisher under the model's predictive distribution
    fisher_labels: str = _option(
        "predicted",
        USER,
        "fisher on unlabelled data: a classifier's loss against its own argmax predictions, a "
        "causal LM's against the text's next tokens (predicted, default), or the expected Fisher "
        "under the model's predictive distribution (LMs: next tokens sampled from it)",
        flag="--fisher-labels",
        choices=FISHER_LABELS,
        label="fisher labels",
    )
    device: str = _option("auto", USER, "auto, cpu or cuda", flag="--device", sweep=False)
    # what a latency is measured on (latency budgets; sweep --bench): batch, tokens, runtime
    bench_batch: int = _option(
        32, USER, "sequences per batch when measuring latency", flag="--bench-batch", type="positive_int"
    )
    bench_seq_len: int | None = _option(
        None,
        USER,
        "tokens per sequence when measuring latency (default: --seq-len)",
        flag="--bench-seq-len",
        type="positive_int",
    )
    backend: str = _option(
        "torch",
        USER,
        "runtime whose latency is measured: torch or onnxruntime (sweep --bench only; latency "
        "budgets are priced with torch)",
        flag="--backend",
        choices=BACKENDS,
        label="backend",
    )
    # precision of each batch's Gram product (sums are float64)
    gram_dtype: str = _option(
        "float32", RESEARCH, "precision of each batch's Gram product", choices=GRAM_DTYPES, label="Gram dtype"
    )

    def budget(self) -> tuple[str, float]:
        """``("flops" | "params" | "latency", fraction)``; ``BudgetError`` unless exactly one is
        given and it is in (0, 1]."""
        values = {k: getattr(self, f"keep_{k}") for k in BUDGET_KINDS}
        given = [(k, v) for k, v in values.items() if v is not None]
        if len(given) != 1:
            raise BudgetError("give exactly one budget: --keep-flops F, --keep-params F or --keep-latency F")
        kind, value = given[0]
        if not 0.0 < float(value) <= 1.0:
            raise BudgetError(f"budget {value} is outside (0, 1]: give the fraction to keep, e.g. 0.6")
        return kind, float(value)

    @property
    def latency_seq_len(self) -> int:
        """Tokens per sequence of a latency measurement (``bench_seq_len``, else ``seq_len``)."""
        return self.bench_seq_len or self.seq_len

    @property
    def allocation_rule(self) -> str:
        """The per-layer width rule the method will use (``auto`` resolved by the method: greedy
        for STAT and FLAP, uniform for magnitude and Wanda-sp, fisher's own mask search)."""
        from statprune.methods import get_method

        return get_method(self.method).allocation_rule(self)

    def validate(self) -> None:
        """Raise ``OptionsError`` (or ``BudgetError`` for the budget) on the first bad option."""
        self.budget()
        unknown = set(self.prune) - set(PRUNABLE)
        if unknown or not self.prune:
            raise OptionsError(f"--prune takes heads, neurons or both, not {','.join(self.prune)!r}")
        from statprune.methods import get_method

        get_method(self.method).validate(self)  # an unknown method is an OptionsError too
        if self.keep_latency is not None and not get_method(self.method).any_cost_model:
            raise OptionsError(
                f"--method {self.method} searches widths under FLOPs or params itself; use "
                "--keep-flops/--keep-params with it, or another method for --keep-latency"
            )
        for name in ("activations", "correction_target", "allocation"):
            _check_choice(self, name)
        if self.correction_target != "activations" and self.activations == "original":
            raise OptionsError(
                f"--correction-target {self.correction_target} needs --activations sequential (with "
                "original activations the pruned model's inputs are the original ones)"
            )
        for name in ("layer_weighting", "error_metric", "fisher_labels", "gram_dtype", "backend"):
            _check_choice(self, name)
        if self.bench_batch < 1 or (self.bench_seq_len is not None and self.bench_seq_len < 1):
            raise OptionsError("--bench-batch and --bench-seq-len must be positive")
        if self.keep_latency is not None:
            from statprune.bench import require_backend

            require_backend(self.backend)  # a missing onnxruntime: one line naming the package
            if self.backend != "torch":
                raise OptionsError(
                    "--keep-latency prices heads and neurons with lookup tables measured in torch; "
                    "--backend onnxruntime is for sweep --bench only so far: use --backend torch"
                )
        if not 0.0 <= self.correction_ridge < math.inf:
            raise OptionsError(f"--correction-ridge must be a finite number ≥ 0, not {self.correction_ridge}")
        if self.seq_len < 1 or self.round_to < 1:
            raise OptionsError("seq_len and round_to must be positive")

    def group(self, name: str) -> dict[str, Any]:
        """The values of the options in group ``USER`` or ``RESEARCH``."""
        return {n: getattr(self, n) for n in option_names(name)}


def choices_of(name: str) -> tuple[str, ...] | None:
    """The allowed values of option ``name`` (None: not a choice)."""
    choices = _fields()[name].metadata["choices"]
    return choices() if callable(choices) else choices


def _check_choice(options: CompressionOptions, name: str) -> None:
    value, choices = getattr(options, name), choices_of(name)
    if value not in choices:
        meta = _fields()[name].metadata
        raise OptionsError(
            f"unknown {meta['label']} {value!r}: choose {', '.join(choices)} "
            f"({meta['flag'] or name}, {name}= in Python)"
        )


def _fields() -> dict[str, Any]:
    return {f.name: f for f in fields(CompressionOptions)}


def option_names(group: str | None = None) -> list[str]:
    """Names of the options (of one group: ``USER`` or ``RESEARCH``), in declaration order."""
    return [f.name for f in fields(CompressionOptions) if group is None or f.metadata["group"] == group]


def make_options(keep_flops: float | None = None, keep_params: float | None = None, **overrides: Any):
    """``CompressionOptions`` from keyword arguments; an unknown name is an ``OptionsError``."""
    unknown = sorted(set(overrides) - set(option_names()))
    if unknown:
        raise OptionsError(
            f"unknown option {', '.join(unknown)}; the options are {', '.join(option_names())}"
        )
    return CompressionOptions(keep_flops=keep_flops, keep_params=keep_params, **overrides)


def resolve_auto(
    options: CompressionOptions, *, is_decoder: bool, gradient_available: bool
) -> CompressionOptions:
    """Every ``auto`` resolved (validated again): activations by the architecture (sequential for
    decoders), layer weighting and error metric by the method (see ``PruningMethod.resolve_auto``).
    ``gradient_available``: the model has a label-free loss and sits on the device."""
    from statprune.methods import get_method

    if options.activations == "auto":
        options = replace(options, activations="sequential" if is_decoder else "original")
        options.validate()  # e.g. a correction target that needs sequential activations
    return get_method(options.method).resolve_auto(options, gradient_available)


# -------------------------------------------------------------------------------- command line


def _arg_type(name: str | None):
    from statprune.argtypes import fraction, positive_int

    return {None: None, "positive_int": positive_int, "float": float, "fraction": fraction}[name]


def add_option_arguments(
    parser: argparse.ArgumentParser | Any, *, for_sweep: bool = False, names: Iterable[str] | None = None
) -> None:
    """Declare the options' flags on ``parser`` (all with a flag, or those ``sweep`` passes
    through when ``for_sweep``), with their defaults, choices and help from the field definitions."""
    wanted = set(option_names()) if names is None else set(names)
    for f in fields(CompressionOptions):
        meta = f.metadata
        if f.name not in wanted or meta["flag"] is None or meta["cli"] == "custom":
            continue
        if for_sweep and not meta["sweep"]:
            continue
        if meta["cli"] == "negate":
            parser.add_argument(meta["flag"], action="store_true", help=meta["help"])
            continue
        kwargs: dict[str, Any] = {"help": meta["help"], "dest": f.name}
        if meta["cli"] == "list":
            kwargs["default"] = ",".join(f.default)
        else:
            kwargs["default"] = f.default
            if meta.get("type"):
                kwargs["type"] = _arg_type(meta["type"])
            if meta["choices"] is not None:
                kwargs["choices"] = list(choices_of(f.name))
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        parser.add_argument(meta["flag"], **kwargs)


def add_budget_arguments(parser: argparse.ArgumentParser | Any) -> None:
    """``--keep-flops`` / ``--keep-params`` / ``--keep-latency`` (give exactly one) in their own
    argument group."""
    from statprune.argtypes import fraction

    group = parser.add_argument_group("budget (give exactly one)")
    for name in ("keep_flops", "keep_params", "keep_latency"):
        meta = _fields()[name].metadata
        group.add_argument(meta["flag"], type=fraction, help=meta["help"], dest=name)


def options_from_args(args: argparse.Namespace, *, for_sweep: bool = False) -> dict[str, Any]:
    """The option values given on the command line (see :func:`add_option_arguments`), as
    keyword arguments of ``statprune.compress`` (budgets excluded)."""
    values: dict[str, Any] = {}
    for f in fields(CompressionOptions):
        meta = f.metadata
        if meta["flag"] is None or meta["cli"] == "custom" or (for_sweep and not meta["sweep"]):
            continue
        if meta["cli"] == "negate":
            values[f.name] = not getattr(args, meta["flag"].lstrip("-").replace("-", "_"))
        elif meta["cli"] == "list":
            values[f.name] = tuple(p.strip() for p in getattr(args, f.name).split(",") if p.strip())
        else:
            values[f.name] = getattr(args, f.name)
    return values
