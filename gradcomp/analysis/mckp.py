"""The multiple-choice knapsack of budgeted bit allocation: exact Pareto DP, bucketed DP, greedy.

:func:`solve_mckp` picks one option per item (layer) to minimise the summed score within a budget of
integer costs (bits); the solvers and their guarantees are described in
:mod:`gradcomp.analysis.mixed_precision`, which calls it.
"""

from __future__ import annotations

import heapq
import logging
from typing import List, Optional, Sequence, Tuple

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["solve_mckp", "pareto_frontier"]

_GREEDY_LAYERS = 20_000


# --------------------------------------------------------------------------------------------
# the multiple-choice knapsack


def _pareto_dp(costs: List[np.ndarray], scores: List[np.ndarray], budget: Optional[int], max_states: int):
    """Exact Pareto-frontier DP. Returns (final costs, final scores, backtrack list) or None if too big."""
    n = len(costs)
    min_rest = np.zeros(n + 1, dtype=np.int64)
    for i in range(n - 1, -1, -1):
        min_rest[i] = min_rest[i + 1] + int(costs[i].min())
    fc = np.zeros(1, dtype=np.int64)
    fs = np.zeros(1, dtype=np.float64)
    back: List[Tuple[np.ndarray, np.ndarray]] = []
    for i in range(n):
        c, s = costs[i], scores[i]
        nc = (fc[:, None] + c[None, :]).reshape(-1)
        ns = (fs[:, None] + s[None, :]).reshape(-1)
        parent = np.repeat(np.arange(fc.size), c.size)
        choice = np.tile(np.arange(c.size), fc.size)
        if budget is not None:
            ok = nc + min_rest[i + 1] <= budget
            nc, ns, parent, choice = nc[ok], ns[ok], parent[ok], choice[ok]
        order = np.lexsort((ns, nc))
        nc, ns, parent, choice = nc[order], ns[order], parent[order], choice[order]
        # keep a state only if it scores strictly better than every cheaper-or-equal state before it
        prev_min = np.minimum.accumulate(ns)
        keep = np.ones(ns.size, dtype=bool)
        keep[1:] = ns[1:] < prev_min[:-1]
        fc, fs = nc[keep], ns[keep]
        back.append((parent[keep], choice[keep]))
        if fc.size > max_states:
            return None
    return fc, fs, back


