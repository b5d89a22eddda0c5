"""Loss gradients on a live model: the ``fisher`` baseline's mask gradients and layer plan (Kwon et
al. 2022), and each block's output sensitivity, which STAT's ``gradient`` layer weighting uses.

A mask variable of value 1 scales every attention head (its block of columns of the input of the
attention output projection) and every FFN neuron (a column of the input of the down projection),
through forward pre-hooks. The masks carry a batch dimension, so one backward of the summed
per-example losses gives every example's own gradient; the model's weights are frozen meanwhile.

The loss depends on the model's head (a bare encoder has none to differentiate, so ``fisher``
refuses it):

- sequence classification: cross entropy against the batch's ``labels`` when the calibration
  batches carry them; else, by default, cross entropy against the dense model's argmax
  predictions (``predicted``; multi-label heads use the thresholded logits); or, with
  ``fisher_labels="expected"``, the expected Fisher under the model's own predictive distribution,
  E_{y~p}[g gᵀ] = Jᵀ (diag p − p pᵀ) J with J the Jacobian of the logits. That K×K covariance has
  rank K−1 (its null space is the all-ones direction), so K−1 backward passes of the logits
  projected on its scaled eigenvectors give gradients whose outer products sum to it exactly: one
  pass for a binary head, √(p₀p₁)·∇(z₀−z₁). The argmax loss of a confident classifier is nearly
  zero on most examples, so a few uncertain ones dominate its ranking; the expected Fisher weighs
  every example, but ranked no better on the benchmarks' training portions. A regression head needs labels;
- causal LM: the next-token loss on the calibration text (``next-token``; padding ignored), each
  example's mean over its tokens; or, with ``expected``, the same loss against next tokens drawn
  from the model's own distribution at every position (``sampled``, seeded): a one-draw Monte
  Carlo estimate of the expected Fisher, which the vocabulary makes too large to sum. The text's
  tokens give the empirical Fisher instead, which weighs where the model is wrong (Kunstner et
  al. 2019);
- token-level heads (token classification, masked LM): per-token cross entropy against the
  labels or the dense predictions, each example's mean over its real tokens.

The per-example gradients give the diagonal Fisher that the mask search ranks units by and the
per-layer Fisher blocks the rearrangement uses (``statprune.linalg.fisher``); :func:`plan_masks`
turns them into a :class:`LayerPlan` per layer, which the driver's pruning pass follows.

:func:`output_sensitivity` uses the same losses (the expected Fisher by default: exact for
classifiers, sampled for causal LMs) but differentiates with respect to what each block adds to
the residual stream, a zero shift on its output projection's output; the mean ‖gradient‖² per
token weighs that block's error curve, and the gradients' covariance is STAT's fisher error metric.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from statprune.adapters import ModelAdapter, task_head
from statprune.allocation import allowed_neuron_counts
from statprune.calibration import CalibrationBatch, count_tokens
from statprune.errors import BudgetError, OptionsError
from statprune.flops import LayerShape, dense_counts, total_cost
from statprune.guards import (
    option,
    require_finite,
    sensitivity_problem,
    warn_sensitivity_fallback,
)
from statprune.linalg.fisher import SearchBlock, kept_importance, mask_search, nested_losses, rearrange
from statprune.linalg.heads import HeadSelection
from statprune.linalg.interpolative import InterpolativeDecomposition
from statprune.progress import progress_bar

# what a classifier's loss is measured against when its calibration batches carry no labels
UNLABELLED_LOSSES = ("predicted", "expected")


@dataclass
class MaskGradients:
    """Per-example gradients of the loss with respect to the masks, per layer (float32, CPU).

    ``heads[i]`` is (rows x heads of layer i) and ``neurons[i]`` (rows x FFN width), or None for
    a block that is not pruned; a row is an example's gradient (with the expected Fisher, K − 1
    rows per example for K classes). ``labels`` says what the loss was measured against.
    """

    heads: list[torch.Tensor | None]
    neurons: list[torch.Tensor | None]
    labels: str  # "given", "expected", "predicted" or "next-token"
    examples: int

    @staticmethod
    def importance(grads: torch.Tensor) -> torch.Tensor:
        """Diagonal Fisher ``I_i = Σ_e g_ei²`` (float64)."""
        g = grads.to(torch.float64)
        return (g * g).sum(dim=0)

    @staticmethod
    def fisher(grads: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """Fisher block ``F = Σ_e g_e g_eᵀ`` (float64, formed on ``device``, returned on the CPU)."""
        g = grads.to(device=device, dtype=torch.float64)
        return (g.T @ g).cpu()


@contextlib.contextmanager
def _frozen(model: nn.Module):
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def has_loss_without_labels(model: nn.Module) -> bool:
    """Whether a loss can be differentiated on unlabelled data: a task head with ``logits`` other
    than regression (whose own predictions give zero gradients) and multiple choice (calibration
    texts are one-choice questions, whose softmax over one choice has zero gradient)."""
    config, head = model.config, task_head(model)
    kind = getattr(head, "kind", None)
    flat = getattr(config, "problem_type", None) == "regression" or (
        kind == "sequence-classification" and getattr(config, "num_labels", 2) == 1
    )
    flat = flat or kind == "multiple-choice"
    return model.base_model is not model and not flat and getattr(head, "logits", True)


def _per_example_loss(
    logits: torch.Tensor,
    inputs: dict,
    labels: torch.Tensor | None,
    decoder: bool,
    config,
    unlabelled: str = "predicted",
    seed: int = 0,
) -> tuple[torch.Tensor, str]:
    """The loss of every example of a batch, and what it was measured against: (batch,), or
    (batch, classes − 1) for a classifier's expected Fisher (see :func:`_expected_fisher_factors`);
    ``seed`` seeds a causal LM's sampled next tokens (see :func:`_sampled_next_tokens`)."""
    mask = inputs["attention_mask"].bool()
    kind = "given" if labels is not None else "predicted"
    logits = logits.float()
    if logits.dim() == 3:
        if decoder and logits.shape[-1] == getattr(config, "vocab_size", None):  # causal LM
            if labels is None and unlabelled == "expected":
                labels, kind = _sampled_next_tokens(logits, mask, inputs["input_ids"], seed), "sampled"
            elif labels is None:
                labels, kind = inputs["input_ids"].masked_fill(~mask, -100), "next-token"
            logits, targets = logits[:, :-1], labels[:, 1:]
        else:  # token classification / masked LM heads
            targets = labels if labels is not None else logits.argmax(dim=-1).masked_fill(~mask, -100)
        tokens = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
        valid = targets != -100
        return (tokens * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1), kind
    if logits.dim() != 2:
        raise BudgetError(f"fisher cannot derive a loss from logits of shape {tuple(logits.shape)}")
    problem = getattr(config, "problem_type", None)
    if problem == "regression" or logits.shape[-1] == 1:
        if labels is None:
            raise BudgetError(
                "fisher on a regression head needs labels in the calibration batches (its own "
                f"predictions give zero gradients); use another {option('method')}"
            )
        return ((logits - labels.float().reshape(logits.shape)) ** 2).mean(dim=-1), kind
    if problem == "multi_label_classification":
        target = labels.float() if labels is not None else (logits > 0).float()
        return F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=-1), kind
    if labels is None and unlabelled == "expected":
        return _expected_fisher_factors(logits), "expected"
    log_p = F.log_softmax(logits, dim=-1)
    target = labels if labels is not None else logits.argmax(dim=-1)
    return F.nll_loss(log_p, target, reduction="none"), kind


