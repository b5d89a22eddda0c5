"""Typed records passed between the compression stages (``statprune.pipeline.stages``)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from statprune.adapters import ModelAdapter
from statprune.allocation import BlockCurve
from statprune.calibration import CalibrationBatch
from statprune.checkpoint import Checkpoint
from statprune.fisher_grads import OutputSensitivity
from statprune.flops import LayerShape
from statprune.linalg import CrossAccumulator, GramAccumulator
from statprune.linalg.heads import HeadSelection
from statprune.linalg.interpolative import InterpolativeDecomposition
from statprune.methods import PruningMethod
from statprune.options import CompressionOptions
from statprune.report import LayerReport


@dataclass(frozen=True)
class Plan:
    """The outcome of ``resolve_options``: validated options with every ``auto`` resolved, the
    method that runs them, the budget and the model family's adapter."""

    options: CompressionOptions
    method: PruningMethod
    adapter: ModelAdapter
    budget_kind: str  # "flops", "params" or "latency"
    budget: float
    device: torch.device


@dataclass
class Job:
    """One compression run in progress: the working copy of the model and where things live.

    ``visit``: with offloading the device each layer visits (the model stays on the CPU), else
    None; ``keep_stats``: the analysis pass keeps every layer's statistics for the pruning pass."""

    plan: Plan
    model: nn.Module
    batches: list[CalibrationBatch]
    shapes: list[LayerShape]
    checkpoint: Checkpoint | None = None
    visit: torch.device | None = None
    keep_stats: bool = False
    # the latency budget's cost model (statprune.latency.LatencyCost); None: FLOPs/params accounting
    cost: Any | None = None

    @property
    def cost_kind(self) -> Any:
        """What the allocation prices units with: the cost model, else the budget kind's name."""
        return self.cost if self.cost is not None else self.plan.budget_kind

    @property
    def options(self) -> CompressionOptions:
        return self.plan.options

    @property
    def method(self) -> PruningMethod:
        return self.plan.method

    @property
    def adapter(self) -> ModelAdapter:
        return self.plan.adapter

    @property
    def base(self) -> nn.Module:
        return self.model.base_model

    def layers(self) -> list[nn.Module]:
        return self.adapter.layers(self.base)


@dataclass
class Calibration:
    """Inputs of the first transformer layer for every batch: hidden states plus the layer's
    other call arguments, and the mask of real (non-padding) tokens."""

    hidden: list[torch.Tensor]
    args: list[tuple]
    kwargs: list[dict]
    masks: list[torch.Tensor]
    examples: int = 0
    tokens: int = 0


@dataclass
class LayerStats:
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
    """What the analysis stage learns, independent of the budget.

    ``curves`` drive the allocation; ``stats`` (one per layer, with ``activations="original"``)
    let the pruning pass skip its forward passes, since its inputs would be the same; ``plan`` is
    the method's whole-model plan (fisher's mask gradients); ``sensitivity`` the blocks' output
    gradients (measured when first needed: by the analysis pass, or by a pruning pass that
    selects under the fisher metric).
    """

    curves: list[BlockCurve] | None = None
    stats: list[LayerStats] | None = None
    plan: Any | None = None
    sensitivity: OutputSensitivity | None = None

    @property
    def grads(self) -> Any | None:
        """Former name of ``plan`` (fisher's ``MaskGradients``); deprecated."""
        warnings.warn("Analysis.grads is now Analysis.plan", DeprecationWarning, stacklevel=2)
        return self.plan


@dataclass
class LayerResult:
    """What pruning one layer produced: its report, the surgery ops, the pruned layer's outputs
    (sequential activations: the next layer's inputs), the unpruned layer's outputs on the same
    inputs, and the original model's outputs (correction toward the original model)."""

    report: LayerReport
    ops: list[dict]
    outputs: list[torch.Tensor] | None
    reference: list[torch.Tensor] | None
    originals: list[torch.Tensor] | None


@dataclass
class Pruned:
    """The pruning stage's outcome: one report per layer and the surgery ops of the whole model."""

    layers: list[LayerReport]
    ops: list[dict]
