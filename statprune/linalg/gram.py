"""Streaming second-moment statistics of activation matrices.

The interpolative decomposition of an activation matrix ``Z`` (N tokens x m units) only needs
``ZᵀZ`` and the column means, so calibration data is streamed batch by batch into an m x m Gram
matrix (memory O(m²) instead of O(N·m)), as SparseGPT's ``add_batch`` does.
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

    def second_moment(self, centered: bool) -> torch.Tensor:
        """``ZᵀZ`` or, when ``centered``, ``(Z - 1μᵀ)ᵀ(Z - 1μᵀ)``: the Gram the ID factorizes.

        Centering is the "intercept" variant: the next layer's bias absorbs the mean of what is
        removed, so only the fluctuation around the mean has to be reconstructed.
        """
        if not centered:
            return self.gram
        mu = self.mean
        cov = self.gram - self.count * torch.outer(mu, mu)
        return 0.5 * (cov + cov.T)


class GramAccumulator:
    """Accumulates ``ZᵀZ`` and column sums of row batches of ``Z``.

    ``compute_dtype`` is the precision of each batch product (float32 is fast and, for batches of
    a few thousand rows, accurate to ~1e-6 relative); the running sum is always float64.
    """

    def __init__(
        self,
        width: int,
        device: torch.device | str = "cpu",
        compute_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.width = width
        self.device = torch.device(device)
        self.compute_dtype = compute_dtype
        self._gram = torch.zeros(width, width, dtype=torch.float64, device=self.device)
        self._total = torch.zeros(width, dtype=torch.float64, device=self.device)
        self._count = 0
        self._upper_only = False  # CPU batches use SYRK, which fills the upper triangle only

    def add_batch(self, rows: torch.Tensor) -> None:
        """Add an (n x m) block of rows. Non-finite values raise ``FloatingPointError``."""
        if rows.ndim != 2 or rows.shape[1] != self.width:
            raise ValueError(f"expected rows of width {self.width}, got shape {tuple(rows.shape)}")
        if rows.shape[0] == 0:
            return
        block = rows.to(device=self.device, dtype=self.compute_dtype)
        if not torch.isfinite(block).all():
            raise FloatingPointError("activations contain NaN or Inf")
        if block.device.type == "cpu" and block.dtype in (torch.float32, torch.float64):
            syrk = blas.ssyrk if block.dtype == torch.float32 else blas.dsyrk
            # ZᵀZ at half the cost of a GEMM; Zᵀ of a row-major array is column-major: no copy
            upper = syrk(1.0, block.contiguous().numpy().T, trans=0, lower=0)
            self._gram += torch.from_numpy(upper).to(torch.float64)
            self._upper_only = True
        else:
            self._gram += (block.T @ block).to(torch.float64)
        self._total += block.sum(dim=0, dtype=torch.float64)
        self._count += rows.shape[0]

    @property
    def count(self) -> int:
        return self._count

    def finish(self) -> GramStats:
        if self._upper_only:
            upper = torch.triu(self._gram)
            gram = upper + torch.triu(upper, diagonal=1).T
        else:
            gram = 0.5 * (self._gram + self._gram.T)
        return GramStats(gram=gram, total=self._total.clone(), count=self._count)
