"""The linear-algebra core, tested with plain matrices against dense references."""

import numpy as np
import pytest
import scipy.linalg
import torch

from statprune.linalg import (
    CrossAccumulator,
    GramAccumulator,
    fit_to_targets,
    fold_correction,
    interpolation_matrix,
    pivoted_cholesky,
    select_columns,
    select_heads,
)
from statprune.linalg.heads import head_columns
from statprune.linalg.interpolative import _pivoted_cholesky_torch


def _random_z(n=400, m=24, seed=0, decay=True):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, m))
    if decay:  # distinct column energies make the greedy pivot order well defined
        z = z * np.linspace(3.0, 0.3, m)[None, :] + 0.5 * z[:, :1]
    return torch.from_numpy(z)


def test_gram_accumulator_matches_dense():
    z = _random_z()
    acc = GramAccumulator(z.shape[1], compute_dtype=torch.float64)
    for chunk in torch.split(z, 37):
        acc.add_batch(chunk)
    stats = acc.finish()
    assert stats.count == z.shape[0]
    torch.testing.assert_close(stats.gram, z.T @ z)
    centered = z - z.mean(dim=0)
    torch.testing.assert_close(stats.second_moment(centered=True), centered.T @ centered)


def test_gram_accumulator_rejects_non_finite():
    acc = GramAccumulator(3)
    with pytest.raises(FloatingPointError):
        acc.add_batch(torch.tensor([[1.0, float("nan"), 0.0]]))


@pytest.mark.parametrize("backend", ["lapack", "torch"])
def test_pivots_match_scipy_pivoted_qr(backend):
    z = _random_z(seed=1)
    gram = z.T @ z
    _, r_ref, piv_ref = scipy.linalg.qr(z.numpy(), mode="economic", pivoting=True)
    if backend == "lapack":
        perm, factor = pivoted_cholesky(gram)
    else:
        perm, factor = _pivoted_cholesky_torch(gram, 1e-13)
    assert perm.tolist() == piv_ref.tolist()
    # R = Lᵀ up to the signs of the rows of R
    np.testing.assert_allclose(np.abs(factor.numpy().T), np.abs(r_ref), atol=1e-8)


def test_error_curve_equals_qr_trailing_block():
    z = _random_z(seed=2)
    ident = select_columns(z.T @ z)
    _, r, piv = scipy.linalg.qr(z.numpy(), mode="economic", pivoting=True)
    assert ident.order.tolist() == piv.tolist()
    for k in (0, 3, 10, 23, 24):
        expected = np.linalg.norm(r[k:, k:]) ** 2
        assert ident.errors[k].item() == pytest.approx(expected, rel=1e-8, abs=1e-8)


def test_interpolation_residual_equals_error_curve():
    z = _random_z(seed=3)
    gram = z.T @ z
    ident = select_columns(gram)
    for k in (4, 12, 20):
        kept, dropped = ident.keep(k)
        t = interpolation_matrix(gram, kept, dropped)
        residual = torch.linalg.norm(z[:, dropped] - z[:, kept] @ t) ** 2
        assert residual.item() == pytest.approx(ident.errors[k].item(), rel=1e-6)


def test_scaled_pivoting_prefers_columns_the_next_layer_sees():
    z = _random_z(seed=4, decay=False)
    scale = torch.ones(z.shape[1], dtype=torch.float64)
    scale[7] = 100.0  # the next layer amplifies column 7: it must be picked first
    ident = select_columns(z.T @ z, scale=scale)
    assert ident.order[0].item() == 7


def test_rank_deficient_duplicates_are_exact():
    base = _random_z(n=300, m=10, seed=5)
    z = torch.cat([base, base[:, [2, 5, 7]] * 1.0, base[:, :1] * -2.0], dim=1)  # 4 dependent cols
    gram = z.T @ z
    ident = select_columns(gram)
    assert ident.rank == 10
    assert ident.errors[10].item() < 1e-9 * ident.errors[0].item()
    kept, dropped = ident.keep(10)
    t = interpolation_matrix(gram, kept, dropped)
    torch.testing.assert_close(z[:, kept] @ t, z[:, dropped], atol=1e-8, rtol=0)


