"""FLAP (An et al. 2024): fluctuation-based ranking with bias compensation."""

from __future__ import annotations

from typing import TYPE_CHECKING

from statprune.methods import register
from statprune.methods.base import ChannelRanking, fold_interpolation

if TYPE_CHECKING:
    import torch
    from torch import nn

    from statprune.linalg import CrossAccumulator, GramAccumulator
    from statprune.linalg.gram import GramStats
    from statprune.options import CompressionOptions


@register
class Flap(ChannelRanking):
    """A channel's score is ``Var(X_j) · ‖W_:,j‖²``, standardized per block so one global
    ranking adapts the widths (greedy allocation); the next bias absorbs the removed units'
    means (no interpolation of the removed columns)."""

    name = "flap"
    order = 30
    standardize = True

    def channel_scores(
        self, stats: GramStats | None, w_out: torch.Tensor, w_in_rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        from statprune.linalg.baselines import flap_scores

        return flap_scores(stats, w_out)

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
        import torch

        from statprune.linalg.blocks import BlockDiagonalGram

        finished = stats.finish()
        # with T = 0 a dropped column of zero mean changes nothing: routed experts' all are (their
        # statistics have no column sums), and skipping them spares a dense k × (m − k) zero T
        if isinstance(finished, BlockDiagonalGram):
            dropped = dropped[finished.mean[dropped.to(finished.mean.device)].cpu() != 0]
        interp = torch.zeros(kept.numel(), dropped.numel(), dtype=torch.float64)
        return fold_interpolation(out, finished, kept, dropped, interp, options.bias_compensation)
