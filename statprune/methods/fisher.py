"""Kwon et al. 2022, "A Fast Post-Training Pruning Framework for Transformers" (Fisher baseline).

Not a ranking from the layer statistics: gradients of the task loss with respect to head and
neuron masks (``statprune.fisher_grads``, the whole-model plan), a global mask search under the
budget and a per-layer rearrangement with the full Fisher blocks (``plan_masks``: the allocation
and the selections at once), then a least-squares tuning of the kept units' masks
(``statprune.linalg.fisher.tune_mask_scales``) in place of STAT's correction. It needs a task head
(classifier or causal LM).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from statprune.errors import OptionsError
from statprune.methods import register
from statprune.methods.base import PruningMethod, detached_bias

if TYPE_CHECKING:
    import torch
    from torch import nn

    from statprune.adapters import ModelAdapter
    from statprune.allocation import BlockCurve
    from statprune.calibration import CalibrationBatch
    from statprune.fisher_grads import LayerPlan, MaskGradients
    from statprune.flops import LayerShape
    from statprune.linalg import CrossAccumulator, GramAccumulator
    from statprune.linalg.heads import HeadSelection
    from statprune.linalg.interpolative import InterpolativeDecomposition
    from statprune.options import CompressionOptions
    from statprune.pipeline.records import LayerStats


@register
class Fisher(PruningMethod):
    name = "fisher"
    order = 40
    in_default_sweep = False  # it needs a task head, which embedding models lack
    any_cost_model = False  # its mask search prices FLOPs / params itself
    needs_error_curves = False  # its widths come from the mask search

    def validate(self, options: CompressionOptions) -> None:
        super().validate(options)
        if options.allocation != "auto":
            raise OptionsError("fisher sets the per-layer widths by its own mask search; drop --allocation")

    def allocation_rule(self, options: CompressionOptions) -> str:
        return "mask-search"

    def whole_model_plan(
        self,
        model: nn.Module,
        adapter: ModelAdapter,
        batches: list[CalibrationBatch],
        options: CompressionOptions,
    ) -> MaskGradients:
        """Mask gradients of every prunable block over the calibration batches."""
        from statprune import fisher_grads  # looked up at call time (benchmarks/fisher_labels.py)

        return fisher_grads.collect_mask_gradients(
            model, adapter, batches, options.prune, options.fisher_labels
        )

    def allocate(
        self,
        shapes: list[LayerShape],
        curves: list[BlockCurve] | None,
        plan: MaskGradients | None,
        kind: str,
        budget: float,
        options: CompressionOptions,
        device: torch.device,
    ) -> list[LayerPlan]:
        """One ``LayerPlan`` per layer: counts and the rearranged selections."""
        from statprune.fisher_grads import plan_masks

        return plan_masks(shapes, plan, kind, budget, options.seq_len, options.round_to, device)

    def report_options(self, plan: MaskGradients | None) -> dict[str, Any]:
        return {"fisher_labels": plan.labels}

    def select_heads(
        self,
        adapter: ModelAdapter,
        layer: nn.Module,
        stats: LayerStats,
        options: CompressionOptions,
        plan: Any | None = None,
        factor: torch.Tensor | None = None,
    ) -> HeadSelection:
        return plan.head_selection

    def select_neurons(
        self,
        adapter: ModelAdapter,
        layer: nn.Module,
        stats: LayerStats,
        options: CompressionOptions,
        plan: Any | None = None,
        factor: torch.Tensor | None = None,
    ) -> InterpolativeDecomposition:
        return plan.neuron_selection

    def fold(
        self,
        out: nn.Module,
        stats: GramAccumulator,
        kept: torch.Tensor,
        dropped: torch.Tensor,
        options: CompressionOptions,
        block: int,
        targets: CrossAccumulator | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Kwon's mask tuning: the kept units (``block`` columns each) rescaled, ``W_S diag(m)``,
        the bias unchanged."""
        from statprune.linalg.fisher import tune_mask_scales

        w = out.weight.detach()
        scales = tune_mask_scales(stats.finish().gram, w, kept, block).scales
        cols = kept.to(w.device)
        tuned = w.double()[:, cols] * scales.to(w.device).repeat_interleave(block)[None, :]
        return tuned, detached_bias(out)