def _sampled_next_tokens(
    logits: torch.Tensor, mask: torch.Tensor, input_ids: torch.Tensor, seed: int = 0
) -> torch.Tensor:
    """Labels laid out like ``input_ids`` (position t + 1 holds the token drawn from the model's
    distribution at position t; -100 where that position is padding or first).

    Each example draws from its own generator, seeded by ``seed`` and its real tokens (CRC-32),
    and only at its real positions: the draws do not depend on the batch it shares, its padding
    or its place in the data, so neither does the pruned model (up to float rounding of the
    probabilities)."""
    probs = require_finite(logits.detach(), "the model's next-token logits").float().softmax(dim=-1)
    labels = torch.full(mask.shape, -100, dtype=torch.long, device=logits.device)
    generator = torch.Generator(device=logits.device)
    for row in range(mask.shape[0]):
        real = mask[row].nonzero().reshape(-1)
        if real.numel() < 2:  # no real next token to predict
            continue
        tokens = input_ids[row, real].to("cpu", torch.int64).numpy().tobytes()
        generator.manual_seed(zlib.crc32(tokens, seed & 0xFFFFFFFF))
        drawn = torch.multinomial(probs[row, real[:-1]], 1, generator=generator).reshape(-1)
        labels[row, real[1:]] = drawn
    return labels


