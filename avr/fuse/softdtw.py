"""Soft-DTW (Cuturi & Blondel, "Soft-DTW: a Differentiable Loss Function for Time-Series",
ICML 2017, arXiv 1703.01541) over a batch of cost matrices, in plain PyTorch (docs/methods.md (ii)).

For one pair with cost matrix Delta [n, m] (e.g. ``1 - cos(text_i, audio_j)``):

    min^g(a_1..a_k) = -g log sum_k exp(-a_k / g)                      # soft minimum, g = gamma
    R_00 = 0,  R_i0 = R_0j = +inf
    R_ij = Delta_ij + min^g(R_{i-1,j-1}, R_{i-1,j}, R_{i,j-1})         # Alg. 1
    sdtw_g = R_nm                                                      # g -> 0: hard DTW

Its gradient E = d R_nm / d Delta is the expected alignment matrix (Alg. 2): each cell's share
of the Gibbs distribution over monotone alignment paths. With E_nm = 1 and, for every other
cell, the sum over its successors s in {(i+1,j), (i,j+1), (i+1,j+1)} inside the [n, m] grid:

    E_ij = sum_s E_s w(ij -> s),   w(p -> s) = exp(-R_p / g) / sum_{p' -> s} exp(-R_p' / g)

``w(p -> s)`` is the weight predecessor p gets in the soft minimum taken at s (Alg. 2 writes it
``exp((R_s - Delta_s - R_p) / g)``, the same number since ``R_s - Delta_s`` is that soft
minimum). It is computed here as a softmax over the three predecessors of s, so the weights of
each soft minimum sum to one whatever the magnitude of R / g.

Exactness: the recursion runs on R itself, in the units of the costs, and unreachable cells are
real infinities. The soft minimum subtracts the smallest argument before dividing by gamma
(``min - g log sum_k exp(-(a_k - min) / g)``), so no intermediate grows with 1 / gamma: the value
is exact to the working precision for any cost and gamma the dtype holds (a finite sentinel for
+inf, as in many implementations, breaks once R / gamma passes the sentinel). An argument at
+inf gets weight zero; a soft minimum of three +inf (slots outside the grid) is +inf with zero
weights. Neither the values nor the gradients of either wavefront ever compute ``inf - inf``.

Implementation:

- Batching: ``cost`` is [P, N, M] with per-pair lengths ``n_p <= N`` (rows) and ``m_p <= M``
  (columns); the valid cells of pair p are the top-left ``n_p x m_p`` block (padding at the end,
  as padding masks put it).
- Wavefront: cells with ``i + j = d`` depend only on diagonals d-1 and d-2, so one step per
  anti-diagonal updates every pair and every cell of that diagonal at once; the Python loop runs
  N + M - 1 times. Diagonal d is stored indexed by the row i (0..N) ("skewed" layout
  [P, N+M+1, N+1]), so the predecessors of a diagonal are the two previous diagonals shifted by
  zero or one row, and the successors the two next ones.
- The backward recursion's weights depend only on R, so all of them are computed at once
  before it; each step is then three multiply-adds.
- 16-bit costs are computed in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

UNREACHABLE = float("inf")  # R of a cell no monotone path reaches (the grid's border, its outside)


def soft_dtw(cost: torch.Tensor, gamma: float, row_lengths: torch.Tensor | None = None,
             col_lengths: torch.Tensor | None = None, *, normalize: bool = False) -> torch.Tensor:
    """Soft-DTW value of each pair: ``R[n_p, m_p]`` of ``cost`` [P, N, M] -> [P].

    ``row_lengths`` / ``col_lengths`` [P] (integers in 1..N and 1..M; default: full) give each
    pair's valid block. ``normalize`` divides by the path-length bound ``n_p + m_p`` (docs/methods.md
    (ii): soft-DTW is not bounded below; a length-normalised value compares across lengths).
    The gradient is the expected alignment (custom backward, Alg. 2), so training keeps only
    R, not the autograd graph of the wavefront.
    """
    cost = _working_precision(cost)
    rows, cols = _lengths(cost, row_lengths, col_lengths)
    value = _SoftDTW.apply(cost, rows, cols, _checked_gamma(gamma))
    if normalize:
        value = value / (rows + cols).to(value.dtype)
    return value


def soft_dtw_alignment(cost: torch.Tensor, gamma: float, row_lengths: torch.Tensor | None = None,
                       col_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Expected alignment ``E = d soft_dtw / d cost`` [P, N, M]; zero outside each pair's block.

    Built from differentiable tensor operations (autograd records both wavefronts when ``cost``
    requires grad), so a model may use E as weights and learn through it.
    """
    cost = _working_precision(cost)
    rows, cols = _lengths(cost, row_lengths, col_lengths)
    gamma = _checked_gamma(gamma)
    skewed_cost, valid = _skew(cost, rows, cols)
    R = _forward_wavefront(skewed_cost, gamma)
    E = _backward_wavefront(R, valid, rows, cols, gamma)
    return _unskew(E, cost.shape[1], cost.shape[2])


