"""benchmarks/ffn_fit.py's reference rule and error measure, against brute-force least squares."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from ffn_fit import exact_greedy_order, relative_error  # noqa: E402


def _output_error(z, w, kept):
    """‖Z Wᵀ − Z_S Bᵀ‖² with the best B, by least squares on the rows themselves."""
    if not kept:
        return float(torch.linalg.norm(z @ w.T) ** 2)
    target = z @ w.T
    b = torch.linalg.lstsq(z[:, kept], target).solution
    return float(torch.linalg.norm(target - z[:, kept] @ b) ** 2)


def test_exact_greedy_adds_the_neuron_that_lowers_the_output_error_most_at_every_step():
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(9, 9, dtype=torch.float64, generator=gen)
    z = torch.randn(300, 9, dtype=torch.float64, generator=gen) @ mix
    w = torch.randn(4, 9, dtype=torch.float64, generator=gen)
    order = exact_greedy_order(z.T @ z, w).tolist()
    assert sorted(order) == list(range(9))
    for step in range(8):
        kept = order[:step]
        best = min((j for j in range(9) if j not in kept), key=lambda j: _output_error(z, w, [*kept, j]))
        assert order[step] == best


def test_relative_error_is_the_least_squares_residual_of_the_kept_neurons():
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(200, 10, dtype=torch.float64, generator=gen)
    w = torch.randn(3, 10, dtype=torch.float64, generator=gen)
    gram = z.T @ z
    order = torch.tensor([4, 1, 7, 0, 9, 2, 3, 5, 6, 8])
    got = relative_error(w, order, 0.6, gram, gram, ridge=0.0)
    expected = _output_error(z, w, [4, 1, 7, 0, 9, 2]) / float(torch.linalg.norm(z @ w.T) ** 2)
    assert abs(got - expected) < 1e-9
    assert relative_error(w, order, 0.6, gram, gram, ridge=0.5) > got  # damping costs in-sample
