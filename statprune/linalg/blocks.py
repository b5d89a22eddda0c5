"""Block-diagonal Gram matrices: the interpolative decomposition and its correction, block by block.

When the columns of ``Z = [Z_1 … Z_B]`` fall into groups that are never compared (the routed
experts of a mixture-of-experts layer, ``statprune.moe``), the Gram the ID factorizes is
block-diagonal, ``G = diag(G_1, …, G_B)`` with ``G_b = Z_bᵀZ_b`` (w_b × w_b). Storing the blocks
costs ``Σ w_b²`` numbers instead of ``(Σ w_b)²``, and everything the ID needs decomposes:

* Greedy (diagonal) pivoted Cholesky, whose pivots are those of the column-pivoted QR of ``Z``
  (Golub & Van Loan, *Matrix Computations*, 4th ed., §5.4.2; Higham, "Cholesky factorization",
  WIREs Comp. Stat. 2009, on ``dpstrf``; ``statprune.linalg.interpolative``), picks at each step
  the column with the largest residual diagonal, then subtracts the rank-one Schur update
  ``l lᵀ`` of that column. Its ``l`` is zero outside the pivot's block (``G`` has no entries
  there), so the other blocks' residuals are untouched: the dense run is, step by step, the run of
  whichever block holds the largest remaining residual. Within one block the residual diagonal
  only shrinks and the pivot is the largest remaining one, so each block's pivot values are
  non-increasing along its own sequence. Hence the dense greedy order is the merge of every
  block's own greedy order by pivot value, largest first (ties aside), and its truncation error
  ``trace(G) − Σ_{kept pivots} ‖l_j‖²`` is the sum of the blocks' errors at their merged counts.
  ``tests/test_linalg_blocks.py`` checks all of it against the dense factorization.
* The least-squares interpolation ``T = (G_SS + λI)⁻¹ G_SD`` is block-diagonal as well (``G_SS``
  is), so the correction ``W_new = W[:, S] + W[:, D] Tᵀ`` of each block's columns uses only that
  block's kept and dropped columns; the ridge ``λ`` is the same as the dense solve's (relative
  to the mean diagonal of all of ``G_SS``), so the results agree to rounding.

Nothing here allocates a ``Σw × Σw`` matrix, except :attr:`BlockDiagonalGram.gram` (tests and
small layers only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from statprune.linalg.gram import CrossStats
from statprune.linalg.interpolative import (
    RIDGE_FLOOR,
    InterpolativeDecomposition,
    error_curve,
    pivoted_cholesky,
    spd_solve,
)

PIVOT_REL_TOL = 1e-13  # pivoted_cholesky's default: relative to the largest diagonal of all of G


@dataclass(frozen=True)
class BlockDiagonalGram:
    """Finished statistics of ``Z = [Z_1 … Z_B]`` (N × m, m = Σ w_b) whose Gram is block-diagonal.

    The stand-in for :class:`~statprune.linalg.gram.GramStats` when the blocks are never
    compared: ``blocks[b]`` is ``Z_bᵀZ_b`` (w_b × w_b, float64; a zero-width block is 0 × 0),
    ``total`` the column sums of ``Z`` (m,), ``count`` N. Memory ``8 Σ w_b²`` bytes.
    """

    blocks: tuple[torch.Tensor, ...]
    total: torch.Tensor
    count: int

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(int(b.shape[0]) for b in self.blocks)

    @property
    def width(self) -> int:
        return sum(self.widths)

    @property
    def offsets(self) -> list[int]:
        """Index of each block's first column in the concatenation (B,)."""
        starts, start = [], 0
        for w in self.widths:
            starts.append(start)
            start += w
        return starts

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)

    def diagonal(self) -> torch.Tensor:
        """``diag(ZᵀZ)`` (m,)."""
        parts = [torch.diagonal(b) for b in self.blocks]
        return torch.cat(parts) if parts else self.total.new_zeros(0)

    def second_moment(self, centered: bool) -> BlockDiagonalGram:
        """Itself. Centering by the mean of all tokens adds a rank-one term that couples the
        blocks: ``ValueError`` when asked for with nonzero column sums (the MoE statistics have
        none: ``statprune.moe``)."""
        if centered and bool(torch.any(self.total != 0)):
            raise ValueError("centering a block-diagonal Gram couples its blocks; use uncentered statistics")
        return self

    @property
    def gram(self) -> torch.Tensor:
        """The dense m × m matrix: ``8 m²`` bytes, for tests and small layers only."""
        if not self.blocks:
            return self.total.new_zeros(0, 0)
        return torch.block_diag(*self.blocks)


def _local(indices: torch.Tensor, start: int, width: int) -> torch.Tensor:
    """The entries of sorted global ``indices`` inside ``[start, start + width)``, made local."""
    lo = int(torch.searchsorted(indices, start))
    hi = int(torch.searchsorted(indices, start + width))
    return indices[lo:hi] - start


