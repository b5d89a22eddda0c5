"""Fisher-based pruning (Kwon et al. 2022, "A Fast Post-Training Pruning Framework for Transformers").

Pure linear algebra on tensors; the mask gradients come from ``statprune.fisher_grads``. A mask
variable ``m_i`` (1 in the dense model) scales every attention head and FFN neuron; with ``g_e`` the
gradient of example ``e``'s loss with respect to the masks, the empirical Fisher ``F = Σ_e g_e g_eᵀ``
gives the second-order estimate ``½ 1_Pᵀ F 1_P`` of the loss increase when the units ``P`` go.

- :func:`mask_search` (Kwon Algorithm 1): every unit is priced by its diagonal Fisher
  ``I_i = Σ_e g_ei²``; for each number of kept heads the rest of the budget is filled with the most
  important neurons, and the split keeping the most importance wins.
- :func:`rearrange` (Kwon Algorithm 2): within one layer, for the count the search gave, choose
  which units to keep using the layer's full Fisher block.
- :func:`tune_mask_scales` (Kwon §4.3): layer-wise least squares for the kept units' mask values,
  from the Gram of the output projection's input.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SearchBlock:
    """One prunable block (a layer's heads, or its neurons) as the mask search sees it.

    ``values[j]`` is the importance kept (summed diagonal Fisher of the kept units) and
    ``costs[j]`` the cost of the block when it keeps ``counts[j]`` units; ``counts`` ascend from 0
    to the block's width (multiples of the group count for grouped-query heads, of ``round_to``
    for neurons), and ``values`` must be concave along them, as top-k sums are.
    """

    kind: str  # "heads" or "neurons"
    counts: list[int]
    costs: list[float]
    values: list[float]


def kept_importance(importance: torch.Tensor, counts: list[int], groups: int = 1) -> list[float]:
    """Importance kept by the ``c`` most important units, for every ``c`` in ``counts``.

    With ``groups > 1`` (grouped-query heads) the units form equal contiguous groups that each keep
    ``c / groups`` units: the sum of every group's top ``c / groups``.
    """
    imp = importance.to(torch.float64).cpu()
    per = imp.reshape(groups, -1)
    ranked = torch.sort(per, dim=1, descending=True).values
    prefix = torch.cat([torch.zeros(groups, 1, dtype=torch.float64), torch.cumsum(ranked, dim=1)], dim=1)
    totals = prefix.sum(dim=0)
    return [float(totals[c // groups]) for c in counts]


def _ordered_steps(blocks: list[SearchBlock], kind: str) -> list[tuple[int, int, float, float]]:
    """The steps (block, count index, added cost, added value) of every block of ``kind``, merged
    into one global order by value per cost, each block's steps kept in ascending order.

    With equal unit costs this is the ranking of units by importance (Kwon's sort)."""
    heap: list[tuple[float, int, int, int]] = []

    def push(b: int, j: int) -> None:
        block = blocks[b]
        if j + 1 < len(block.counts):
            dc = block.costs[j + 1] - block.costs[j]
            dv = block.values[j + 1] - block.values[j]
            heapq.heappush(heap, (-dv / max(dc, 1e-300), b, j + 1, 0))

    for b, block in enumerate(blocks):
        if block.kind == kind:
            push(b, 0)
    steps = []
    while heap:
        _, b, j, _ = heapq.heappop(heap)
        block = blocks[b]
        steps.append((b, j, block.costs[j] - block.costs[j - 1], block.values[j] - block.values[j - 1]))
        push(b, j)
    return steps


def mask_search(blocks: list[SearchBlock], budget: float) -> list[int]:
    """Kwon Algorithm 1: the kept count of every block, with total cost at most ``budget``.

    ``budget`` is what the blocks may cost together (above their cost at count 0). Head steps and
    neuron steps are each ranked by importance per cost (by importance alone when unit costs are
    equal, as in Kwon's setting); for every number ``n`` of head steps taken, the longest prefix of
    neuron steps that fits the rest of the budget is added, and the ``n`` keeping the most
    importance wins (ties: fewer heads). Slack left by a coarse step (unequal costs, ``round_to``)
    is then refilled with the next steps that still fit. Returns the kept count of every block.
    """
    heads = _ordered_steps(blocks, "heads")
    neurons = _ordered_steps(blocks, "neurons")
    n_cost = torch.tensor([0.0] + [s[2] for s in neurons], dtype=torch.float64).cumsum(0)
    n_value = torch.tensor([0.0] + [s[3] for s in neurons], dtype=torch.float64).cumsum(0)
    best_n, best_k, best_value = -1, 0, -float("inf")
    h_cost = h_value = 0.0
    for n in range(len(heads) + 1):
        if n > 0:
            h_cost += heads[n - 1][2]
            h_value += heads[n - 1][3]
        left = budget - h_cost
        if left < 0:
            break
        k = int(torch.searchsorted(n_cost, torch.tensor([left], dtype=torch.float64), right=True)) - 1
        value = h_value + float(n_value[k])
        if value > best_value:
            best_n, best_k, best_value = n, k, value
    if best_n < 0:
        return [0] * len(blocks)
    position = [0] * len(blocks)
    spent = 0.0
    for b, j, dc, _ in heads[:best_n] + neurons[:best_k]:
        position[b] = j
        spent += dc
    # refill: later steps that still fit, each block's steps in order
    blocked: set[int] = set()
    for b, j, dc, _ in neurons[best_k:] + heads[best_n:]:
        if b in blocked or j != position[b] + 1:
            blocked.add(b)
            continue
        if spent + dc <= budget:
            position[b] = j
            spent += dc
        else:
            blocked.add(b)
    return [block.counts[position[b]] for b, block in enumerate(blocks)]


def pruning_loss(fisher: torch.Tensor, pruned: torch.Tensor | list[int]) -> float:
    """``½ 1_Pᵀ F 1_P``: the Fisher estimate of the loss increase when the units ``P`` go."""
    idx = torch.as_tensor(pruned, dtype=torch.long)
    return 0.5 * float(fisher.to(torch.float64)[idx][:, idx].sum())


def rearrange(fisher: torch.Tensor, keep: int, groups: int = 1) -> torch.Tensor:
    """Kwon Algorithm 2: which ``keep`` units of a layer to keep, from its Fisher block ``F``.

    Starts from the diagonal choice (prune the units of least ``F_ii``), then visits the other units
    in ascending ``F_ii``: each joins the pruned set ``P`` and the member of ``P`` whose removal
    leaves the smallest ``1_Pᵀ F 1_P`` leaves again (possibly the newcomer), so the estimate never
    increases. With ``groups > 1`` (grouped-query heads: equal contiguous groups that keep equal
    counts) a newcomer can only displace a unit of its own group. Returns the kept indices, sorted.
    """
    f = fisher.to(torch.float64).cpu()
    width = f.shape[0]
    if f.shape != (width, width) or width % groups or keep % groups or not 0 <= keep <= width:
        raise ValueError(f"cannot keep {keep} of {width} units in {groups} equal groups")
    per, drop = width // groups, (width - keep) // groups
    diag = torch.diagonal(f)
    group_of = torch.arange(width) // per
    pruned = torch.zeros(width, dtype=torch.bool)
    rest: list[int] = []
    for g in range(groups):
        members = torch.arange(g * per, (g + 1) * per)
        ranked = members[torch.argsort(diag[members], stable=True)]
        pruned[ranked[:drop]] = True
        rest += ranked[drop:].tolist()
    if 0 < drop < per:
        rest.sort(key=lambda i: (float(diag[i]), i))
        pull = f[pruned].sum(dim=0)  # (F 1_P)_i; F is symmetric, and its rows are contiguous
        for j in rest:
            pull += f[j]
            pruned[j] = True
            # removing r from P ∪ {j} lowers 1ᵀF1 by 2 (F 1_P)_r − F_rr: remove the largest drop
            candidates = torch.nonzero(pruned & (group_of == group_of[j])).flatten()
            gain = 2.0 * pull[candidates] - diag[candidates]
            r = int(candidates[int(torch.argmax(gain))])
            if float(gain.max()) <= float(2.0 * pull[j] - diag[j]):
                r = j  # ties keep the current choice
            pruned[r] = False
            pull -= f[r]
    return torch.nonzero(~pruned).flatten()


def nested_losses(fisher: torch.Tensor, order: torch.Tensor, step: int = 1) -> torch.Tensor:
    """``½ 1_Pᵀ F 1_P`` with ``P = order[r·step:]`` for ``r = 0 … len(order)/step``."""
    f = fisher.to(torch.float64).cpu()
    order = torch.as_tensor(order, dtype=torch.long)
    pull = f.sum(dim=0)
    loss = float(f.sum())
    losses = [0.5 * loss]
    for start in range(0, order.numel(), step):
        for j in order[start : start + step].tolist():
            loss -= 2.0 * float(pull[j]) - float(f[j, j])
            pull -= f[j]
        losses.append(0.5 * max(loss, 0.0))
    losses[-1] = 0.0
    return torch.tensor(losses, dtype=torch.float64)


@dataclass(frozen=True)
class MaskTuning:
    """Least-squares mask values of the kept units and the layer error before and after.

    Errors are ``Σ_tokens ‖W_S diag(m) z_S − W z‖²`` (``error_plain`` with ``m = 1``, i.e. plain
    removal), and ``total = Σ_tokens ‖W z‖²``.
    """

    scales: torch.Tensor  # (kept units,) float64
    error_plain: float
    error_tuned: float
    total: float


def tune_mask_scales(
    gram: torch.Tensor,
    weight: torch.Tensor,
    kept: torch.Tensor,
    block: int = 1,
    ridge: float = 1e-10,
) -> MaskTuning:
    """Kwon's mask tuning: ``m = argmin Σ_t ‖W_S diag(m ⊗ 1_block) z_S − W z‖²`` over the tokens.

    ``gram = ZᵀZ`` of the input ``z`` of the linear map ``weight`` (d x m, no bias term), ``kept``
    the kept columns (whole units of ``block`` consecutive columns, e.g. a head's ``head_dim``).
    With ``M = WᵀW`` the normal equations are ``(G_SS ∘ M_SS) m = [(G ∘ M) 1]_S``, block-summed to
    one unknown per unit; a tiny ridge (relative to the mean diagonal) keeps them solvable when
    units are collinear. Nothing is clamped; fold the result as ``W_S diag(m)``.
    """
    g = gram.to(torch.float64)
    w = weight.to(device=g.device, dtype=torch.float64)
    kept = kept.to(g.device)
    m = g.shape[0]
    if g.shape != (m, m) or w.shape[1] != m or kept.numel() % block:
        raise ValueError("gram must be m x m, weight d x m, kept whole units of block columns")
    units = kept.numel() // block
    metric_rows = w[:, kept].T @ w  # M_S: (|S| x m)
    total = float((g * (w.T @ w)).sum())
    if units == 0:
        empty = torch.zeros(0, dtype=torch.float64)
        return MaskTuning(empty, total, total, total)
    prod = g[kept] * metric_rows  # (G ∘ M)_S:
    rhs = prod.sum(dim=1).reshape(units, block).sum(dim=1)
    system = prod[:, kept].reshape(units, block, units, block).sum(dim=(1, 3))
    system = 0.5 * (system + system.T)
    ones = torch.ones(units, dtype=torch.float64, device=g.device)
    plain = total - 2.0 * float(ones @ rhs) + float(ones @ system @ ones)
    scale = float(torch.diagonal(system).mean())
    if scale <= 0.0:
        return MaskTuning(ones.cpu(), plain, plain, total)
    eye = torch.eye(units, dtype=torch.float64, device=g.device)
    solution = None
    for attempt in range(4):
        chol, info = torch.linalg.cholesky_ex(system + (ridge * 100**attempt) * scale * eye)
        if int(info) == 0:
            solution = torch.cholesky_solve(rhs[:, None], chol)[:, 0]
            break
    if solution is None:
        solution = torch.linalg.lstsq(system.cpu(), rhs.cpu()[:, None], driver="gelsd").solution[:, 0]
        solution = solution.to(g.device)
    tuned = total - 2.0 * float(solution @ rhs) + float(solution @ system @ solution)
    return MaskTuning(solution.cpu(), plain, max(tuned, 0.0), total)
