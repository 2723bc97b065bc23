"""Statistics for comparing runs: a mean with its Student-t confidence interval, the paired difference over
seeds, and a paired bootstrap over test problems. No scipy (not a dependency): the t quantile inverts the
regularized incomplete beta function (within 2e-9 of scipy, relative, for df 0.5 to 1e5)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

MIN_SEEDS = 5  # the protocol: a cell with fewer seeds is reported, with a warning


@dataclass(frozen=True)
class MeanCI:
    """Mean, sample standard deviation (ddof=1) and the two-sided Student-t interval of ``values``. With fewer
    than 2 values the spread and the interval do not apply: ``std``, ``half_width``, ``low``, ``high`` are None."""

    n: int
    mean: float | None
    std: float | None
    level: float
    half_width: float | None
    low: float | None
    high: float | None
    values: tuple[float, ...]


@dataclass(frozen=True)
class PairedDifference:
    """``a - b`` per seed over the seeds both have, and the t interval of its mean (``ci.n`` pairs)."""

    seeds: tuple[str, ...]
    differences: tuple[float, ...]
    ci: MeanCI


@dataclass(frozen=True)
class BootstrapCI:
    """Percentile interval of the mean accuracy difference ``a - b``, resampling the test problems (paired by
    id) ``n_boot`` times; each resample averages over ``seeds``. ``low``/``high`` are None with no problem."""

    n_problems: int
    seeds: tuple[str, ...]
    mean: float | None
    level: float
    low: float | None
    high: float | None
    n_boot: int
    seed: int


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz, Numerical Recipes ``betacf``)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        even = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        for num in (even, odd):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            return h
    raise ArithmeticError(f"incomplete beta: no convergence for a={a}, b={b}, x={x}")


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function ``I_x(a, b)``."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def _t_tail(t: float, df: float) -> float:
    """``P(T > t)`` for ``t >= 0``: ``I_x(df/2, 1/2) / 2`` at ``x = df / (df + t^2)``, through the
    complement ``1 - I_{1-x}(1/2, df/2)`` while ``x`` is near 1 (small ``t``), where ``1 - x`` would round."""
    t2 = t * t
    if t2 < df:
        return 0.5 * (1.0 - betainc(0.5, 0.5 * df, t2 / (df + t2)))
    return 0.5 * betainc(0.5 * df, 0.5, df / (df + t2))


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (``t_quantile(0.975, 4) = 2.776445``),
    by bisection of the tail probability to the last bit."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0 (got p={p}, df={df})")
    tail = min(p, 1.0 - p)
    if tail == 0.5:
        return 0.0
    lo, hi = 0.0, 1.0
    while _t_tail(hi, df) > tail:  # the tail shrinks as t grows
        lo, hi = hi, 2.0 * hi
    for _ in range(2000):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if _t_tail(mid, df) > tail:
            lo = mid
        else:
            hi = mid
    t = 0.5 * (lo + hi)
    return t if p > 0.5 else -t


def mean_ci(values: Sequence[float], level: float = 0.95) -> MeanCI:
    """Mean, sample standard deviation and the ``level`` Student-t interval ``mean ± t * std / sqrt(n)``."""
    vals = tuple(float(v) for v in values)
    n = len(vals)
    if n == 0:
        return MeanCI(0, None, None, level, None, None, None, vals)
    mean = math.fsum(vals) / n
    if n < 2:
        return MeanCI(n, mean, None, level, None, None, None, vals)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (n - 1))
    half = t_quantile(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    return MeanCI(n, mean, std, level, half, mean - half, mean + half, vals)


def paired_difference(
    a_by_seed: Mapping[str, float], b_by_seed: Mapping[str, float], level: float = 0.95
) -> PairedDifference:
    """``a - b`` on every seed both have (same seed, same data order), with the t interval of the mean."""
    seeds = tuple(s for s in a_by_seed if s in b_by_seed)
    diffs = tuple(float(a_by_seed[s]) - float(b_by_seed[s]) for s in seeds)
    return PairedDifference(seeds, diffs, mean_ci(diffs, level))


def bootstrap_paired(
    per_problem_a: Mapping[str, Mapping[str, float]],
    per_problem_b: Mapping[str, Mapping[str, float]],
    n_boot: int = 10_000,
    seed: int = 0,
    level: float = 0.95,
) -> BootstrapCI:
    """Paired bootstrap of the accuracy difference ``a - b`` over test problems.

    ``per_problem_*`` map seed -> example id -> correctness (0/1, or a score in [0, 1]). The seeds both have
    are used, and the problems every one of those seeds scored on both sides. Each resample draws that many
    problems with replacement and takes the mean difference over them and over the seeds; the interval is
    the resamples' ``(1 - level) / 2`` and ``(1 + level) / 2`` percentiles. Deterministic given ``seed``."""
    seeds = tuple(s for s in per_problem_a if s in per_problem_b)
    ids = sorted(set.intersection(*(set(per_problem_a[s]) & set(per_problem_b[s]) for s in seeds))) if seeds else []
    if not ids:
        return BootstrapCI(0, seeds, None, level, None, None, n_boot, seed)
    diff = np.array([[per_problem_a[s][i] - per_problem_b[s][i] for i in ids] for s in seeds], dtype=np.float64)
    per_problem = diff.mean(axis=0)  # the same problems for every seed: a seed average per problem
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot)
    chunk = max(1, 2_000_000 // len(ids))  # resamples per draw: bounded memory on large test sets
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        stats[start:stop] = per_problem[rng.integers(0, len(ids), size=(stop - start, len(ids)))].mean(axis=1)
    low, high = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return BootstrapCI(len(ids), seeds, float(per_problem.mean()), level, float(low), float(high), n_boot, seed)


def verdict(*intervals: tuple[float | None, float | None]) -> str:
    """``better`` when every interval lies above 0, ``worse`` when every one lies below, else ``inconclusive``
    (also when an interval does not apply)."""
    if not intervals or any(low is None or high is None for low, high in intervals):
        return "inconclusive"
    if all(low > 0 for low, _ in intervals):
        return "better"
    if all(high < 0 for _, high in intervals):
        return "worse"
    return "inconclusive"


def seed_warning(n: int) -> str:
    """``"n=3 < 5"`` for a cell or pair with fewer than :data:`MIN_SEEDS` seeds, else ``""``."""
    return f"n={n} < {MIN_SEEDS}" if n < MIN_SEEDS else ""