def select_columns_blockwise(
    gram: BlockDiagonalGram, scale: torch.Tensor | None = None, rel_tol: float = PIVOT_REL_TOL
) -> InterpolativeDecomposition:
    """:func:`~statprune.linalg.interpolative.select_columns` of the block-diagonal matrix, one
    block at a time (the merge in the module doc).

    ``scale`` (m,) weights column j as there. Returns the same ``InterpolativeDecomposition``:
    ``order`` (m,) over the concatenated column indices, ``errors`` (m + 1,) and ``rank`` (the
    pivots above ``rel_tol`` × the largest scaled diagonal of all blocks, as the dense run). The
    columns past the rank (zero residual) follow, block by block. Memory: one block at a time.
    """
    m, offsets = gram.width, gram.offsets
    s = None if scale is None else scale.to(torch.float64)
    if s is not None and s.shape != (m,):
        raise ValueError(f"expected a scale of shape ({m},), got {tuple(s.shape)}")
    diag = gram.diagonal().to(torch.float64)
    if s is not None:
        diag = diag * (s.to(diag.device) ** 2)
    global_max = float(diag.max()) if m else 0.0
    pivots, values, gains, tail, total = [], [], [], [], 0.0
    for block, start in zip(gram.blocks, offsets, strict=True):
        w = block.shape[0]
        if w == 0:
            continue
        g = block.to(torch.float64)
        if s is not None:  # a scaled copy (factorized in place)
            sb = s[start : start + w].to(g.device)
            g = g * torch.outer(sb, sb)
        else:
            g = g.clone()
        block_diag = torch.diagonal(g)
        total += float(block_diag.sum())
        block_max = float(block_diag.max())
        if block_max <= 0.0 or global_max <= 0.0:
            tail.append(torch.arange(w) + start)
            continue
        perm, factor = pivoted_cholesky(g, rel_tol=rel_tol * global_max / block_max, overwrite=True)
        rank = factor.shape[1]
        perm = perm.cpu() + start
        pivots.append(perm[:rank])
        tail.append(perm[rank:])
        factor = factor.cpu()
        # the residual diagonal at each pivot (the greedy's key) and the error it removes
        value = torch.diagonal(factor[:rank]) ** 2
        values.append(torch.cummin(value, dim=0).values)  # non-increasing, as in exact arithmetic
        gains.append(torch.linalg.vector_norm(factor, dim=0) ** 2)
        del g, factor
    if pivots:
        value, gain, pivot = torch.cat(values), torch.cat(gains), torch.cat(pivots)
        merged = torch.sort(-value, stable=True).indices  # largest first; ties: the earlier block
        pivot, gain = pivot[merged], gain[merged]
    else:
        pivot, gain = torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64)
    order = torch.cat([pivot, *tail]) if tail else pivot
    return InterpolativeDecomposition(order=order, errors=error_curve(total, gain, m), rank=pivot.numel())


def fit_blockwise(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    kept: torch.Tensor,
    dropped: torch.Tensor,
    gram: BlockDiagonalGram,
    shift: CrossStats | None = None,
    centered: bool = False,
    ridge: float = RIDGE_FLOOR,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The next layer ``y = W z + b`` (``weight`` d × m) corrected for keeping the columns
    ``kept`` (sorted, k) and dropping ``dropped`` (sorted), block by block.

    Without ``shift``: :func:`~statprune.linalg.interpolative.interpolation_matrix` folded by
    :func:`~statprune.linalg.interpolative.fold_correction`, ``W[:, S] + W[:, D] Tᵀ``. With
    ``shift`` (``ZᵀΔ``, m × d: rows in the concatenated order): the refit toward the targets of
    :func:`~statprune.linalg.interpolative.fit_to_targets`, plus ``G_SS⁻¹ Z_SᵀΔ``. ``centered``
    (only for statistics without column sums, see :meth:`BlockDiagonalGram.second_moment`)
    creates the bias those functions create. ``ridge`` as there, relative to the mean diagonal
    of all of ``G_SS``. Returns ``(W_new (d × k), b')`` in float64, equal to the dense functions'
    to rounding; ``ValueError`` if the indices do not cover the m columns.
    """
    gram.second_moment(centered)  # the ValueError for centered statistics with column sums
    w = weight.to(torch.float64)
    dev = w.device
    kept, dropped = kept.cpu(), dropped.cpu()
    m = gram.width
    if kept.numel() + dropped.numel() != m or w.shape[1] != m:
        raise ValueError(f"{kept.numel()} kept + {dropped.numel()} dropped columns for a width of {m}")
    diag = gram.diagonal()
    lam_scale = float(diag[kept.to(diag.device)].mean()) if kept.numel() else 0.0
    new_weight = w.new_zeros(w.shape[0], kept.numel())
    column = 0
    for block, start in zip(gram.blocks, gram.offsets, strict=True):
        width = block.shape[0]
        s, d = _local(kept, start, width), _local(dropped, start, width)
        if s.numel() == 0:
            continue
        g = block.to(torch.float64)
        s_dev, d_dev = s.to(g.device), d.to(g.device)
        g_ss = g[s_dev][:, s_dev]
        rhs = [g[s_dev][:, d_dev]]
        if shift is not None:
            rhs.append(shift.cross[(start + s).to(shift.cross.device)].to(g.device, torch.float64))
        solved = spd_solve(g_ss, torch.cat(rhs, dim=1), ridge, scale=lam_scale).to(dev)
        interp = solved[:, : d.numel()]
        part = w[:, (start + s).to(dev)] + w[:, (start + d).to(dev)] @ interp.T
        if shift is not None:
            part = part + solved[:, d.numel() :].T
        new_weight[:, column : column + s.numel()] = part
        column += s.numel()
    new_bias = None if bias is None else bias.to(dev, torch.float64).clone()
    if centered:  # zero column means (second_moment above): the dense bias terms reduce to these
        new_bias = w.new_zeros(w.shape[0]) if new_bias is None else new_bias
        if shift is not None:
            new_bias = new_bias + shift.mean.to(dev)
    return new_weight, new_bias