def _expected_fisher_factors(logits: torch.Tensor) -> torch.Tensor:
    """(batch, K − 1) scalar functions of the logits z whose gradients g_k satisfy
    Σ_k g_k g_kᵀ = Jᵀ (diag p − p pᵀ) J, the expected Fisher of the softmax cross entropy.

    Column k is √λ_k · v_kᵀ z, (λ_k, v_k) the eigenpairs of diag p − p pᵀ (detached, float64),
    without the zero eigenvalue of the all-ones direction."""
    p = logits.detach().double().softmax(dim=-1)
    covariance = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    values, vectors = torch.linalg.eigh(covariance)  # ascending: the first is the zero one
    factors = vectors[:, :, 1:] * values[:, None, 1:].clamp(min=0).sqrt()
    return torch.einsum("bk,bkj->bj", logits, factors.to(logits.dtype))


class _MaskProbe:
    """Mask variables (all ones, one per example and unit) scaling each block's units."""

    def __init__(self) -> None:
        self.masks: dict[tuple[str, int], torch.Tensor] = {}
        self.widths: dict[tuple[str, int], int] = {}
        self.collected: dict[tuple[str, int], list[torch.Tensor]] = {}

    def hook(self, key: tuple[str, int], module: nn.Module, width: int, block: int):
        self.widths[key], self.collected[key] = width, []

        def pre_hook(module, args):
            x = args[0]
            m = self.masks[key].to(x.dtype)
            if block > 1:
                m = m.repeat_interleave(block, dim=1)
            m = m.reshape(m.shape[0], *([1] * (x.dim() - 2)), m.shape[1])
            return (x * m, *args[1:])

        return module.register_forward_pre_hook(pre_hook)

    def start(self, size: int, device: torch.device) -> None:
        for key, width in self.widths.items():
            self.masks[key] = torch.ones(size, width, device=device, requires_grad=True)

    def wrt(self) -> dict[tuple[str, int], torch.Tensor]:
        return self.masks

    def record(self, key: tuple[str, int], grad: torch.Tensor) -> None:
        self.collected[key].append(grad.detach().float().cpu())


class _OutputProbe:
    """A zero shift added to each block's output (its output projection's), whose gradient is the
    loss gradient with respect to what the block writes into the residual stream. With
    ``covariance`` it also sums the gradients' outer products Σ_t g_t g_tᵀ (float32, on the device)."""

    def __init__(self, covariance: bool = False) -> None:
        self.shifts: dict[tuple[str, int], torch.Tensor] = {}
        self.energy: dict[tuple[str, int], float] = {}
        self.covariance: dict[tuple[str, int], torch.Tensor] | None = {} if covariance else None

    def hook(self, key: tuple[str, int], module: nn.Module, _width: int, _block: int):
        self.energy[key] = 0.0

        def forward_hook(module, args, output):
            shift = torch.zeros_like(output, requires_grad=True)
            self.shifts[key] = shift
            return output + shift

        return module.register_forward_hook(forward_hook)

    def start(self, size: int, device: torch.device) -> None:
        self.shifts.clear()

    def wrt(self) -> dict[tuple[str, int], torch.Tensor]:
        return self.shifts

    def record(self, key: tuple[str, int], grad: torch.Tensor) -> None:
        self.energy[key] += float(grad.double().square().sum())  # padding's gradient is zero
        if self.covariance is not None:
            rows = grad.detach().float().reshape(-1, grad.shape[-1])
            total = self.covariance.get(key)
            self.covariance[key] = rows.T @ rows if total is None else total.addmm_(rows.T, rows)


