"""Retraining-free baselines as unit rankings, for side-by-side comparison with STAT.

Each baseline scores every FFN neuron / attention head from weights and the same streamed
calibration statistics STAT uses, and turns the scores into the same ranking objects the STAT
factorizations produce (an order plus an "error" per truncation: the summed score of what is
removed), so allocation, surgery and reporting are shared.

- ``magnitude``: weight norms only (product of the unit's input-row and output-column norms).
- ``wanda-sp``: structured Wanda, ``Σ_i |W_ij| · ‖X_j‖₂`` over the next layer's input channels.
- ``flap``: fluctuation metric, ``Var(X_j) · ‖W_:,j‖²`` (FLAP, An et al. 2024); its scores are
  standardized per block so that one global ranking adapts per-layer widths.
- ``fisher``: Kwon et al. 2022, "A Fast Post-Training Pruning Framework for Transformers" — not a
  ranking from these statistics but gradients of the task loss with respect to head and neuron
  masks (``statprune.fisher_grads``), a global mask search under the budget, a per-layer
  rearrangement with the full Fisher blocks and a least-squares tuning of the kept units' masks
  (``statprune.linalg.fisher``). It needs a task head (classifier or causal LM).
"""

from __future__ import annotations

import torch

from statprune.linalg.gram import GramStats
from statprune.linalg.heads import HeadSelection
from statprune.linalg.interpolative import InterpolativeDecomposition

RANKINGS = ("magnitude", "wanda-sp", "flap")  # scored by channel_scores
BASELINES = (*RANKINGS, "fisher")  # kept for callers; the methods' registry is statprune.methods


def magnitude_scores(w_out: torch.Tensor, w_in_rows: torch.Tensor | None = None) -> torch.Tensor:
    """``‖W_:,j‖₂`` (times ``‖w_in_j‖₂`` of the unit's input rows when given), float64."""
    score = torch.linalg.vector_norm(w_out.to(torch.float64).cpu(), dim=0)
    if w_in_rows is not None:
        score = score * torch.linalg.vector_norm(w_in_rows.to(torch.float64).cpu(), dim=1)
    return score


def wanda_scores(stats: GramStats, w_out: torch.Tensor) -> torch.Tensor:
    """Structured Wanda: ``Σ_i |W_ij| · ‖X_j‖₂``, float64."""
    w = w_out.to(torch.float64).cpu()
    diag = stats.diagonal().cpu()
    return w.abs().sum(dim=0) * torch.sqrt(diag.clamp(min=0.0))


def flap_scores(stats: GramStats, w_out: torch.Tensor) -> torch.Tensor:
    """FLAP's fluctuation metric: the sample variance of ``X_j`` times ``‖W_:,j‖²``, float64."""
    w = w_out.to(torch.float64).cpu()
    diag = stats.diagonal().cpu()
    n = max(stats.count, 2)
    mean = stats.mean.cpu()
    variance = (diag - n * mean * mean).clamp(min=0.0) / (n - 1)
    return variance * (w * w).sum(dim=0)


def channel_scores(
    method: str, stats: GramStats, w_out: torch.Tensor, w_in_rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Score of each input channel j of the next linear map ``w_out`` (d x m), float64, by the
    baseline's name (the method classes call the scoring functions above directly)."""
    if method == "magnitude":
        return magnitude_scores(w_out, w_in_rows)
    if method == "wanda-sp":
        return wanda_scores(stats, w_out)
    if method == "flap":
        return flap_scores(stats, w_out)
    raise ValueError(f"unknown baseline {method!r}; choose from {', '.join(RANKINGS)}")


def _standardize(scores: torch.Tensor) -> torch.Tensor:
    """FLAP's per-block standardization, shifted to be positive (a removal cost)."""
    if scores.numel() < 2:
        return torch.ones_like(scores)
    z = (scores - scores.mean()) / scores.std().clamp(min=1e-30)
    return z - z.min() + 1e-6


def neuron_ranking(scores: torch.Tensor, standardize: bool = False) -> InterpolativeDecomposition:
    """Keep the highest-scoring neurons first; ``errors[k]`` sums the scores of the rest."""
    cost = _standardize(scores) if standardize else scores
    order = torch.argsort(scores, descending=True, stable=True)
    removed = torch.flip(torch.cumsum(torch.flip(cost[order], [0]), 0), [0])
    errors = torch.cat([removed, torch.zeros(1, dtype=removed.dtype)])
    return InterpolativeDecomposition(order=order, errors=errors, rank=int(scores.numel()))


def head_ranking(
    channel: torch.Tensor, n_heads: int, head_dim: int, groups: int = 1, standardize: bool = False
) -> HeadSelection:
    """Heads scored by the sum of their channels' scores; each round adds the best remaining
    head of every key/value group (all heads form one group in multi-head attention)."""
    scores = channel.reshape(n_heads, head_dim).sum(dim=1)
    cost = _standardize(scores) if standardize else scores
    per_group = n_heads // groups
    ranked = [
        sorted(range(g * per_group, (g + 1) * per_group), key=lambda h: (-float(scores[h]), h))
        for g in range(groups)
    ]
    order = [ranked[g][r] for r in range(per_group) for g in range(groups)]
    errors = [float(sum(cost[h] for h in order[r * groups :])) for r in range(per_group + 1)]
    return HeadSelection(order=order, errors=torch.tensor(errors, dtype=torch.float64), groups=groups)
