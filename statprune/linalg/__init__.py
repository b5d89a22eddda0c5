"""Pure linear algebra for STAT: streaming Gram statistics, pivoted factorizations and corrections.

Nothing here knows about ``torch.nn`` modules: every function takes and returns plain tensors.
"""

from statprune.linalg.blocks import BlockDiagonalGram, fit_blockwise, select_columns_blockwise
from statprune.linalg.gram import CrossAccumulator, CrossStats, GramAccumulator, GramStats
from statprune.linalg.heads import HeadSelection, select_heads
from statprune.linalg.interpolative import (
    InterpolativeDecomposition,
    fit_to_targets,
    fold_correction,
    interpolation_matrix,
    pivoted_cholesky,
    select_columns,
)

__all__ = [
    "BlockDiagonalGram",
    "CrossAccumulator",
    "CrossStats",
    "GramAccumulator",
    "GramStats",
    "HeadSelection",
    "InterpolativeDecomposition",
    "fit_blockwise",
    "fit_to_targets",
    "fold_correction",
    "interpolation_matrix",
    "pivoted_cholesky",
    "select_columns",
    "select_columns_blockwise",
    "select_heads",
]