def _backward_batches(model, adapter, batches, prune, unlabelled, probe, desc) -> tuple[str, int]:
    """Hook ``probe`` onto every pruned block, then forward and backward every calibration batch
    (one backward per loss column); ``probe`` records the gradients. Returns what the loss was
    measured against (the kinds met, joined by "+") and the number of examples."""
    if unlabelled not in UNLABELLED_LOSSES:
        raise ValueError(f"unlabelled must be one of {UNLABELLED_LOSSES}, not {unlabelled!r}")
    if model.base_model is model:
        raise BudgetError(
            f"{desc} needs a task head to differentiate (sequence classification or causal LM); "
            f"{type(model).__name__} is a bare encoder/decoder"
        )
    if getattr(task_head(model), "kind", None) == "multiple-choice":
        raise BudgetError(
            f"{desc} cannot differentiate a multiple-choice model: calibration texts are one-choice "
            "questions, whose loss has no gradient; use the default method (stat)"
        )
    device = next(model.parameters()).device
    handles = []
    for i, layer in enumerate(adapter.layers(model.base_model)):
        attn, ffn = adapter.attention(layer), adapter.ffn(layer)
        if "heads" in prune and attn.n_heads:
            module = layer.get_submodule(attn.o)
            handles.append(probe.hook(("heads", i), module, attn.n_heads, attn.head_dim))
        if "neurons" in prune and ffn.width and ffn.experts is not None:  # routed experts
            if isinstance(probe, _MaskProbe):  # the neurons are not the input of one module call
                raise OptionsError(
                    "--method fisher does not prune mixture-of-experts FFNs; use --method stat"
                )
            handles.append(probe.hook(("neurons", i), layer.get_submodule(ffn.probe), ffn.width, 1))
        elif "neurons" in prune and ffn.width:
            handles.append(probe.hook(("neurons", i), layer.get_submodule(ffn.output), ffn.width, 1))
    kinds: set[str] = set()
    examples = 0
    dtype = next(model.parameters()).dtype
    try:
        with torch.enable_grad(), _frozen(model):
            for batch in progress_bar(batches, desc=desc):
                inputs = {k: v.to(device) for k, v in batch.inputs.items()}
                labels = inputs.pop("labels", None)
                if adapter.is_decoder:
                    inputs["use_cache"] = False
                size = int(inputs["input_ids"].shape[0])
                probe.start(size, device)
                logits = getattr(model(**inputs), "logits", None)
                if logits is None:
                    raise BudgetError(f"{desc} needs a model with logits; {type(model).__name__} has none")
                require_finite(logits, "the model's logits", dtype)
                loss, kind = _per_example_loss(
                    logits, inputs, labels, adapter.is_causal_lm(model), model.config, unlabelled
                )
                require_finite(loss, "the loss", dtype)
                kinds.add(kind)
                wrt = probe.wrt()
                keys = list(wrt)
                columns = loss.reshape(size, -1).unbind(dim=1)
                for c, column in enumerate(columns if keys else ()):
                    last = c == len(columns) - 1
                    grads = torch.autograd.grad(
                        column.sum(), [wrt[k] for k in keys], allow_unused=True, retain_graph=not last
                    )
                    for key, g in zip(keys, grads, strict=True):
                        g = torch.zeros_like(wrt[key]) if g is None else g
                        probe.record(key, require_finite(g, "the loss gradients", dtype))
                examples += size
    finally:
        for h in handles:
            h.remove()
    return "+".join(sorted(kinds)) or "none", examples


def collect_mask_gradients(
    model: nn.Module,
    adapter: ModelAdapter,
    batches: Sequence[CalibrationBatch],
    prune: Sequence[str] = ("heads", "neurons"),
    unlabelled: str = "predicted",
) -> MaskGradients:
    """Forward and backward every calibration batch through the whole model with head and neuron
    masks (all ones) in place; returns each example's gradient with respect to every mask (with
    the expected Fisher, K − 1 rows per example for K classes: rows only enter through Σ g gᵀ).

    ``unlabelled`` is the loss where the batches carry no labels: ``expected`` or ``predicted``
    (see the module docstring; a causal LM's ``predicted`` is the text's next token)."""
    probe = _MaskProbe()
    labels, examples = _backward_batches(model, adapter, batches, prune, unlabelled, probe, "mask gradients")
    stacked = {key: torch.cat(parts) for key, parts in probe.collected.items()}
    layers = len(adapter.layers(model.base_model))
    return MaskGradients(
        heads=[stacked.get(("heads", i)) for i in range(layers)],
        neurons=[stacked.get(("neurons", i)) for i in range(layers)],
        labels=labels,
        examples=examples,
    )