def test_fold_correction_reproduces_next_layer_output():
    rng = np.random.default_rng(6)
    base = torch.from_numpy(rng.standard_normal((200, 6)))
    mix = torch.from_numpy(rng.standard_normal((6, 4)))
    z = torch.cat([base, base @ mix + 3.0], dim=1)  # last 4 columns are affine in the first 6
    w = torch.from_numpy(rng.standard_normal((5, 10)))
    b = torch.from_numpy(rng.standard_normal(5))
    y = z @ w.T + b
    acc = GramAccumulator(10, compute_dtype=torch.float64)
    acc.add_batch(z)
    stats = acc.finish()
    kept, dropped = torch.arange(6), torch.arange(6, 10)
    # without the intercept the constant offset cannot be represented ...
    t_plain = interpolation_matrix(stats.gram, kept, dropped)
    w_plain, b_plain = fold_correction(w, b, kept, dropped, t_plain)
    err_plain = torch.linalg.norm(z[:, kept] @ w_plain.T + b_plain - y)
    # ... with it (centered Gram + bias absorption) the correction is exact
    cov = stats.second_moment(centered=True)
    t = interpolation_matrix(cov, kept, dropped)
    w_new, b_new = fold_correction(w, b, kept, dropped, t, mean=stats.mean)
    torch.testing.assert_close(z[:, kept] @ w_new.T + b_new, y, atol=1e-8, rtol=1e-8)
    assert err_plain > 1e-3


def test_fold_correction_removing_everything_leaves_mean_output():
    z = _random_z(n=50, m=4, seed=7)
    w = torch.randn(3, 4, dtype=torch.float64)
    w_new, b_new = fold_correction(
        w, None, torch.zeros(0, dtype=torch.long), torch.arange(4), torch.zeros(0, 4), mean=z.mean(0)
    )
    assert w_new.shape == (3, 0)
    torch.testing.assert_close(b_new, w @ z.mean(0))


def _streamed(z, y, batch=37):
    gram = GramAccumulator(z.shape[1], compute_dtype=torch.float64)
    cross = CrossAccumulator(z.shape[1], y.shape[1], compute_dtype=torch.float64)
    for i in range(0, z.shape[0], batch):
        gram.add_batch(z[i : i + batch])
        cross.add_batch(z[i : i + batch], y[i : i + batch])
    return gram.finish(), cross.finish()


def test_cross_accumulator_matches_dense():
    z, y = _random_z(n=300, m=8, seed=8), _random_z(n=300, m=5, seed=9)
    _, cross = _streamed(z, y)
    torch.testing.assert_close(cross.cross, z.T @ y)
    torch.testing.assert_close(cross.mean, y.mean(0))
    assert cross.count == 300
    with pytest.raises(ValueError, match="targets"):
        CrossAccumulator(8, 5).add_batch(z[:10], y[:9])


