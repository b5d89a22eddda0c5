"""Interpolative decomposition (ID) from a Gram matrix, and the next-layer correction.

For an activation matrix ``Z`` (N x m) and next linear map ``W`` (d x m), the ID keeps k columns
``S`` and represents the dropped columns ``D`` as ``Z[:, D] ≈ Z[:, S] T``. The pivots of a
column-pivoted QR of ``Z`` equal those of a greedy pivoted Cholesky of ``G = ZᵀZ`` (with
``R = Lᵀ``), so only the streamed Gram matrix is needed. ``T = G_SS⁻¹ G_SD`` is the least-squares
interpolation and is folded into the next layer: ``W_new = W[:, S] + W[:, D] Tᵀ``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import lapack

from statprune.linalg.gram import CrossStats, GramStats

RIDGE_FLOOR = 1e-12  # relative ridge of every solve: rounding level, grown only on failure


@dataclass(frozen=True)
class InterpolativeDecomposition:
    """Greedy column ordering of a Gram matrix and the error of every truncation.

    ``order[:k]`` are the columns kept when keeping k; ``errors[k]`` is the squared Frobenius
    residual ``‖Z[:, D] − Z[:, S] T‖²`` (in the scaled units used for pivoting) for that k, so
    ``errors[0] = trace(G)`` and ``errors[m] = 0``.
    """

    order: torch.Tensor  # (m,) int64
    errors: torch.Tensor  # (m + 1,) float64, non-increasing
    rank: int

    def keep(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept and dropped column indices (each sorted) when keeping ``k`` columns (a ``k`` with
        an ``arrange`` method, ``statprune.allocation.SplitCount``, first rearranges the order)."""
        order = k.arrange(self.order) if hasattr(k, "arrange") else self.order
        kept = torch.sort(order[:k]).values
        dropped = torch.sort(order[k:]).values
        return kept, dropped


