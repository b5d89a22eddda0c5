"""Head-level selection: block-greedy pivoting measured through the output projection.

Attention heads are blocks of ``head_dim`` columns of the concatenated head outputs ``O``. Keeping
the heads ``K`` and reconstructing the others by least squares leaves the residual Gram
``S = G − G_:K G_KK⁻¹ G_K:`` (the Schur complement), and the error seen after the output
projection ``W_O`` is ``tr(S · W_OᵀW_O)`` — in the same units (squared residual-stream error) as
the FFN errors, so heads and neurons can share one budget. Heads are added greedily, each step
taking the head whose inclusion lowers that error most.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class HeadSelection:
    """Greedy head order and the error of keeping ``r`` heads per group.

    With ``groups`` query-head groups (grouped-query attention; 1 for plain multi-head attention),
    every group keeps the same number of heads: ``errors[r]`` is the error with ``r`` heads kept per
    group, and ``order[: r * groups]`` lists the kept heads.
    """

    order: list[int]
    errors: torch.Tensor  # (heads_per_group + 1,) float64
    groups: int

    def keep(self, per_group: int, n_heads: int) -> tuple[list[int], list[int]]:
        """Kept heads (sorted by group, then index) and dropped heads, for ``per_group`` heads."""
        kept = sorted(self.order[: per_group * self.groups])
        dropped = sorted(set(range(n_heads)) - set(kept))
        return kept, dropped


def head_columns(heads: list[int], head_dim: int) -> torch.Tensor:
    """Column indices of the given heads in the concatenated head output."""
    if not heads:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


def _pinv_psd(block: torch.Tensor, floor: float) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(0.5 * (block + block.T))
    inv = torch.where(evals > floor, 1.0 / evals.clamp(min=floor), torch.zeros_like(evals))
    return (evecs * inv) @ evecs.T


def select_heads(
    gram: torch.Tensor,
    out_weight: torch.Tensor,
    n_heads: int,
    head_dim: int,
    groups: int = 1,
) -> HeadSelection:
    """Greedy block selection of heads from the Gram of head outputs and ``W_O`` (d x H·d_h).

    ``groups > 1`` enforces the grouped-query constraint: heads ``g·(H/groups) … (g+1)·(H/groups)-1``
    share a key/value head, and each round adds one head to every group.
    """
    m = n_heads * head_dim
    if gram.shape != (m, m) or out_weight.shape[1] != m:
        raise ValueError("gram must be (H·d_h)² and out_weight d x (H·d_h)")
    if n_heads % groups:
        raise ValueError(f"{n_heads} heads cannot form {groups} equal groups")
    per_group = n_heads // groups
    w = out_weight.to(device=gram.device, dtype=torch.float64)
    metric = w.T @ w
    schur = gram.to(torch.float64).clone()
    floor = 1e-12 * max(float(torch.diagonal(schur).max()), 1e-300)
    blocks = [slice(h * head_dim, (h + 1) * head_dim) for h in range(n_heads)]
    counts = [0] * groups
    order: list[int] = []
    errors = [float(torch.sum(schur * metric))]
    weighted = metric @ schur  # M S; the gain of head h is tr(S_hh⁺ S_h: M S_:h)
    while len(order) < n_heads:
        open_groups = [g for g in range(groups) if counts[g] == min(counts)]
        best, best_gain, best_inv = -1, -1.0, None
        for h in range(n_heads):
            if h in order or h // per_group not in open_groups:
                continue
            b = blocks[h]
            inv = _pinv_psd(schur[b, b], floor)
            gain = float(torch.sum(inv * (schur[b, :] @ weighted[:, b]).T))
            if gain > best_gain:
                best, best_gain, best_inv = h, gain, inv
        b = blocks[best]
        update = best_inv @ schur[b, :]  # rank-d_h downdate of S and, alike, of M S
        weighted = weighted - weighted[:, b] @ update
        schur = schur - schur[:, b] @ update
        order.append(best)
        counts[best // per_group] += 1
        if all(c == counts[0] for c in counts):
            errors.append(max(float(torch.sum(schur * metric)), 0.0))
    errors_t = torch.tensor(errors, dtype=torch.float64)
    errors_t = torch.flip(torch.cummax(torch.flip(errors_t, [0]), dim=0).values, [0])
    errors_t[-1] = 0.0
    return HeadSelection(order=order, errors=errors_t, groups=groups)