@pytest.mark.parametrize("ridge", [1e-12, 0.3])
@pytest.mark.parametrize("centered", [True, False])
def test_fit_without_shift_is_the_interpolative_correction(centered, ridge):
    z = _random_z(n=300, m=10, seed=10)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4, 10, dtype=torch.float64, generator=gen)
    b = torch.randn(4, dtype=torch.float64, generator=gen)
    gram, shift = _streamed(z, torch.zeros(300, 4, dtype=torch.float64))
    kept, dropped = torch.tensor([0, 2, 3, 6, 9]), torch.tensor([1, 4, 5, 7, 8])
    t = interpolation_matrix(gram.second_moment(centered), kept, dropped, ridge)
    expected = fold_correction(w, b, kept, dropped, t, mean=gram.mean if centered else None)
    got = fit_to_targets(w, b, kept, dropped, gram, shift, centered, ridge)
    torch.testing.assert_close(got[0], expected[0], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(got[1], expected[1], atol=1e-12, rtol=1e-12)


def test_ridge_is_the_damped_least_squares_and_shrinks_the_correction():
    z = _random_z(n=200, m=12, seed=4)
    g = z.T @ z
    kept, dropped = torch.tensor([0, 3, 5, 7, 10]), torch.tensor([1, 2, 4, 6, 8, 9, 11])
    g_ss = g[kept][:, kept]
    lam = 0.2 * float(torch.diagonal(g_ss).mean())
    expected = torch.linalg.solve(g_ss + lam * torch.eye(5, dtype=g.dtype), g[kept][:, dropped])
    torch.testing.assert_close(interpolation_matrix(g, kept, dropped, 0.2), expected)
    norms = [float(torch.linalg.norm(interpolation_matrix(g, kept, dropped, r))) for r in (0, 0.1, 1, 10)]
    assert norms == sorted(norms, reverse=True) and norms[-1] < 0.2 * norms[0]


def test_ridge_beats_the_exact_fit_out_of_sample_when_calibration_is_thin():
    # 40 noisy samples for 30 kept columns: the exact least squares fits the noise; a damped one
    # reconstructs fresh samples from the same distribution better (and the calibration ones worse)
    rng = np.random.default_rng(3)
    mix = rng.standard_normal((8, 40))

    def draw(n):
        return torch.from_numpy(rng.standard_normal((n, 8)) @ mix + 0.5 * rng.standard_normal((n, 40)))

    calib, fresh = draw(40), draw(20000)
    kept, dropped = torch.arange(30), torch.arange(30, 40)

    def residual(z, t):
        return float(torch.linalg.norm(z[:, dropped] - z[:, kept] @ t) ** 2 / z.shape[0])

    exact = interpolation_matrix(calib.T @ calib, kept, dropped)
    damped = interpolation_matrix(calib.T @ calib, kept, dropped, 0.1)
    assert residual(fresh, damped) < 0.8 * residual(fresh, exact)
    assert residual(calib, damped) > residual(calib, exact)


def test_fit_to_targets_reproduces_outputs_the_kept_columns_explain():
    # targets that the layer's own output misses (as when upstream pruning moved the activations)
    # but that are affine in the kept columns are hit exactly, unlike by the ID's fold alone
    z = _random_z(n=400, m=9, seed=11)
    kept, dropped = torch.tensor([0, 1, 4, 5, 8]), torch.tensor([2, 3, 6, 7])
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(6, 5, dtype=torch.float64, generator=gen)
    c = torch.randn(6, dtype=torch.float64, generator=gen)
    w = torch.randn(6, 9, dtype=torch.float64, generator=gen)
    b = torch.randn(6, dtype=torch.float64, generator=gen)
    y = z[:, kept] @ a.T + c
    gram, shift = _streamed(z, y - (z @ w.T + b))
    for centered in (True, False):
        new_w, new_b = fit_to_targets(w, b, kept, dropped, gram, shift, centered)
        fitted = z[:, kept] @ new_w.T + new_b
        if centered:
            torch.testing.assert_close(new_w, a, atol=1e-9, rtol=1e-9)
            torch.testing.assert_close(new_b, c, atol=1e-9, rtol=1e-9)
        else:  # the bias stays; the weights fit what they can of y - b
            torch.testing.assert_close(new_b, b)
            best = torch.linalg.lstsq(z[:, kept], y - b).solution.T
            torch.testing.assert_close(new_w, best, atol=1e-9, rtol=1e-9)
            assert torch.linalg.norm(fitted - y) > 1e-3
    t = interpolation_matrix(gram.second_moment(True), kept, dropped)
    fold_w, fold_b = fold_correction(w, b, kept, dropped, t, mean=gram.mean)
    assert torch.linalg.norm(z[:, kept] @ fold_w.T + fold_b - y) > 1.0


def test_fit_to_targets_keeping_nothing_leaves_the_mean_target():
    z, y = _random_z(n=50, m=4, seed=12), _random_z(n=50, m=3, seed=13)
    w = torch.randn(3, 4, dtype=torch.float64)
    gram, shift = _streamed(z, y - z @ w.T)
    none, every = torch.zeros(0, dtype=torch.long), torch.arange(4)
    new_w, new_b = fit_to_targets(w, None, none, every, gram, shift, centered=True)
    assert new_w.shape == (3, 0)
    torch.testing.assert_close(new_b, y.mean(0))


def _head_outputs(n, n_heads, head_dim, seed):
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.standard_normal((n, n_heads * head_dim)))