# ---- the soft minimum ---------------------------------------------------------------------------

def soft_minimum(arguments: tuple[torch.Tensor, ...], gamma: float) -> torch.Tensor:
    """``min^gamma`` of same-shaped ``arguments`` (any may be +inf), elementwise:
    ``lowest - gamma log sum_k exp(-(a_k - lowest) / gamma)``.

    Subtracting the smallest argument first keeps every exponent in [-inf, 0], so nothing
    overflows however small gamma is; the smallest argument is a constant for autograd (the
    result's derivative with respect to it is zero). Where every argument is +inf the result is
    +inf, with no NaN in the value or in its gradient.
    """
    lowest, terms = _shifted_terms(arguments, gamma)
    return lowest - gamma * torch.log(_nonzero(terms.sum(0)))


def soft_minimum_weights(arguments: tuple[torch.Tensor, ...], gamma: float
                         ) -> tuple[torch.Tensor, ...]:
    """The weight of each argument in ``soft_minimum(arguments)``: a softmax of
    ``-argument / gamma``, zero for +inf, all zero where every argument is +inf."""
    _, terms = _shifted_terms(arguments, gamma)
    return (terms / _nonzero(terms.sum(0))).unbind(0)


def _shifted_terms(arguments: tuple[torch.Tensor, ...], gamma: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(lowest argument, [k, ...] terms exp(-(a_k - lowest) / gamma)), elementwise. The terms are
    in [0, 1], 1 for the lowest; where every argument is +inf they are shifted by 0 instead (no
    inf - inf) and are all 0."""
    stacked = torch.stack(arguments)
    lowest = stacked.detach().amin(0)
    anchor = torch.nan_to_num(lowest, posinf=0.0)
    return lowest, torch.exp((anchor - stacked) / gamma)


def _nonzero(total: torch.Tensor) -> torch.Tensor:
    """``total`` with 0 (every term zero) replaced by 1: log and division stay finite there, and
    so do their gradients."""
    return torch.where(total > 0, total, 1.0)


# ---- layout -------------------------------------------------------------------------------------

def _checked_gamma(gamma: float) -> float:
    gamma = float(gamma)
    if not gamma > 0:
        raise ValueError(f"soft-DTW gamma must be positive, got {gamma}")
    return gamma


def _working_precision(cost: torch.Tensor) -> torch.Tensor:
    """16-bit costs run in float32: R accumulates N + M terms."""
    return cost.float() if cost.dtype in (torch.float16, torch.bfloat16) else cost


def _lengths(cost: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    if cost.ndim != 3:
        raise ValueError(f"soft-DTW expects cost matrices [P, N, M], got {tuple(cost.shape)}")
    P, N, M = cost.shape
    full = torch.ones(P, dtype=torch.long, device=cost.device)
    rows = full * N if rows is None else rows.to(device=cost.device, dtype=torch.long)
    cols = full * M if cols is None else cols.to(device=cost.device, dtype=torch.long)
    return rows, cols


def _skew(cost: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """cost [P, N, M] -> (Delta_ij at [d = i + j, i] (1-based i, j), +inf at slots outside the
    N x M grid: [P, N+M+1, N+1]; valid [P, N+M+1, N+1]: the slot is a cell
    1 <= i <= n_p, 1 <= j <= m_p of its pair)."""
    P, N, M = cost.shape
    i = torch.arange(N + 1, device=cost.device)[None, :]
    j = torch.arange(N + M + 1, device=cost.device)[:, None] - i  # [N+M+1, N+1]
    inside = (i >= 1) & (j >= 1) & (j <= M)
    padded = F.pad(cost, (1, 0, 1, 0))  # [P, N+1, M+1], row and column 0 unused
    skewed = padded[:, i.expand_as(j), j.clamp(0, M)]  # [P, N+M+1, N+1]
    skewed_cost = torch.where(inside, skewed, UNREACHABLE)
    valid = inside & (i <= rows[:, None, None]) & (j <= cols[:, None, None])
    return skewed_cost, valid


def _unskew(skewed: torch.Tensor, N: int, M: int) -> torch.Tensor:
    """[P, N+M+1, N+1] -> [P, N, M]: cell (i, j) (1-based) read at [i + j, i]."""
    i = torch.arange(1, N + 1, device=skewed.device)[:, None]
    j = torch.arange(1, M + 1, device=skewed.device)[None, :]
    return skewed[:, i + j, i.expand(N, M)]


# ---- the two wavefronts -------------------------------------------------------------------------

def _forward_wavefront(skewed_cost: torch.Tensor, gamma: float) -> torch.Tensor:
    """R in the skewed layout [P, N+M+1, N+1] (Alg. 1):
    R_ij = Delta_ij + min^gamma(R_{i-1,j-1}, R_{i-1,j}, R_{i,j-1}).

    Each stored diagonal carries a leading unreachable slot (row -1), so the shifted
    predecessors are views. Cells beyond a pair's own lengths are computed but never feed its
    cells inside; slots outside the grid stay +inf.
    """
    P, D, width = skewed_cost.shape
    origin = torch.full((P, width + 1), UNREACHABLE, dtype=skewed_cost.dtype,
                        device=skewed_cost.device)
    origin[:, 1] = 0.0  # R_00 = 0
    diagonals = [origin, torch.full_like(origin, UNREACHABLE)]
    costs = skewed_cost.unbind(1)  # one autograd node for all diagonals (not one select each)
    for d in range(2, D):
        two_back, one_back = diagonals[d - 2], diagonals[d - 1]
        reach = soft_minimum((two_back[:, :-1],  # (i-1, j-1)
                              one_back[:, :-1],  # (i-1, j)
                              one_back[:, 1:]),  # (i, j-1)
                             gamma)
        diagonals.append(F.pad(costs[d] + reach, (1, 0), value=UNREACHABLE))
    return torch.stack(diagonals, dim=1)[:, :, 1:]


def _successor_weights(R: torch.Tensor, valid: torch.Tensor, gamma: float
                       ) -> list[torch.Tensor]:
    """w(ij -> s) for the successors s = (i+1, j), (i, j+1), (i+1, j+1) of every cell, zero
    unless both are valid."""
    # Every slot's predecessors, in the order of _forward_wavefront: diagonal, up, left.
    from_diagonal, from_up, from_left = soft_minimum_weights(
        (_behind(R, 2, 1), _behind(R, 1, 1), _behind(R, 1, 0)), gamma)
    weights = []
    for share, diagonals, rows in ((from_up, 1, 1), (from_left, 1, 0), (from_diagonal, 2, 1)):
        ok = valid & _ahead(valid, diagonals, rows, False)
        weights.append(torch.where(ok, _ahead(share, diagonals, rows, 0.0), 0.0))
    return weights


def _behind(skewed: torch.Tensor, diagonals: int, rows: int) -> torch.Tensor:
    """Value at [d - diagonals, i - rows] for every slot [d, i] of [P, D, N+1]; +inf before the
    start."""
    _, D, width = skewed.shape
    return F.pad(skewed[:, :D - diagonals, :width - rows], (rows, 0, diagonals, 0),
                 value=UNREACHABLE)


def _ahead(skewed: torch.Tensor, diagonals: int, rows: int, fill) -> torch.Tensor:
    """Value at [d + diagonals, i + rows] for every slot [d, i] of [P, D, N+1]; ``fill`` past
    the end."""
    return F.pad(skewed[:, diagonals:, rows:], (0, rows, 0, diagonals), value=fill)


def _backward_wavefront(R: torch.Tensor, valid: torch.Tensor, rows: torch.Tensor,
                        cols: torch.Tensor, gamma: float) -> torch.Tensor:
    """E = d R[n_p, m_p] / d Delta in the skewed layout [P, N+M+1, N+1] (Alg. 2), zero outside
    each pair's valid cells. Stored diagonals carry a trailing zero (row N+1)."""
    P, D, width = R.shape
    down, right, diagonal = (w.unbind(1) for w in _successor_weights(R, valid, gamma))
    seed = torch.zeros_like(R)
    seed[torch.arange(P, device=R.device), rows + cols, rows] = 1.0  # E_nm = 1
    seed = seed.unbind(1)
    zero = torch.zeros((P, width + 1), dtype=R.dtype, device=R.device)
    E = [zero] * (D + 2)
    for d in range(D - 1, 1, -1):
        one_ahead, two_ahead = E[d + 1], E[d + 2]
        here = torch.addcmul(seed[d], one_ahead[:, 1:], down[d])
        here = torch.addcmul(here, one_ahead[:, :-1], right[d])
        here = torch.addcmul(here, two_ahead[:, 1:], diagonal[d])
        E[d] = F.pad(here, (0, 1))
    return torch.stack(E[:D], dim=1)[:, :, :-1]


class _SoftDTW(torch.autograd.Function):
    """Value R[n_p, m_p] forward, ``grad * E`` backward; neither wavefront is recorded."""

    @staticmethod
    def forward(ctx, cost, rows, cols, gamma):
        with torch.no_grad():
            skewed_cost, valid = _skew(cost, rows, cols)
            R = _forward_wavefront(skewed_cost, gamma)
        ctx.save_for_backward(R, valid, rows, cols)
        ctx.shape, ctx.gamma = cost.shape, gamma
        return R[torch.arange(len(rows), device=R.device), rows + cols, rows]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        R, valid, rows, cols = ctx.saved_tensors
        _, N, M = ctx.shape
        E = _unskew(_backward_wavefront(R, valid, rows, cols, ctx.gamma), N, M)
        return grad[:, None, None] * E, None, None, None
