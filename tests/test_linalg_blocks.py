"""Block-diagonal Grams (``statprune.linalg.blocks``): the block-wise ID and correction equal the
dense ones, and never allocate the dense square. Matrices only, no models."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from statprune.linalg import (
    CrossStats,
    GramStats,
    fit_to_targets,
    fold_correction,
    interpolation_matrix,
    interpolative,
)
from statprune.linalg.blocks import BlockDiagonalGram, fit_blockwise, select_columns_blockwise
from statprune.linalg.interpolative import pivoted_cholesky, select_columns
from statprune.moe import pin_selection


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def blocks(widths, ranks, seed=0, zero=(), out_width=0) -> BlockDiagonalGram:
    """PSD blocks ``Z_bᵀZ_b`` with ``Z_b`` of ``ranks[b]`` rows (``zero``: all-zero blocks),
    and with ``out_width``, also ``CrossStats`` of ``ZᵀΔ`` for random targets Δ."""
    gen = torch.Generator().manual_seed(seed)
    out, cross = [], []
    for b, (w, r) in enumerate(zip(widths, ranks, strict=True)):
        z = torch.randn(r, w, generator=gen, dtype=torch.float64) * (1 + b)
        z = torch.zeros_like(z) if b in zero else z
        out.append(z.T @ z)
        cross.append(z.T @ torch.randn(r, out_width, generator=gen, dtype=torch.float64))
    m = sum(widths)
    gram = BlockDiagonalGram(blocks=tuple(out), total=torch.zeros(m, dtype=torch.float64), count=50)
    if not out_width:
        return gram
    total = torch.randn(out_width, generator=gen, dtype=torch.float64)
    return gram, CrossStats(cross=torch.cat(cross), total=total, count=50)


CASES = {
    "full rank": ((6, 5, 7, 4), (40, 40, 40, 40), ()),
    "rank-deficient": ((8, 6, 9), (3, 6, 2), ()),
    "zero-width": ((5, 0, 7, 0, 3), (20, 0, 20, 0, 20), ()),
    "zero block": ((6, 6, 6), (30, 30, 30), (1,)),
    "one block": ((9,), (4,), ()),
}


def assert_same_selection(block, dense):
    assert block.rank == dense.rank
    r = dense.rank
    assert torch.equal(block.order[:r], dense.order[:r])
    assert sorted(block.order[r:].tolist()) == sorted(dense.order[r:].tolist())
    scale = max(float(dense.errors[0]), 1e-300)
    torch.testing.assert_close(block.errors, dense.errors, rtol=1e-10, atol=1e-12 * scale)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("backend", ["lapack", "torch"])
def test_blockwise_selection_equals_dense(case, scaled, backend, monkeypatch):
    """``torch``: the column-by-column factorization used off the CPU, run on the CPU here."""
    if backend == "torch":
        monkeypatch.setattr(
            interpolative,
            "_pivoted_cholesky_lapack",
            lambda g, tol, _: interpolative._pivoted_cholesky_torch(g, tol),
        )
    widths, ranks, zero = CASES[case]
    gram = blocks(widths, ranks, zero=zero)
    scale = torch.rand(gram.width, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    scale = scale + 0.5 if scaled else None
    dense = select_columns(gram.gram, scale)
    assert_same_selection(select_columns_blockwise(gram, scale), dense)


def test_the_dense_greedy_is_a_merge_of_each_blocks_own_greedy():
    """The claim the block-wise ID rests on (``statprune.linalg.blocks``): in the dense run each
    block's pivots come in that block's own greedy order, with non-increasing pivot values."""
    gram = blocks((7, 5, 8), (7, 3, 8), seed=4)
    perm, factor = pivoted_cholesky(gram.gram)
    values = torch.diagonal(factor) ** 2
    for block, start in zip(gram.blocks, gram.offsets, strict=True):
        w = block.shape[0]
        inside = (perm[: factor.shape[1]] >= start) & (perm[: factor.shape[1]] < start + w)
        own, own_factor = pivoted_cholesky(block)
        assert torch.equal(perm[: factor.shape[1]][inside] - start, own[: own_factor.shape[1]])
        assert torch.all(values[inside][1:] <= values[inside][:-1])


def test_pinned_blocks_are_kept_first_as_with_the_dense_gram():
    """A starved expert's zeroed block, pinned (``statprune.moe.pin_selection``)."""
    gram = blocks((6, 6, 6), (30, 30, 30), zero=(1,))
    stats = type("Stats", (), {"pinned": torch.arange(6, 12)})()
    dense = pin_selection(select_columns(gram.gram), stats)
    block = pin_selection(select_columns_blockwise(gram), stats)
    assert torch.equal(block.order[:6], torch.arange(6, 12))
    assert_same_selection(block, dense)