def pivoted_cholesky(
    gram: torch.Tensor, rel_tol: float = 1e-13, overwrite: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy (diagonal) pivoted Cholesky of a symmetric PSD matrix.

    Returns ``(perm, factor)`` with ``gram[perm][:, perm] ≈ factor @ factor.T``; ``factor`` is
    m x r lower-trapezoidal, r the numerical rank (stops when the largest residual diagonal is
    below ``rel_tol · max(diag(gram))``). Uses LAPACK ``dpstrf`` on the CPU and a column-by-column
    torch implementation elsewhere (torch has no pivoted QR or Cholesky on the GPU).
    """
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"expected a square matrix, got shape {tuple(gram.shape)}")
    m = gram.shape[0]
    if m == 0:
        return torch.zeros(0, dtype=torch.long), gram.new_zeros(0, 0)
    overwrite = overwrite and gram.dtype == torch.float64 and gram.is_contiguous()
    gram = gram.to(torch.float64)
    if gram.device.type == "cpu":
        return _pivoted_cholesky_lapack(gram, rel_tol, overwrite)
    return _pivoted_cholesky_torch(gram, rel_tol)


def _pivoted_cholesky_lapack(
    gram: torch.Tensor, rel_tol: float, overwrite: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    # A symmetric row-major matrix read column-major is the same matrix: no transposing copy.
    a = gram.numpy().T if overwrite else np.array(gram.numpy().T, order="F", copy=True)
    max_diag = float(np.max(np.diag(a)))
    if max_diag <= 0.0:
        return torch.arange(gram.shape[0]), gram.new_zeros(gram.shape[0], 0)
    c, piv, rank, info = lapack.dpstrf(a, tol=rel_tol * max_diag, lower=1, overwrite_a=1)
    if info < 0:
        raise RuntimeError(f"dpstrf failed with info={info}")
    factor = torch.from_numpy(c[:, :rank])  # column-major view; its upper part is workspace
    if rank:
        factor.tril_()
    return torch.from_numpy(piv.astype(np.int64) - 1), factor


def _pivoted_cholesky_torch(gram: torch.Tensor, rel_tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    m = gram.shape[0]
    residual = torch.diagonal(gram).clone()
    tol = rel_tol * float(residual.max())
    chosen = torch.zeros(m, dtype=torch.bool, device=gram.device)
    columns = torch.zeros(m, m, dtype=torch.float64, device=gram.device)  # rows in original order
    pivots: list[torch.Tensor] = []
    for j in range(m):
        masked = torch.where(chosen, torch.full_like(residual, -1.0), residual)
        p = torch.argmax(masked)
        if j % 32 == 0 and float(masked[p]) <= tol:
            break
        pivot_value = torch.clamp(masked[p], min=0.0)
        col = gram[:, p] - columns[:, :j] @ columns[p, :j]
        col = torch.where(pivot_value > tol, col / torch.sqrt(pivot_value.clamp(min=1e-300)), 0.0)
        col = torch.where(chosen, torch.zeros_like(col), col)
        columns[:, j] = col
        residual = residual - col * col
        chosen[p] = True
        pivots.append(p)
    # drop trailing columns that were below tolerance (they are zero)
    rank = len(pivots)
    piv = torch.stack(pivots) if pivots else torch.zeros(0, dtype=torch.long, device=gram.device)
    norms = columns[:, :rank].abs().sum(dim=0)
    rank = int((norms > 0).sum()) if rank else 0
    piv = piv[:rank]
    rest = torch.ones(m, dtype=torch.bool, device=gram.device)
    rest[piv] = False
    remaining = torch.nonzero(rest).flatten()
    remaining = remaining[torch.argsort(residual[remaining], descending=True)]
    perm = torch.cat([piv, remaining])
    return perm.cpu(), columns[perm][:, :rank].contiguous()


def select_columns(gram: torch.Tensor, scale: torch.Tensor | None = None) -> InterpolativeDecomposition:
    """Order the columns of ``Z`` (given ``G = ZᵀZ``) by greedy pivoting.

    ``scale[j]`` (e.g. ``‖W[:, j]‖`` of the next layer) weights column j so that the pivoting sees
    the error after the next layer; the reported errors are in those scaled units.
    """
    g = gram.to(torch.float64)
    owned = g is not gram
    if scale is not None:
        s = scale.to(device=g.device, dtype=torch.float64)
        g = g * torch.outer(s, s)  # exactly symmetric, like the Gram itself
        owned = True
    m = g.shape[0]
    total = float(torch.diagonal(g).sum())
    perm, factor = pivoted_cholesky(g, overwrite=owned)
    rank = factor.shape[1]
    gains = torch.linalg.vector_norm(factor, dim=0).cpu() ** 2  # error removed by adding pivot j
    return InterpolativeDecomposition(order=perm.cpu(), errors=error_curve(total, gains, m), rank=rank)


def error_curve(total: float, gains: torch.Tensor, m: int) -> torch.Tensor:
    """``errors[k]`` (m + 1,) of keeping the first k of m pivots: ``total`` (the trace) minus the
    first k ``gains`` (each pivot's ``‖l_j‖²``; past the rank nothing more is removed), made
    non-increasing despite rounding, and 0 for k = m."""
    rank = gains.numel()
    errors = torch.empty(m + 1, dtype=torch.float64)
    errors[0] = total
    errors[1 : rank + 1] = total - torch.cumsum(gains, dim=0)
    errors[rank + 1 :] = errors[rank] if rank else total
    errors = torch.clamp(errors, min=0.0)
    # make non-increasing despite rounding in the cumulative sums
    errors = torch.flip(torch.cummax(torch.flip(errors, [0]), dim=0).values, [0])
    errors[m] = 0.0
    return errors


def interpolation_matrix(
    gram: torch.Tensor, kept: torch.Tensor, dropped: torch.Tensor, ridge: float = RIDGE_FLOOR
) -> torch.Tensor:
    """Least-squares ``T = argmin ‖Z_D − Z_S T‖² + λ‖T‖²`` from the Gram matrix:
    ``T = (G_SS + λ I)⁻¹ G_SD`` with ``λ = ridge`` × the mean diagonal of ``G_SS``.

    The default ridge only keeps the solve stable when kept columns are nearly collinear (it
    changes well-conditioned results at rounding level); a larger one damps the fit.
    """
    g = gram.to(torch.float64)
    kept = kept.to(g.device)
    dropped = dropped.to(g.device)
    k = kept.numel()
    if k == 0 or dropped.numel() == 0:
        return g.new_zeros(k, dropped.numel())
    g_ss = g[kept][:, kept]
    g_sd = g[kept][:, dropped]
    return spd_solve(g_ss, g_sd, ridge)


def spd_solve(
    g_ss: torch.Tensor, rhs: torch.Tensor, ridge: float = RIDGE_FLOOR, scale: float | None = None
) -> torch.Tensor:
    """``(G + λ I)⁻¹ B`` for a PSD Gram block by Cholesky, ``λ`` = ``ridge`` (at least
    :data:`RIDGE_FLOOR`) × its mean diagonal (or ``scale`` when given: the mean diagonal of a
    larger matrix ``G`` is a diagonal block of), grown only if the factorization fails; least
    squares as the last resort."""
    ridge = max(ridge, RIDGE_FLOOR)
    if scale is None:
        scale = float(torch.diagonal(g_ss).mean()) if g_ss.numel() else 0.0
    if scale <= 0.0:
        return rhs.new_zeros(g_ss.shape[0], rhs.shape[1])
    eye = torch.eye(g_ss.shape[0], dtype=g_ss.dtype, device=g_ss.device)
    for attempt in range(4):
        chol, info = torch.linalg.cholesky_ex(g_ss + (ridge * 100**attempt) * scale * eye)
        if int(info) == 0:
            return torch.cholesky_solve(rhs, chol)
    return torch.linalg.lstsq(g_ss.cpu(), rhs.cpu(), driver="gelsd").solution.to(g_ss.device)


def fold_correction(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    kept: torch.Tensor,
    dropped: torch.Tensor,
    interp: torch.Tensor,
    mean: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fold the interpolation into the next layer ``y = W z + b``.

    Returns ``(W[:, S] + W[:, D] Tᵀ, b')`` in float64. With ``mean`` (the intercept variant),
    ``b' = b + W[:, D] (μ_D − Tᵀ μ_S)`` absorbs the mean of what the kept columns cannot explain;
    then a bias is created even if the layer had none.
    """
    w = weight.to(torch.float64)
    dev = w.device
    kept, dropped = kept.to(dev), dropped.to(dev)
    t = interp.to(dev, torch.float64)
    w_kept, w_dropped = w[:, kept], w[:, dropped]
    new_weight = w_kept + w_dropped @ t.T
    new_bias = None if bias is None else bias.to(dev, torch.float64).clone()
    if mean is not None:
        mu = mean.to(dev, torch.float64)
        shift = w_dropped @ (mu[dropped] - t.T @ mu[kept])
        new_bias = shift if new_bias is None else new_bias + shift
    return new_weight, new_bias


def fit_to_targets(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    kept: torch.Tensor,
    dropped: torch.Tensor,
    gram: GramStats,
    shift: CrossStats,
    centered: bool,
    ridge: float = RIDGE_FLOOR,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Next layer refitted so the kept columns reproduce target outputs, not the layer's own.

    The targets are ``Y = Z Wᵀ + b + Δ`` on the activations ``Z`` the pruned layer will see:
    its own output moved by ``Δ`` (e.g. back to the original model's output, which pruned upstream
    layers have moved away from). ``gram`` holds ``ZᵀZ``, ``shift`` holds ``ZᵀΔ``. The least-squares
    fit ``min ‖Z_S W_newᵀ + b' − Y‖`` is the ID's :func:`fold_correction` plus ``G_SS⁻¹ Z_SᵀΔ``,
    so with ``Δ = 0`` it is exactly that correction (and rounding in ``ZᵀZ`` cannot make the two
    disagree). ``centered`` refits the bias too (intercept); otherwise it stays ``bias``.
    ``ridge`` damps the fit as in :func:`interpolation_matrix`.
    Returns ``(W_new, b')`` in float64.
    """
    second = gram.second_moment(centered).to(torch.float64)
    dev = second.device
    kept, dropped = kept.to(dev), dropped.to(dev)
    rhs = shift.cross.to(dev)[kept]
    mu = gram.mean.to(dev)[kept]
    if centered:
        rhs = rhs - float(gram.count) * torch.outer(mu, shift.mean.to(dev))
    # one factorization of G_SS serves the interpolation (G_SS⁻¹ G_SD) and the shift term
    solved = spd_solve(second[kept][:, kept], torch.cat([second[kept][:, dropped], rhs], dim=1), ridge)
    interp, delta_w = solved[:, : dropped.numel()], solved[:, dropped.numel() :].T
    new_weight, new_bias = fold_correction(
        weight, bias, kept, dropped, interp, mean=gram.mean if centered else None
    )
    new_weight = new_weight + delta_w.to(new_weight.device)
    if centered:
        delta_b = (shift.mean.to(dev) - delta_w @ mu).to(new_weight.device)
        new_bias = delta_b if new_bias is None else new_bias + delta_b
    return new_weight, new_bias