def test_select_heads_error_matches_dense_least_squares():
    n_heads, head_dim = 5, 3
    o = _head_outputs(300, n_heads, head_dim, seed=8)
    o[:, :head_dim] *= 4.0  # head 0 carries most energy
    w = torch.randn(7, n_heads * head_dim, dtype=torch.float64)
    sel = select_heads(o.T @ o, w, n_heads, head_dim)
    assert sel.order[0] == 0
    assert sel.errors[0].item() == pytest.approx(torch.linalg.norm(o @ w.T).item() ** 2, rel=1e-9)
    for r in range(n_heads + 1):
        kept, dropped = sel.keep(r, n_heads)
        kc, dc = head_columns(kept, head_dim), head_columns(dropped, head_dim)
        if kc.numel():
            t = torch.linalg.lstsq(o[:, kc], o[:, dc]).solution
            approx = o[:, kc] @ t
        else:
            approx = torch.zeros_like(o[:, dc])
        dense_error = torch.linalg.norm((o[:, dc] - approx) @ w[:, dc].T) ** 2
        assert sel.errors[r].item() == pytest.approx(dense_error.item(), rel=1e-6, abs=1e-8)


def test_select_heads_greedy_is_optimal_on_each_step():
    n_heads, head_dim = 4, 2
    o = _head_outputs(200, n_heads, head_dim, seed=9)
    w = torch.randn(3, n_heads * head_dim, dtype=torch.float64)
    sel = select_heads(o.T @ o, w, n_heads, head_dim)

    def error(kept):
        dropped = [h for h in range(n_heads) if h not in kept]
        kc, dc = head_columns(sorted(kept), head_dim), head_columns(dropped, head_dim)
        t = torch.linalg.lstsq(o[:, kc], o[:, dc]).solution
        return (torch.linalg.norm((o[:, dc] - o[:, kc] @ t) @ w[:, dc].T) ** 2).item()

    first = min(range(n_heads), key=lambda h: error([h]))
    assert sel.order[0] == first


def test_select_heads_duplicate_heads_are_free():
    head_dim = 3
    o = _head_outputs(200, 2, head_dim, seed=10)
    o = torch.cat([o, o], dim=1)  # heads 2, 3 duplicate heads 0, 1
    w = torch.randn(4, 4 * head_dim, dtype=torch.float64)
    sel = select_heads(o.T @ o, w, 4, head_dim)
    assert sel.errors[2].item() < 1e-9 * sel.errors[0].item()


def test_select_heads_respects_groups():
    o = _head_outputs(200, 6, 2, seed=11)
    o[:, :4] *= 10.0  # heads 0 and 1 (both in group 0) dominate
    w = torch.randn(3, 12, dtype=torch.float64)
    sel = select_heads(o.T @ o, w, n_heads=6, head_dim=2, groups=2)
    assert len(sel.errors) == 4  # 0..3 heads per group
    kept, _ = sel.keep(1, 6)
    assert len(kept) == 2 and {h // 3 for h in kept} == {0, 1}


def test_gram_accumulator_gemm_path_matches_syrk_path():
    z = _random_z().to(torch.float32)
    syrk = GramAccumulator(z.shape[1], compute_dtype=torch.float32)
    gemm = GramAccumulator(z.shape[1], compute_dtype=torch.bfloat16)  # not a BLAS type: GEMM path
    for chunk in torch.split(z, 50):
        syrk.add_batch(chunk)
        gemm.add_batch(chunk)
    a, b = syrk.finish().gram, gemm.finish().gram
    assert torch.equal(a, a.T) and torch.equal(b, b.T)
    torch.testing.assert_close(a, (z.T @ z).double(), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(b, a, rtol=3e-2, atol=1.0)


def test_a_zero_ridge_still_gets_the_floor_so_collinear_kept_columns_solve():
    z = _random_z(n=100, m=6, seed=5)
    z = torch.cat([z, z[:, :1]], dim=1)  # column 6 duplicates column 0: G_SS is singular
    g = z.T @ z
    kept, dropped = torch.tensor([0, 2, 4, 6]), torch.tensor([1, 3, 5])
    zero = interpolation_matrix(g, kept, dropped, 0.0)
    assert torch.isfinite(zero).all()
    torch.testing.assert_close(zero, interpolation_matrix(g, kept, dropped))
    residual = z[:, dropped] - z[:, kept] @ zero
    best = z[:, dropped] - z[:, kept] @ torch.linalg.lstsq(z[:, kept], z[:, dropped]).solution
    assert float(torch.linalg.norm(residual)) <= float(torch.linalg.norm(best)) * (1 + 1e-6)
