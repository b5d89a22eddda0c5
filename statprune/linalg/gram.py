"""Streaming second-moment statistics of activation matrices.

The interpolative decomposition of an activation matrix ``Z`` (N tokens x m units) only needs
``ZᵀZ`` and the column means, so calibration data is streamed batch by batch into an m x m Gram
matrix (memory O(m²) instead of O(N·m)), as SparseGPT's ``add_batch`` does.

Row blocks are buffered until a few thousand rows have arrived and then multiplied in one go:
the cost of a Gram update is dominated by touching the m x m result (and converting it to
float64), not by the multiplication, when the blocks are thin.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy.linalg import blas


@dataclass(frozen=True)
class GramStats:
    """Finished statistics of an N x m activation matrix ``Z`` (float64)."""

    gram: torch.Tensor  # ZᵀZ, m x m
    total: torch.Tensor  # column sums of Z, m
    count: int  # N, the number of rows (tokens)

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)

    def diagonal(self) -> torch.Tensor:
        """``diag(ZᵀZ)`` (m,), the squared column norms."""
        return torch.diagonal(self.gram)

    def second_moment(self, centered: bool) -> torch.Tensor:
        """``ZᵀZ`` or, when ``centered``, ``(Z - 1μᵀ)ᵀ(Z - 1μᵀ)``: the Gram the ID factorizes.

        Centering is the "intercept" variant: the next layer's bias absorbs the mean of what is
        removed, so only the fluctuation around the mean has to be reconstructed. Callers must not
        modify the result (uncentered, it is ``gram`` itself).
        """
        if not centered:
            return self.gram
        mu = self.mean
        cov = torch.outer(mu, mu)  # exactly symmetric, so the result stays exactly symmetric
        return cov.mul_(-float(self.count)).add_(self.gram)


class GramAccumulator:
    """Accumulates ``ZᵀZ`` and column sums of row batches of ``Z``.

    ``compute_dtype`` is the precision of each block product (float32 is fast and, for blocks of
    a few thousand rows, accurate to ~1e-6 relative); the running sum is always float64. Rows are
    buffered until ``block_rows`` have arrived (at least ``width``), then multiplied at once.
    """

    def __init__(
        self,
        width: int,
        device: torch.device | str = "cpu",
        compute_dtype: torch.dtype = torch.float32,
        block_rows: int = 4096,
    ) -> None:
        self.width = width
        self.device = torch.device(device)
        self.compute_dtype = compute_dtype
        self.block_rows = max(block_rows, width)
        self._gram = torch.zeros(width, width, dtype=torch.float64, device=self.device)
        self._total = torch.zeros(width, dtype=torch.float64, device=self.device)
        self._count = 0
        self._pending: list[torch.Tensor] = []
        self._pending_rows = 0
        self._upper_only = False  # CPU blocks use SYRK, which fills the upper triangle only
        self._finished: GramStats | None = None

    def add_batch(self, rows: torch.Tensor) -> None:
        """Add an (n x m) block of rows. Non-finite values raise ``FloatingPointError``."""
        if rows.ndim != 2 or rows.shape[1] != self.width:
            raise ValueError(f"expected rows of width {self.width}, got shape {tuple(rows.shape)}")
        if self._finished is not None:
            raise RuntimeError("this accumulator is finished; start a new one")
        if rows.shape[0] == 0:
            return
        block = rows.to(device=self.device, dtype=self.compute_dtype)
        column_sums = block.sum(dim=0, dtype=torch.float64)
        if not torch.isfinite(column_sums).all():  # a NaN or Inf anywhere reaches its column sum
            raise FloatingPointError("activations contain NaN or Inf")
        self._total += column_sums
        self._count += rows.shape[0]
        self._pending.append(block)
        self._pending_rows += block.shape[0]
        if self._pending_rows >= self.block_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        block = self._pending[0] if len(self._pending) == 1 else torch.cat(self._pending)
        self._pending, self._pending_rows = [], 0
        if block.device.type == "cpu" and block.dtype in (torch.float32, torch.float64):
            syrk = blas.ssyrk if block.dtype == torch.float32 else blas.dsyrk
            # ZᵀZ at half the cost of a GEMM; Zᵀ of a row-major array is column-major: no copy
            upper = syrk(1.0, block.contiguous().numpy().T, trans=0, lower=0)
            self._gram += torch.from_numpy(upper)
            self._upper_only = True
        else:
            self._gram += block.T @ block

    @property
    def count(self) -> int:
        return self._count

    def finish(self) -> GramStats:
        """The statistics (ends accumulation; the running sum becomes the result, no copy)."""
        if self._finished is None:
            self._flush()
            gram = self._gram
            if self._upper_only:
                gram.triu_()
                gram += torch.triu(gram, diagonal=1).T
            else:
                gram.add_(gram.T.clone()).mul_(0.5)
            self._finished = GramStats(gram=gram, total=self._total, count=self._count)
        return self._finished


@dataclass(frozen=True)
class CrossStats:
    """Finished statistics of the pairs ``(Z, Y)``: ``ZᵀY`` and the column sums of ``Y``."""

    cross: torch.Tensor  # ZᵀY, m x d
    total: torch.Tensor  # column sums of Y, d
    count: int

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)


class CrossAccumulator:
    """Accumulates ``ZᵀY`` for row batches of activations ``Z`` (n x m) and targets ``Y`` (n x d).

    The targets are what a corrected next layer should output on those rows (e.g. the original
    model's block output), so the correction can be solved from streamed sums alone.
    """

    def __init__(
        self,
        width: int,
        out_width: int,
        device: torch.device | str = "cpu",
        compute_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.width, self.out_width = width, out_width
        self.device = torch.device(device)
        self.compute_dtype = compute_dtype
        self._cross = torch.zeros(width, out_width, dtype=torch.float64, device=self.device)
        self._total = torch.zeros(out_width, dtype=torch.float64, device=self.device)
        self._count = 0

    def add_batch(self, rows: torch.Tensor, targets: torch.Tensor) -> None:
        """Add n rows of activations and their n target rows."""
        if rows.ndim != 2 or rows.shape[1] != self.width or targets.shape != (rows.shape[0], self.out_width):
            raise ValueError(
                f"expected n x {self.width} rows and n x {self.out_width} targets, "
                f"got {tuple(rows.shape)} and {tuple(targets.shape)}"
            )
        y = targets.to(device=self.device, dtype=self.compute_dtype)
        sums = y.sum(dim=0, dtype=torch.float64)
        if not torch.isfinite(sums).all():
            raise FloatingPointError("targets contain NaN or Inf")
        self._total += sums
        self._count += rows.shape[0]
        self._cross += (rows.to(device=self.device, dtype=self.compute_dtype).T @ y).double()

    def finish(self) -> CrossStats:
        return CrossStats(cross=self._cross, total=self._total, count=self._count)
