"""Magnitude pruning: units ranked by weight norms alone (no calibration statistics)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from statprune.methods import register
from statprune.methods.base import ChannelRanking

if TYPE_CHECKING:
    import torch
    from torch import nn

    from statprune.adapters import ModelAdapter
    from statprune.linalg.gram import GramStats


@register
class Magnitude(ChannelRanking):
    """A unit's score is the product of its input-row and output-column norms (a head's: the sum
    over its channels of ``‖W_O[:, j]‖ · ‖W_Q[j, :]‖``); plain removal, uniform widths."""

    name = "magnitude"
    order = 10
    uses_activations = False
    corrects = False
    default_allocation = "uniform"

    def channel_scores(
        self, stats: GramStats | None, w_out: torch.Tensor, w_in_rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        from statprune.linalg.baselines import magnitude_scores

        return magnitude_scores(w_out, w_in_rows)

    def head_channel_scores(
        self, adapter: ModelAdapter, layer: nn.Module, stats: GramStats | None, w_o: torch.Tensor
    ) -> torch.Tensor:
        import torch

        q_rows = adapter.attention(layer).weight(layer, "q").detach().double().cpu()
        return self.channel_scores(stats, w_o) * torch.linalg.vector_norm(q_rows, dim=1)