@dataclass
class OutputSensitivity:
    """How much the loss reacts to each block's output: the mean over real calibration tokens of
    ‖∂loss/∂y_t‖², y being what the block adds to the residual stream (None: block not pruned).

    A block error E (rows: tokens) then costs about ``sensitivity × ‖E‖²_F / hidden`` in loss,
    when errors and gradients point in unrelated directions. ``covariance`` (when measured) holds
    each block's Σ_t g_t g_tᵀ (hidden x hidden, float32, CPU), keyed by (block, layer): the
    directions the loss reacts to, which :meth:`metric_factor` turns into an error metric."""

    heads: list[float | None]
    neurons: list[float | None]
    labels: str
    covariance: dict[tuple[str, int], torch.Tensor] | None = None
    # why these gradients cannot weigh the allocation (zero or degenerate), None when they can;
    # the driver then falls back to the residual weighting (see ``guards.sensitivity_problem``)
    problem: str | None = None

    @property
    def usable(self) -> bool:
        return self.problem is None

    def at(self, layer: int) -> dict[str, float]:
        """The pruned blocks of ``layer`` and their sensitivities."""
        pairs = (("heads", self.heads[layer]), ("neurons", self.neurons[layer]))
        return {block: value for block, value in pairs if value is not None}

    def metric_factor(self, block: str, layer: int) -> torch.Tensor | None:
        """Lᵀ with L Lᵀ = F̂ = C · hidden / tr(C), C the block's gradient covariance: the error E
        of the block's output then costs ‖E L‖²_F = tr(E F̂ Eᵀ) instead of ‖E‖²_F (equal when the
        gradients are isotropic; F̂ has trace hidden, so the scale stays the weighting's).
        None without a covariance for that block."""
        c = (self.covariance or {}).get((block, layer))
        if c is None:
            return None
        trace = float(torch.diagonal(c).double().sum())
        if not trace > 0.0:  # the loss does not react at all: no direction is preferred
            return torch.eye(c.shape[0], dtype=torch.float64)
        metric = c.double() * (c.shape[0] / trace)
        metric.diagonal().add_(1e-6)  # F̂ may be singular (fewer tokens than dimensions)
        factor, info = torch.linalg.cholesky_ex(metric)
        if int(info) == 0:
            return factor.T
        values, vectors = torch.linalg.eigh(metric)  # rounding left it slightly indefinite
        return (vectors * values.clamp(min=0).sqrt()).T


def output_sensitivity(
    model: nn.Module,
    adapter: ModelAdapter,
    batches: Sequence[CalibrationBatch],
    prune: Sequence[str] = ("heads", "neurons"),
    unlabelled: str = "expected",
    covariance: bool = False,
) -> OutputSensitivity:
    """Loss-gradient energy at every pruned block's output over the calibration batches (the
    model's own predictions as labels where the batches carry none; see the module docstring),
    and with ``covariance`` the gradients' covariance (hidden² floats per block on the device)."""
    probe = _OutputProbe(covariance)
    labels, _ = _backward_batches(model, adapter, batches, prune, unlabelled, probe, "output gradients")
    tokens = max(count_tokens(batches), 1)
    layers = len(adapter.layers(model.base_model))

    def mean(kind: str, i: int) -> float | None:
        energy = probe.energy.get((kind, i))
        return None if energy is None else energy / tokens

    causal = adapter.is_decoder and type(model).__name__.endswith("ForCausalLM")
    problem = sensitivity_problem(probe.energy, batches if causal else None)
    if problem is not None:
        warn_sensitivity_fallback(problem)
    return OutputSensitivity(
        problem=problem,
        heads=[mean("heads", i) for i in range(layers)],
        neurons=[mean("neurons", i) for i in range(layers)],
        labels=labels,
        covariance=None
        if probe.covariance is None
        else {key: c.cpu() for key, c in probe.covariance.items()},
    )


@dataclass(frozen=True)
class LayerPlan:
    """What the fisher mask search and rearrangement decided for one layer.

    Unpacks as ``(heads, neurons)`` like the allocation's counts; the selections list the kept units
    first (so ``keep`` returns exactly them), their ``errors`` being the Fisher estimate of the loss
    increase ``½ 1_Pᵀ F 1_P`` along that order (None where the block keeps every unit).
    """

    heads: int
    neurons: int
    head_selection: HeadSelection | None = None
    neuron_selection: InterpolativeDecomposition | None = None

    def __iter__(self):
        return iter((self.heads, self.neurons))


