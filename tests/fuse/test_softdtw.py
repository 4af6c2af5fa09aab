"""Soft-DTW: values against the textbook recursion, gradients, alignments, lengths."""

from __future__ import annotations

import math

import pytest
import torch

from avr.fuse.softdtw import soft_dtw, soft_dtw_alignment


# The soft-DTW wavefront runs hundreds of ops on tiny tensors: one thread is faster.
pytestmark = pytest.mark.usefixtures("one_thread")


def recursive_soft_dtw(cost: list[list[float]], gamma: float) -> float:
    """Cuturi & Blondel Alg. 1 with Python loops; gamma = 0 is hard DTW."""
    n, m = len(cost), len(cost[0])
    R = [[math.inf] * (m + 1) for _ in range(n + 1)]
    R[0][0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            previous = (R[i - 1][j - 1], R[i - 1][j], R[i][j - 1])
            low = min(previous)
            if gamma == 0:
                R[i][j] = cost[i - 1][j - 1] + low
            else:
                total = sum(math.exp(-(r - low) / gamma) for r in previous)
                R[i][j] = cost[i - 1][j - 1] + low - gamma * math.log(total)
    return R[n][m]


def random_batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    cost = torch.rand(6, 4, 7, generator=generator, dtype=torch.float64)
    rows = torch.tensor([4, 1, 3, 2, 4, 1])
    cols = torch.tensor([7, 5, 1, 6, 3, 1])
    return cost, rows, cols


def test_value_matches_the_recursion_for_every_pair_length():
    cost, rows, cols = random_batch()
    values = soft_dtw(cost, 0.3, rows, cols)
    expected = [recursive_soft_dtw(cost[p, :rows[p], :cols[p]].tolist(), 0.3)
                for p in range(len(cost))]
    assert values.tolist() == pytest.approx(expected, abs=1e-10)


def test_padding_beyond_the_lengths_does_not_change_the_value():
    cost, rows, cols = random_batch()
    noisy = cost + 100.0 * (torch.arange(4)[None, :, None] >= rows[:, None, None])
    assert torch.allclose(soft_dtw(noisy, 0.3, rows, cols), soft_dtw(cost, 0.3, rows, cols))


def test_full_lengths_are_the_default():
    cost, _, _ = random_batch()
    assert torch.equal(soft_dtw(cost, 0.5), soft_dtw(cost, 0.5, torch.full((6,), 4),
                                                   torch.full((6,), 7)))


def test_small_gamma_approaches_hard_dtw():
    cost, rows, cols = random_batch(1)
    hard = torch.tensor([recursive_soft_dtw(cost[p, :rows[p], :cols[p]].tolist(), 0.0)
                         for p in range(len(cost))], dtype=torch.float64)
    gaps = [(soft_dtw(cost, gamma, rows, cols) - hard).abs().max().item()
            for gamma in (0.1, 0.01, 0.001)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 0.01


def test_normalized_value_divides_by_the_path_length_bound():
    cost, rows, cols = random_batch()
    normalized = soft_dtw(cost, 0.3, rows, cols, normalize=True)
    assert torch.allclose(normalized, soft_dtw(cost, 0.3, rows, cols) / (rows + cols))


def test_gradient_matches_finite_differences():
    cost, rows, cols = random_batch()
    cost.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c: soft_dtw(c, 0.3, rows, cols), (cost,))


def test_alignment_is_the_gradient_of_the_value():
    cost, rows, cols = random_batch()
    cost.requires_grad_(True)
    (gradient,) = torch.autograd.grad(soft_dtw(cost, 0.3, rows, cols).sum(), cost)
    assert torch.allclose(soft_dtw_alignment(cost, 0.3, rows, cols), gradient, atol=1e-12)


def test_alignment_is_differentiable_against_finite_differences():
    cost, rows, cols = random_batch(2)
    cost = cost[:, :3, :4].clone().requires_grad_(True)
    rows, cols = rows.clamp(max=3), cols.clamp(max=4)
    assert torch.autograd.gradcheck(lambda c: soft_dtw_alignment(c, 0.5, rows, cols), (cost,))


def test_alignment_is_zero_outside_each_pairs_block():
    cost, rows, cols = random_batch()
    alignment = soft_dtw_alignment(cost, 0.3, rows, cols)
    outside = ((torch.arange(4)[None, :, None] >= rows[:, None, None])
               | (torch.arange(7)[None, None, :] >= cols[:, None, None]))
    assert alignment[outside].abs().max() == 0
    assert (alignment[~outside] > 0).all()


def test_alignment_is_a_soft_monotone_path_on_an_easy_cost():
    # Cheap cells run along a staircase from (0, 0) to (3, 7): two audio steps per text token.
    cost = torch.ones(1, 4, 8, dtype=torch.float64)
    for step in range(8):
        cost[0, step // 2, step] = 0.0
    alignment = soft_dtw_alignment(cost, 0.05)[0]
    assert (alignment >= 0).all()
    assert alignment.max() <= 1 + 1e-9
    assert torch.allclose(alignment, 1.0 - cost[0], atol=0.02)  # mass sits on the path
    peaks = alignment.argmax(0)
    assert (peaks[1:] >= peaks[:-1]).all()  # monotone in time
    assert alignment.sum(0).min() >= 1 - 1e-6  # every step is visited


def test_half_precision_cost_is_computed_in_float32():
    cost, rows, cols = random_batch()
    value = soft_dtw(cost.half(), 0.3, rows, cols)
    assert value.dtype == torch.float32
    assert torch.allclose(value.double(), soft_dtw(cost.half().double(), 0.3, rows, cols),
                          atol=1e-5)


# ---- exactness far from the usual scales --------------------------------------------------------

def monotone_paths(n: int, m: int):
    """Every monotone alignment path from cell (0, 0) to (n-1, m-1), as lists of cells."""
    if (n, m) == (1, 1):
        return [[(0, 0)]]
    paths = []
    for di, dj in ((1, 0), (0, 1), (1, 1)):
        if n - di >= 1 and m - dj >= 1:
            paths += [path + [(n - 1, m - 1)] for path in monotone_paths(n - di, m - dj)]
    return paths


def path_soft_dtw(cost: list[list[float]], gamma: float) -> float:
    """The definition, not the recursion: -gamma log sum over all paths of exp(-path cost / gamma),
    with the cheapest path factored out so that no exponent overflows."""
    totals = [math.fsum(cost[i][j] for i, j in path) for path in monotone_paths(len(cost),
                                                                                len(cost[0]))]
    cheapest = min(totals)
    return cheapest - gamma * math.log(math.fsum(math.exp(-(t - cheapest) / gamma)
                                                 for t in totals))


def cheapest_path_indicator(cost: list[list[float]]) -> torch.Tensor:
    paths = monotone_paths(len(cost), len(cost[0]))
    best = min(paths, key=lambda path: math.fsum(cost[i][j] for i, j in path))
    indicator = torch.zeros(len(cost), len(cost[0]), dtype=torch.float64)
    for i, j in best:
        indicator[i, j] = 1.0
    return indicator


def costly_batch(seed: int, N: int, M: int, dtype=torch.float64):
    """Costs of 1000-1500 per cell: R / gamma reaches 1e10 and beyond for gamma = 1e-5."""
    generator = torch.Generator().manual_seed(seed)
    return (1000.0 + 500.0 * torch.rand(4, N, M, generator=generator, dtype=torch.float64)
            ).to(dtype)


def test_recursion_agrees_with_the_sum_over_all_paths():
    cost, _, _ = random_batch()
    for p in range(3):
        block = cost[p, :3, :4].tolist()
        assert recursive_soft_dtw(block, 0.3) == pytest.approx(path_soft_dtw(block, 0.3),
                                                                abs=1e-12)


@pytest.mark.parametrize("shape", [(2, 30), (30, 2), (1, 20), (20, 1), (4, 9)])
def test_value_is_exact_when_costs_dwarf_gamma(shape):
    # A path along the grid's first row or column sums 1e4+ per 1e-5 of gamma: past any finite
    # stand-in for the unreachable border.
    cost = costly_batch(0, *shape)
    rows = torch.tensor([shape[0], max(1, shape[0] // 2), shape[0], 1])
    cols = torch.tensor([shape[1], shape[1], max(1, shape[1] // 3), 1])
    values = soft_dtw(cost, 1e-5, rows, cols)
    expected = [recursive_soft_dtw(cost[p, :rows[p], :cols[p]].tolist(), 1e-5)
                for p in range(len(cost))]
    assert values.tolist() == pytest.approx(expected, rel=1e-13)


def test_value_matches_the_path_sum_when_costs_dwarf_gamma():
    cost = costly_batch(1, 3, 5)
    values = soft_dtw(cost, 1e-5)
    assert values.tolist() == pytest.approx([path_soft_dtw(c.tolist(), 1e-5) for c in cost],
                                            rel=1e-13)


def test_float32_value_is_exact_to_float32_precision_when_costs_dwarf_gamma():
    cost = costly_batch(2, 2, 30, torch.float32)
    values = soft_dtw(cost, 1e-5)
    expected = [recursive_soft_dtw(c.double().tolist(), 1e-5) for c in cost]
    assert values.dtype == torch.float32
    assert values.double().tolist() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gradient_is_the_cheapest_path_when_costs_dwarf_gamma(dtype):
    cost = costly_batch(3, 3, 6, dtype).requires_grad_(True)
    (gradient,) = torch.autograd.grad(soft_dtw(cost, 1e-5).sum(), cost)
    assert torch.isfinite(gradient).all()
    for p in range(len(cost)):
        expected = cheapest_path_indicator(cost[p].detach().double().tolist())
        assert torch.allclose(gradient[p].double(), expected, atol=1e-6)


def test_gamma_too_small_to_divide_by_gives_hard_dtw():
    # cost / gamma overflows float32 (1e3 / 1e-38 = 1e41): the soft minimum never divides a
    # cost by gamma, only differences between arguments, which may overflow to -inf safely.
    cost = costly_batch(4, 3, 5, torch.float32).requires_grad_(True)
    values = soft_dtw(cost, 1e-38)
    hard = [recursive_soft_dtw(c.double().tolist(), 0.0) for c in cost.detach()]
    assert values.double().tolist() == pytest.approx(hard, rel=1e-6)
    (gradient,) = torch.autograd.grad(values.sum(), cost)
    assert torch.isfinite(gradient).all()


def test_alignment_and_its_gradient_stay_finite_when_costs_dwarf_gamma():
    cost = costly_batch(5, 3, 6).requires_grad_(True)
    rows, cols = torch.tensor([3, 2, 1, 3]), torch.tensor([6, 4, 6, 1])
    alignment = soft_dtw_alignment(cost, 1e-5, rows, cols)
    for p in range(len(cost)):
        expected = cheapest_path_indicator(cost[p, :rows[p], :cols[p]].tolist())
        assert torch.allclose(alignment[p, :rows[p], :cols[p]], expected, atol=1e-9)
    weights = torch.linspace(0.5, 1.5, 6, dtype=torch.float64)
    (gradient,) = torch.autograd.grad((alignment * weights).sum(), cost)
    assert torch.isfinite(gradient).all()


def test_alignment_gradient_has_no_nan_from_unreachable_cells():
    # Ordinary scales, lengths that leave most of the grid outside: the +inf slots must not
    # leak NaN into the gradient of a model that learns through the alignment.
    cost, rows, cols = random_batch(3)
    cost.requires_grad_(True)
    alignment = soft_dtw_alignment(cost, 0.1, rows, cols)
    (gradient,) = torch.autograd.grad((alignment ** 2).sum(), cost)
    assert torch.isfinite(gradient).all()
    outside = ((torch.arange(4)[None, :, None] >= rows[:, None, None])
               | (torch.arange(7)[None, None, :] >= cols[:, None, None]))
    assert gradient[outside].abs().max() == 0


@pytest.mark.parametrize("gamma", [0.0, -0.1])
def test_gamma_must_be_positive(gamma):
    cost, _, _ = random_batch()
    with pytest.raises(ValueError, match="gamma must be positive"):
        soft_dtw(cost, gamma)
