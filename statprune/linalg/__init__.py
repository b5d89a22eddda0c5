"""Pure linear algebra for STAT: streaming Gram statistics, pivoted factorizations and corrections.

Nothing here knows about ``torch.nn`` modules: every function takes and returns plain tensors.
"""

from statprune.linalg.gram import GramAccumulator, GramStats
from statprune.linalg.heads import HeadSelection, select_heads
from statprune.linalg.interpolative import (
    InterpolativeDecomposition,
    fold_correction,
    interpolation_matrix,
    pivoted_cholesky,
    select_columns,
)

__all__ = [
    "GramAccumulator",
    "GramStats",
    "HeadSelection",
    "InterpolativeDecomposition",
    "fold_correction",
    "interpolation_matrix",
    "pivoted_cholesky",
    "select_columns",
    "select_heads",
]
