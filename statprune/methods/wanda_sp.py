"""Wanda-sp: structured Wanda (Sun et al. 2023; An et al. 2024's structured variant)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from statprune.methods import register
from statprune.methods.base import ChannelRanking

if TYPE_CHECKING:
    import torch

    from statprune.linalg.gram import GramStats


@register
class WandaSP(ChannelRanking):
    """A channel's score is ``Σ_i |W_ij| · ‖X_j‖₂`` over the next projection's rows; plain
    removal, uniform widths."""

    name = "wanda-sp"
    order = 20
    corrects = False
    default_allocation = "uniform"

    def channel_scores(
        self, stats: GramStats | None, w_out: torch.Tensor, w_in_rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        from statprune.linalg.baselines import wanda_scores

        return wanda_scores(stats, w_out)
