"""STAT (Flynn et al. 2024): interpolative decompositions of the calibration Grams, with the
least-squares correction folded into the next projection."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from statprune.methods import register
from statprune.methods.base import PruningMethod, detached_bias, fold_interpolation

if TYPE_CHECKING:
    import torch
    from torch import nn

    from statprune.adapters import ModelAdapter
    from statprune.linalg import CrossAccumulator, GramAccumulator
    from statprune.linalg.heads import HeadSelection
    from statprune.linalg.interpolative import InterpolativeDecomposition
    from statprune.options import CompressionOptions
    from statprune.pipeline.records import LayerStats


@register
class Stat(PruningMethod):
    """Heads: block-greedy selection measuring the error after the output projection; neurons:
    pivoted Cholesky of the Gram with each neuron scaled by its down-projection column norm;
    correction ``T = G_SS⁻¹ G_SD`` (damped by ``correction_ridge``), or refitted toward the
    original model's outputs with ``correction_target="original"``. Its error curves are weighted
    per block (``layer_weighting``) and measured under ``error_metric``."""

    name = "stat"
    order = 0
    weighs_blocks = True
    measures_output_error = True

    def resolve_auto(self, options: CompressionOptions, gradient_available: bool) -> CompressionOptions:
        """``layer_weighting`` auto: gradient where the model has a label-free loss and is on
        the device, else residual; ``error_metric`` auto: fisher with the gradient weightings."""
        if options.layer_weighting == "auto":
            options = replace(options, layer_weighting="gradient" if gradient_available else "residual")
        if options.error_metric == "auto":
            fisher = options.layer_weighting.startswith("gradient")
            options = replace(options, error_metric="fisher" if fisher else "euclidean")
        return options

    def wants_output_sensitivity(self, options: CompressionOptions) -> bool:
        return options.layer_weighting.startswith("gradient") or options.error_metric == "fisher"

    def warns_thin_data(self, options: CompressionOptions) -> bool:
        return options.correction_ridge == 0.0

    def select_heads(
        self,
        adapter: ModelAdapter,
        layer: nn.Module,
        stats: LayerStats,
        options: CompressionOptions,
        plan: Any | None = None,
        factor: torch.Tensor | None = None,
    ) -> HeadSelection:
        from statprune.linalg import select_heads

        attn = adapter.attention(layer)
        finished = stats.heads.finish()
        w_o = layer.get_submodule(attn.o).weight.detach()
        gram = finished.second_moment(options.bias_compensation)
        if factor is not None:
            w_o = factor.to(w_o.device) @ w_o.double()
        return select_heads(gram, w_o, attn.n_heads, attn.head_dim, attn.groups)

    def select_neurons(
        self,
        adapter: ModelAdapter,
        layer: nn.Module,
        stats: LayerStats,
        options: CompressionOptions,
        plan: Any | None = None,
        factor: torch.Tensor | None = None,
    ) -> InterpolativeDecomposition:
        import torch

        from statprune.linalg import select_columns
        from statprune.linalg.blocks import BlockDiagonalGram, select_columns_blockwise

        ffn = adapter.ffn(layer)
        finished = stats.neurons.finish()
        w = layer.get_submodule(ffn.output).weight.detach().double()
        gram = finished.second_moment(options.bias_compensation)
        seen = w if factor is None else factor.to(w.device) @ w
        # routed experts (statprune.moe): their block-diagonal Gram is factorized block by block
        select = select_columns_blockwise if isinstance(gram, BlockDiagonalGram) else select_columns
        return select(gram, scale=torch.linalg.vector_norm(seen, dim=0))

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
        from statprune.linalg import fit_to_targets, interpolation_matrix
        from statprune.linalg.blocks import BlockDiagonalGram, fit_blockwise

        centered = options.bias_compensation
        ridge = options.correction_ridge
        finished = stats.finish()
        b = detached_bias(out)
        if isinstance(finished, BlockDiagonalGram):  # routed experts: each expert's own block
            shift = None if targets is None else targets.finish()
            return fit_blockwise(out.weight.detach(), b, kept, dropped, finished, shift, centered, ridge)
        if targets is not None:
            return fit_to_targets(
                out.weight.detach(), b, kept, dropped, finished, targets.finish(), centered, ridge
            )
        interp = interpolation_matrix(finished.second_moment(centered), kept, dropped, ridge)
        return fold_interpolation(out, finished, kept, dropped, interp, centered)