def test_a_centered_block_gram_with_column_sums_is_refused():
    gram = blocks((3, 3), (5, 5))
    assert gram.second_moment(True) is gram
    coupled = BlockDiagonalGram(gram.blocks, torch.ones(6, dtype=torch.float64), 10)
    with pytest.raises(ValueError, match="couples its blocks"):
        coupled.second_moment(True)


def _split(m, k, seed):
    perm = torch.randperm(m, generator=torch.Generator().manual_seed(seed))
    return torch.sort(perm[:k]).values, torch.sort(perm[k:]).values


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("ridge", [0.0, 0.1])
@pytest.mark.parametrize("centered", [False, True])
def test_blockwise_correction_equals_dense(case, ridge, centered):
    widths, ranks, zero = CASES[case]
    d = 5
    gram, shift = blocks(widths, ranks, zero=zero, out_width=d)
    m, gen = gram.width, torch.Generator().manual_seed(2)
    weight = torch.randn(d, m, generator=gen, dtype=torch.float64)
    bias = torch.randn(d, generator=gen, dtype=torch.float64)
    dense = GramStats(gram=gram.gram, total=gram.total, count=gram.count)
    for k in (0, 1, m // 2, m):  # k = m // 2 leaves some blocks whole and others empty
        kept, dropped = _split(m, k, seed=k)
        g_ss = dense.gram[kept][:, kept]
        well_posed = ridge > 0 or case == "full rank"
        for b in (bias, None):
            interp = interpolation_matrix(dense.second_moment(centered), kept, dropped, ridge)
            expected = fold_correction(weight, b, kept, dropped, interp, dense.mean if centered else None)
            got = fit_blockwise(weight, b, kept, dropped, gram, None, centered, ridge)
            _assert_same_fit(got, expected, g_ss, well_posed)
            expected = fit_to_targets(weight, b, kept, dropped, dense, shift, centered, ridge)
            got = fit_blockwise(weight, b, kept, dropped, gram, shift, centered, ridge)
            _assert_same_fit(got, expected, g_ss, well_posed)


def _assert_same_fit(got, expected, g_ss, well_posed):
    """Same outputs on the data (``diff G_SS diffᵀ``), and same weights where the least-squares
    problem has one solution: with more kept columns than a block's rank and the rounding-level
    ridge, the weights differ along directions the data never takes, by rounding / ridge."""
    diff = got[0] - expected[0]
    scale = float(torch.trace(expected[0] @ g_ss @ expected[0].T)) + 1e-30
    assert float(torch.trace(diff @ g_ss @ diff.T)) <= 1e-18 * scale
    if well_posed:
        torch.testing.assert_close(got[0], expected[0], rtol=1e-9, atol=1e-10)
    assert (got[1] is None) == (expected[1] is None)
    if got[1] is not None:
        torch.testing.assert_close(got[1], expected[1], rtol=1e-9, atol=1e-10)


def test_the_blockwise_path_allocates_nothing_of_the_dense_size():
    """16 blocks of 12: nothing of 192² elements (the dense path makes several)."""
    gram = blocks((12,) * 16, (30,) * 16)
    m = gram.width
    weight = torch.randn(8, m, dtype=torch.float64)
    shift = CrossStats(cross=torch.randn(m, 8, dtype=torch.float64), total=torch.zeros(8), count=50)
    with LargestTensor() as probe:
        selection = select_columns_blockwise(gram, torch.rand(m, dtype=torch.float64) + 0.5)
        kept, dropped = selection.keep(m // 2)
        fit_blockwise(weight, None, kept, dropped, gram, shift)
    assert probe.largest < m * m // 4, probe.largest
    with LargestTensor() as probe:  # the check can fail: the dense path trips it
        select_columns(gram.gram)
    assert probe.largest >= m * m
