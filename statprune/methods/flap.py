"""FLAP (An et al. 2024): fluctuation-based ranking with bias compensation."""

from __future__ import annotations

from statprune.methods import register
from statprune.methods.base import ChannelRanking, fold_interpolation


@register
class Flap(ChannelRanking):
    """A channel's score is ``Var(X_j) · ‖W_:,j‖²``, standardized per block so one global
    ranking adapts the widths (greedy allocation); the next bias absorbs the removed units'
    means (no interpolation of the removed columns)."""

    name = "flap"
    order = 30
    standardize = True

    def channel_scores(self, stats, w_out, w_in_rows=None):
        from statprune.linalg.baselines import flap_scores

        return flap_scores(stats, w_out)

    def fold(self, out, stats, kept, dropped, options, block, targets):
        import torch

        finished = stats.finish()
        interp = torch.zeros(kept.numel(), dropped.numel(), dtype=torch.float64)
        return fold_interpolation(out, finished, kept, dropped, interp, options.bias_compensation)
