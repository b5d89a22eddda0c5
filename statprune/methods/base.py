"""The interface of a pruning method, and the shared behaviour of the ranking baselines.

A method decides, given the streamed statistics of one layer (``LayerStats``: Gram matrices of
the head outputs and FFN neurons), the order in which units are kept (``select_heads`` /
``select_neurons``, returning the same ranking objects STAT's factorizations return: an order
plus an error per truncation), how the next projection is rebuilt from the kept units
(``correct``), how the per-layer widths are chosen (``allocate``; a default allocation rule) and
which whole-model information it needs before the layers are visited (``whole_model_plan``, e.g.
Kwon et al.'s mask gradients). Class attributes say what the shared pipeline must provide or may
skip; ``resolve_auto`` resolves the ``auto`` options that depend on the method.

The pipeline (``statprune.pipeline``) never tests a method's name: it asks the method.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar

from statprune.errors import OptionsError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from statprune.adapters import ModelAdapter
    from statprune.allocation import BlockCurve
    from statprune.calibration import CalibrationBatch
    from statprune.flops import LayerShape
    from statprune.linalg import CrossAccumulator, GramAccumulator
    from statprune.linalg.gram import GramStats
    from statprune.linalg.heads import HeadSelection
    from statprune.linalg.interpolative import InterpolativeDecomposition
    from statprune.options import CompressionOptions
    from statprune.pipeline.records import LayerStats


class PruningMethod:
    """One pruning method. Subclass it in a module of ``statprune.methods`` and decorate the class
    with ``@register``; override what differs from these defaults."""

    name: ClassVar[str] = ""
    order: ClassVar[int] = 100  # position in listings (CLI choices, sweep), then by name
    in_default_sweep: ClassVar[bool] = True  # sweep runs it when --methods is not given
    # its allocation takes any cost model (statprune.allocation.CostModel), so latency budgets too
    any_cost_model: ClassVar[bool] = True
    uses_activations: ClassVar[bool] = True  # reads calibration statistics (else weights only)
    corrects: ClassVar[bool] = True  # rebuilds the next projection (else plain slicing)
    default_allocation: ClassVar[str] = "greedy"  # what allocation="auto" means
    needs_error_curves: ClassVar[bool] = True  # the allocation needs every block's error curve
    weighs_blocks: ClassVar[bool] = False  # the layer weighting applies to its error curves
    measures_output_error: ClassVar[bool] = False  # the fisher error metric applies to its selection

    # ------------------------------------------------------------------------------- options

    def validate(self, options: CompressionOptions) -> None:
        """Raise ``OptionsError`` for options this method cannot honour."""
        if options.error_metric == "fisher" and not self.measures_output_error:
            raise OptionsError(f"--error-metric fisher is STAT's; {self.name} ranks units by its own scores")

    def resolve_auto(self, options: CompressionOptions, gradient_available: bool) -> CompressionOptions:
        """Resolve ``layer_weighting`` and ``error_metric`` when ``auto``: by default no block
        weighting (the method's own scores rank) and the euclidean metric."""
        if options.layer_weighting == "auto":
            options = replace(options, layer_weighting="none")
        if options.error_metric == "auto":
            options = replace(options, error_metric="euclidean")
        return options

    def allocation_rule(self, options: CompressionOptions) -> str:
        return options.allocation if options.allocation != "auto" else self.default_allocation

    def wants_output_sensitivity(self, options: CompressionOptions) -> bool:
        """Whether the blocks' loss-gradient sensitivities are needed (one backward pass)."""
        return False

    def warns_thin_data(self, options: CompressionOptions) -> bool:
        """Whether too few tokens per unit make this method's corrections overfit."""
        return False

    # --------------------------------------------------------------------------- whole model

    def whole_model_plan(
        self,
        model: nn.Module,
        adapter: ModelAdapter,
        batches: list[CalibrationBatch],
        options: CompressionOptions,
    ) -> Any | None:
        """Information about the whole model measured before the layers are visited (None)."""
        return None

    def allocate(
        self,
        shapes: list[LayerShape],
        curves: list[BlockCurve] | None,
        plan: Any | None,
        kind: str,
        budget: float,
        options: CompressionOptions,
        device: torch.device,
    ) -> list[Any]:
        """Per-layer kept ``(heads, neurons)`` (anything that unpacks so; passed back to the
        selections as ``plan``) under the budget; ``BudgetError`` if it cannot be met."""
        from statprune.allocation import allocate, bias_reserve

        plain = not self.corrects or not options.correction
        return allocate(
            shapes,
            curves,
            kind,
            budget,
            options.seq_len,
            self.allocation_rule(options),
            reserve=bias_reserve(shapes, curves, kind, options.bias_compensation and not plain),
        )

    def report_options(self, plan: Any | None) -> dict[str, Any]:
        """Resolved values to record in the report's options (beyond the options themselves)."""
        return {}

    # --------------------------------------------------------------------------- per layer

    def select_heads(
        self,
        adapter: ModelAdapter,
        layer: nn.Module,
        stats: LayerStats,
        options: CompressionOptions,
        plan: Any | None = None,
        factor: torch.Tensor | None = None,
    ) -> HeadSelection:
        """The order heads are kept in, with the error of each truncation. ``plan``: this layer's
        entry of :meth:`allocate`; ``factor``: the fisher error metric's factor (or None)."""
        raise NotImplementedError

    def select_neurons(
        self,
        adapter: ModelAdapter,
        layer: nn.Module,
        stats: LayerStats,
        options: CompressionOptions,
        plan: Any | None = None,
        factor: torch.Tensor | None = None,
    ) -> InterpolativeDecomposition:
        """The order FFN neurons are kept in (see :meth:`select_heads`)."""
        raise NotImplementedError

    def correct(
        self,
        layer: nn.Module,
        out_path: str,
        stats: GramAccumulator,
        kept: torch.Tensor,
        dropped: torch.Tensor,
        options: CompressionOptions,
        block: int = 1,
        targets: CrossAccumulator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The next projection's new weight (out x kept columns) and bias. Without correction
        (the method's or ``options.correction=False``) the kept columns and the bias unchanged;
        else :meth:`fold`. ``block``: columns per unit (``head_dim`` for heads)."""
        out = layer.get_submodule(out_path)
        if not options.correction or not self.corrects:
            return out.weight.detach()[:, kept.to(out.weight.device)], detached_bias(out)
        return self.fold(out, stats, kept, dropped, options, block, targets)

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
        """The corrected weight and bias of the next projection ``out`` (see :meth:`correct`)."""
        raise NotImplementedError


def detached_bias(module: nn.Module) -> torch.Tensor | None:
    """``module.bias`` detached from autograd, or None for a module without one."""
    bias = getattr(module, "bias", None)
    return None if bias is None else bias.detach()


def fold_interpolation(
    out: nn.Module, finished: GramStats, kept: torch.Tensor, dropped: torch.Tensor, interp, centered: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``W[:, S] + W[:, D] Tᵀ`` (and with ``centered`` the bias absorbing the removed means)."""
    from statprune.linalg import fold_correction

    return fold_correction(
        out.weight.detach(),
        detached_bias(out),
        kept,
        dropped,
        interp,
        mean=finished.mean if centered else None,
    )


class ChannelRanking(PruningMethod):
    """A baseline that scores each input channel of the next projection (``channel_scores``),
    sums a head's channels, and keeps the highest-scoring units (``standardize``: FLAP's
    per-block standardization of the removal costs)."""

    standardize: ClassVar[bool] = False

    def channel_scores(
        self, stats: GramStats | None, w_out: torch.Tensor, w_in_rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Score of each input channel j of ``w_out`` (d x m), float64."""
        raise NotImplementedError

    def head_channel_scores(
        self, adapter: ModelAdapter, layer: nn.Module, stats: GramStats | None, w_o: torch.Tensor
    ) -> torch.Tensor:
        return self.channel_scores(stats, w_o)

    def select_heads(
        self,
        adapter: ModelAdapter,
        layer: nn.Module,
        stats: LayerStats,
        options: CompressionOptions,
        plan: Any | None = None,
        factor: torch.Tensor | None = None,
    ) -> HeadSelection:
        from statprune.linalg.baselines import head_ranking

        attn = adapter.attention(layer)
        finished = stats.heads.finish() if self.uses_activations else None
        w_o = layer.get_submodule(attn.o).weight.detach()
        channel = self.head_channel_scores(adapter, layer, finished, w_o)
        return head_ranking(channel, attn.n_heads, attn.head_dim, attn.groups, standardize=self.standardize)

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

        from statprune.linalg.baselines import neuron_ranking

        ffn = adapter.ffn(layer)
        finished = stats.neurons.finish() if self.uses_activations else None
        w = layer.get_submodule(ffn.output).weight.detach().double()
        w_in = torch.cat([w.detach() for w in ffn.input_weights(layer)], dim=1)
        return neuron_ranking(self.channel_scores(finished, w, w_in), standardize=self.standardize)
