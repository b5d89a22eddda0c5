"""Wanda-sp: structured Wanda (Sun et al. 2023; An et al. 2024's structured variant)."""

from __future__ import annotations

from statprune.methods import register
from statprune.methods.base import ChannelRanking


@register
class WandaSP(ChannelRanking):
    """A channel's score is ``Σ_i |W_ij| · ‖X_j‖₂`` over the next projection's rows; plain
    removal, uniform widths."""

    name = "wanda-sp"
    order = 20
    corrects = False
    default_allocation = "uniform"

    def channel_scores(self, stats, w_out, w_in_rows=None):
        from statprune.linalg.baselines import wanda_scores

        return wanda_scores(stats, w_out)