def pareto_frontier(costs: Sequence[np.ndarray], scores: Sequence[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """Every Pareto-optimal choice of one option per item: ``(costs, choices)``, cheapest first.

    ``costs[i]`` / ``scores[i]``: item ``i``'s options (integer costs); ``choices`` is
    ``(frontier size, items)``, the option of each item in each frontier plan, whose scores
    strictly decrease as the costs grow. The exact DP with no budget.
    """
    res = _pareto_dp(list(costs), list(scores), None, np.iinfo(np.int64).max)
    if res is None:  # no state limit: cannot happen
        raise AssertionError("internal error: the unbounded frontier DP gave up")
    fc, _, back = res
    return fc, _backtrack(back, np.arange(fc.size))


def _backtrack(back: List[Tuple[np.ndarray, np.ndarray]], final_idx: np.ndarray) -> np.ndarray:
    """Return choices (len(final_idx), layers) for frontier states ``final_idx``."""
    n = len(back)
    out = np.zeros((final_idx.size, n), dtype=np.int64)
    idx = final_idx
    for i in range(n - 1, -1, -1):
        parent, choice = back[i]
        out[:, i] = choice[idx]
        idx = parent[idx]
    return out


def _bucketed_dp(costs: List[np.ndarray], scores: List[np.ndarray], budget: int, resolution: int) -> Optional[np.ndarray]:
    units = [-(-c // resolution) for c in costs]  # ceil: every plan found really fits
    cap = budget // resolution
    inf = np.inf
    dp = np.full(cap + 1, inf)
    dp[0] = 0.0
    choices = []
    for u, s in zip(units, scores):
        new = np.full(cap + 1, inf)
        arg = np.full(cap + 1, -1, dtype=np.int64)
        for j in range(u.size):
            k = int(u[j])
            if k > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[k:] = dp[: cap + 1 - k] + s[j]
            better = cand < new
            new[better] = cand[better]
            arg[better] = j
        dp = new
        choices.append(arg)
    if not np.isfinite(dp).any():
        return None
    b = int(np.argmin(dp))
    out = np.zeros(len(costs), dtype=np.int64)
    for i in range(len(costs) - 1, -1, -1):
        j = int(choices[i][b])
        out[i] = j
        b -= int(units[i][j])
    return out


def _greedy(costs: List[np.ndarray], scores: List[np.ndarray], budget: int) -> Optional[np.ndarray]:
    n = len(costs)
    hulls: List[List[int]] = []
    for c, s in zip(costs, scores):
        order = sorted(range(c.size), key=lambda j: (int(c[j]), float(s[j])))
        # drop options that cost more and score no better (dominated)
        pts: List[int] = []
        for j in order:
            if pts and float(s[j]) >= float(s[pts[-1]]):
                continue
            if pts and int(c[j]) == int(c[pts[-1]]):
                continue
            pts.append(j)
        # lower convex hull: successive slopes must increase (less improvement per bit)
        hull: List[int] = []
        for j in pts:
            while len(hull) >= 2:
                a, b = hull[-2], hull[-1]
                s1 = (float(s[b]) - float(s[a])) / (int(c[b]) - int(c[a]))
                s2 = (float(s[j]) - float(s[b])) / (int(c[j]) - int(c[b]))
                if s2 <= s1:
                    hull.pop()
                else:
                    break
            hull.append(j)
        hulls.append(hull)
    pos = [0] * n
    spent = sum(int(costs[i][hulls[i][0]]) for i in range(n))
    if spent > budget:
        return None
    heap: List[Tuple[float, int]] = []

    def push(i: int) -> None:
        h, p = hulls[i], pos[i]
        if p + 1 < len(h):
            a, b = h[p], h[p + 1]
            slope = (float(scores[i][b]) - float(scores[i][a])) / (int(costs[i][b]) - int(costs[i][a]))
            heapq.heappush(heap, (slope, i))

    for i in range(n):
        push(i)
    while heap:
        _, i = heapq.heappop(heap)
        h, p = hulls[i], pos[i]
        extra = int(costs[i][h[p + 1]]) - int(costs[i][h[p]])
        if spent + extra > budget:
            continue
        spent += extra
        pos[i] = p + 1
        push(i)
    return np.array([hulls[i][pos[i]] for i in range(n)], dtype=np.int64)


def solve_mckp(
    costs: Sequence[Sequence[int]],
    scores: Sequence[Sequence[float]],
    budget: int,
    *,
    method: str = "auto",
    max_states: int = 1_000_000,
    resolution: Optional[int] = None,
) -> Tuple[List[int], str, int]:
    """Solve a multiple-choice knapsack: one option per group, total cost <= budget, minimum total score.

    Args:
        costs: per group, the integer cost of each option.
        scores: per group, the score of each option (same shapes as ``costs``).
        budget: the largest allowed total cost.
        method: ``"exact"``, ``"bucketed"``, ``"greedy"`` or ``"auto"`` (see the module docstring).
        max_states: frontier size at which ``"auto"`` leaves the exact DP.
        resolution: cost resolution of the bucketed DP (default: ``budget // 100000``, at least 1).

    Returns:
        ``(choice index per group, method used, resolution used)``.

    Raises:
        ValueError: when even the cheapest option of every group exceeds the budget.

    Example:
        >>> solve_mckp([[4, 8], [4, 8]], [[0.9, 0.1], [0.2, 0.15]], 12, method="exact")[0]
        [1, 0]
    """
    if method not in ("auto", "exact", "bucketed", "greedy"):
        raise ValueError(f"method must be one of ('auto', 'exact', 'bucketed', 'greedy'), got {method!r}")
    if len(costs) != len(scores) or not costs:
        raise ValueError(f"costs and scores must list the same non-zero number of groups, got {len(costs)} and {len(scores)}")
    c = [np.asarray(x, dtype=np.int64) for x in costs]
    s = [np.asarray(x, dtype=np.float64) for x in scores]
    for i, (ci, si) in enumerate(zip(c, s)):
        if ci.ndim != 1 or ci.shape != si.shape or ci.size == 0:
            raise ValueError(f"group {i}: costs and scores must be equal-length non-empty lists, got {ci.shape} and {si.shape}")
        if (ci < 0).any() or not np.isfinite(si).all():
            raise ValueError(f"group {i}: costs must be >= 0 and scores finite")
    budget = int(budget)
    min_total = int(sum(int(ci.min()) for ci in c))
    if min_total > budget:
        raise ValueError(f"the budget of {budget} cannot be met: the cheapest choice of every layer already costs {min_total}")
    if method == "auto" and len(c) > _GREEDY_LAYERS:
        method = "greedy"
    if method in ("auto", "exact"):
        res = _pareto_dp(c, s, budget, max_states if method == "auto" else np.iinfo(np.int64).max)
        if res is not None:
            fc, fs, back = res
            best = int(np.argmin(fs))
            return _backtrack(back, np.array([best]))[0].tolist(), "exact", 1
        logger.info("exact knapsack frontier exceeded %d states; using the bucketed DP", max_states)
        method = "bucketed"
    if method == "bucketed":
        resolution = resolution or max(1, budget // 100_000)
        choice = _bucketed_dp(c, s, budget, resolution)
        if choice is None:
            raise ValueError(
                f"the bucketed DP at a resolution of {resolution} cost units found no plan within {budget}; use a finer resolution"
            )
        return choice.tolist(), "bucketed", resolution
    choice = _greedy(c, s, budget)
    assert choice is not None  # feasibility was checked above
    return choice.tolist(), "greedy", 1