def _kept_first(kept: torch.Tensor, width: int, importance: torch.Tensor) -> torch.Tensor:
    """All units: the kept ones, then the others, each by decreasing importance."""
    is_kept = torch.zeros(width, dtype=torch.bool)
    is_kept[kept] = True
    key = torch.argsort(importance, descending=True, stable=True)
    return torch.cat([key[is_kept[key]], key[~is_kept[key]]])


def plan_masks(
    shapes: list[LayerShape],
    grads: MaskGradients,
    kind: str,
    keep: float,
    seq_len: int,
    round_to: int = 1,
    device: torch.device | str = "cpu",
) -> list[LayerPlan]:
    """Mask search under the budget (Kwon Algorithm 1), then rearrangement in every layer
    (Algorithm 2). Costs come from ``statprune.flops`` at ``seq_len``; grouped-query layers keep
    equal heads per key/value group, neuron counts are multiples of ``round_to`` (or the width)."""
    dense = dense_counts(shapes)
    dense_cost = total_cost(shapes, dense, kind, seq_len)
    target = keep * dense_cost
    floor = [
        (0 if grads.heads[i] is not None else s.n_heads, 0 if grads.neurons[i] is not None else s.ffn_width)
        for i, s in enumerate(shapes)
    ]
    floor_cost = total_cost(shapes, floor, kind, seq_len)
    if floor_cost > target:
        raise BudgetError(
            f"cannot keep only {keep:.0%} of {kind}: removing every prunable unit still keeps "
            f"{floor_cost / dense_cost:.1%}; raise the budget or allow more with "
            f"{option('prune', 'heads,neurons')}"
        )
    if keep >= 1.0:
        return [LayerPlan(h, n) for h, n in dense]
    blocks: list[SearchBlock] = []
    where: list[tuple[int, str]] = []
    for i, s in enumerate(shapes):
        if grads.heads[i] is not None:
            counts = [r * s.groups for r in range(s.heads_per_group + 1)]
            base = s.cost(0, 0, kind, seq_len)
            costs = [s.cost(h, 0, kind, seq_len) - base for h in counts]
            values = kept_importance(MaskGradients.importance(grads.heads[i]), counts, s.groups)
            blocks.append(SearchBlock("heads", counts, costs, values))
            where.append((i, "heads"))
        if grads.neurons[i] is not None:
            counts = allowed_neuron_counts(s.ffn_width, round_to)
            base = s.cost(0, 0, kind, seq_len)
            costs = [s.cost(0, n, kind, seq_len) - base for n in counts]
            values = kept_importance(MaskGradients.importance(grads.neurons[i]), counts)
            blocks.append(SearchBlock("neurons", counts, costs, values))
            where.append((i, "neurons"))
    chosen = mask_search(blocks, target - floor_cost)
    counts = [list(c) for c in floor]
    for (i, what), count in zip(where, chosen, strict=True):
        counts[i][0 if what == "heads" else 1] = count
    if all(h == 0 and n == 0 for h, n in counts):
        raise BudgetError(f"budget {keep} would remove every head and neuron of the model; raise the budget")
    plans = []
    for i, (s, (h, n)) in enumerate(zip(shapes, counts, strict=True)):
        head_sel = neuron_sel = None
        if grads.heads[i] is not None and h < s.n_heads:
            g = grads.heads[i]
            fisher = MaskGradients.fisher(g, device)
            order = _kept_first(rearrange(fisher, h, s.groups), s.n_heads, MaskGradients.importance(g))
            errors = nested_losses(fisher, order, step=s.groups)
            head_sel = HeadSelection(order=order.tolist(), errors=errors, groups=s.groups)
        if grads.neurons[i] is not None and n < s.ffn_width:
            g = grads.neurons[i]
            fisher = MaskGradients.fisher(g, device)
            order = _kept_first(rearrange(fisher, n), s.ffn_width, MaskGradients.importance(g))
            neuron_sel = InterpolativeDecomposition(
                order=order, errors=nested_losses(fisher, order), rank=s.ffn_width
            )
        plans.append(LayerPlan(h, n, head_sel, neuron_sel))
    return plans
