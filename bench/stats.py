"""Exact statistics for leaderboard tables over random seeds (numpy and scipy only).

Convention: every p-value, interval and power below is over seeds. Each seed is one
independent replicate of a run; two runs that share a seed form a pair, and a paired
difference is d_s = metric(a, seed s) - metric(b, seed s). Only finite values count:
NaN, +-inf and non-numeric entries (None, strings, bools) are ignored, and n is the
number of values left. t_q(df) is the q-quantile of Student's t with df degrees of freedom.
Invalid arguments raise ValueError: a level (conf, alpha, power) outside (0, 1), a p-value
outside [0, 1], a count that is not a whole number, sd < 0, lo > hi or lower > upper.

t_interval(values, conf=0.95) -> Stats(mean, std, ci95, n)
    mean = sum(x) / n,  std = sqrt(sum((x - mean)^2) / (n - 1))   (ddof=1),
    ci95 = t_{(1+conf)/2}(n-1) * std / sqrt(n)                     (mean +- ci95).
    n = 0: (nan, nan, nan, 0);  n = 1: (x, nan, nan, 1).

paired_t_test(diffs) -> p
    t = mean(d) / (std(d) / sqrt(n)),  p = 2 * P(T_{n-1} > |t|)   (two-sided, H0: mean = 0).
    n < 2: nan. All d equal (std 0): p = 0.0 if d != 0, p = 1.0 if d == 0.

holm(pvalues) -> adjusted p-values (Holm 1979, step-down)
    With the m non-NaN p-values sorted, p_(1) <= ... <= p_(m):
    adj_(k) = max_{j <= k} min(1, (m - j + 1) * p_(j)),  returned in input order.
    NaN entries stay NaN and do not count toward m.

clopper_pearson(k, n, conf=0.95) -> (lo, hi)
    Exact interval for a proportion of k events (failures) in n trials, a = 1 - conf:
    lo = BetaPPF(a/2; k, n-k+1)  (0 when k = 0),  hi = BetaPPF(1-a/2; k+1, n-k)  (1 when k = n).
    Equivalently P(X >= k | lo) = a/2 and P(X <= k | hi) = a/2 for X ~ Binomial(n, p).

paired_t_power(effect, sd, n, alpha=0.05) -> power
    Power of the two-sided paired t test with n pairs at level alpha, true mean difference
    `effect`, sd of the differences `sd`: df = n - 1, nc = effect / sd * sqrt(n),
    tc = t_{1-alpha/2}(df),  power = P(T > tc) + P(T < -tc),  T ~ noncentral t(df, nc).
    n < 2 or effect/sd nan: nan; effect/sd infinite: 1.0. sd = 0 (every difference equals
    effect), by paired_t_test's convention: 1.0 if effect != 0, 0.0 if effect == 0.

seeds_for_power(effect, sd, alpha=0.05, power=0.8, max_n=10000) -> n or None
    Smallest n >= 2 with paired_t_power(effect, sd, n, alpha) >= power (doubling search,
    then bisection; power increases with n). None when effect is 0 or not finite, sd is
    not finite, or max_n is not enough. sd = 0 with effect != 0 gives 2.

clip_interval(lo, hi, lower=None, upper=None) -> (lo', hi')
    Each end clipped to [lower, upper] (a bound of None is open): for showing an interval
    of a bounded quantity (accuracy in [0, 100]). A NaN end stays NaN.

describe(values) -> {mean, std, ci95, n, median, min, max}
    t_interval(values) at 95% plus the median, min and max of the finite values (nan if none).
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import numpy as np
from scipy import stats

NAN = float("nan")


class Stats(NamedTuple):
    """Mean, sample std (ddof=1), half-width of the interval of the mean, number of values.

    The field is named ci95 after the leaderboard column; it holds the half-width at the
    level asked for (0.95 by default).
    """
    mean: float
    std: float
    ci95: float
    n: int


def _finite(values) -> np.ndarray:
    """The finite numeric entries of values (any shape, flattened) as a float array."""
    if isinstance(values, (str, bytes)):
        raise TypeError("values must be a sequence of numbers, not a string")
    flat = np.asarray(values, dtype=object).ravel()
    x = np.array([v for v in flat if isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))],
                 dtype=float)
    return x[np.isfinite(x)]


def _level(name: str, value: float) -> float:
    """A probability strictly between 0 and 1 (conf, alpha, power)."""
    if not 0.0 < value < 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be strictly between 0 and 1, got {value!r}")
    return float(value)


def t_interval(values, conf: float = 0.95) -> Stats:
    """Mean, sample std and Student-t half-width of the finite values (module docstring)."""
    conf = _level("conf", conf)
    x = _finite(values)
    n = x.size
    if n == 0:
        return Stats(NAN, NAN, NAN, 0)
    if n == 1:
        return Stats(float(x[0]), NAN, NAN, 1)
    std = float(np.std(x, ddof=1))
    return Stats(float(np.mean(x)), std, float(stats.t.ppf((1 + conf) / 2, n - 1) * std / math.sqrt(n)), n)


def paired_t_test(diffs) -> float:
    """Two-sided p-value of the one-sample t test of mean(diffs) == 0 over the finite diffs.

    nan with fewer than 2 values. When every diff is equal the t statistic is undefined
    (std 0); by convention p = 0.0 if they are nonzero and p = 1.0 if they are all 0.
    """
    d = _finite(diffs)
    n = d.size
    if n < 2:
        return NAN
    if np.all(d == d[0]):  # tested directly: a computed std of equal values may be 1e-17, not 0
        return 0.0 if d[0] != 0 else 1.0
    t = np.mean(d) / (np.std(d, ddof=1) / math.sqrt(n))
    return float(min(1.0, 2 * stats.t.sf(abs(t), n - 1)))


def holm(pvalues) -> np.ndarray:
    """Holm-Bonferroni step-down adjusted p-values, in input order; NaN (or None) stays NaN."""
    p = np.asarray(pvalues, dtype=float)
    if p.ndim != 1:
        raise ValueError(f"pvalues must be one-dimensional, got shape {p.shape}")
    ok = ~np.isnan(p)
    if np.any((p[ok] < 0) | (p[ok] > 1)):
        raise ValueError(f"p-values must lie in [0, 1], got {p[ok][(p[ok] < 0) | (p[ok] > 1)].tolist()}")
    q = p[ok]
    m = q.size
    order = np.argsort(q, kind="stable")
    adj = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * q[order]))  # (m - j + 1), j = 1..m
    out = np.full(p.shape, np.nan)
    out[np.flatnonzero(ok)[order]] = adj
    return out


def _count(name: str, value) -> int:
    """A whole number (an int, or a float like 3.0), as int."""
    whole = isinstance(value, numbers.Real) and float(value).is_integer()
    if isinstance(value, (bool, np.bool_)) or not whole:
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    return int(value)


def clopper_pearson(k, n, conf: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval for the proportion of k failures out of n runs."""
    conf = _level("conf", conf)
    k, n = _count("k", k), _count("n", n)
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"clopper_pearson needs n >= 1 and 0 <= k <= n, got k={k}, n={n}")
    a = 1 - conf
    lo = 0.0 if k == 0 else float(stats.beta.ppf(a / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(1 - a / 2, k + 1, n - k))
    return lo, hi


def paired_t_power(effect: float, sd: float, n: int, alpha: float = 0.05) -> float:
    """Power of the two-sided paired t test with n pairs (module docstring)."""
    alpha = _level("alpha", alpha)
    n = _count("n", n)
    if sd < 0:
        raise ValueError(f"sd must be >= 0, got {sd!r}")
    if n < 2 or math.isnan(effect) or math.isnan(sd):
        return NAN
    if sd == 0:
        return 1.0 if effect != 0 else 0.0
    r = abs(effect / sd)  # power is symmetric in nc
    if math.isnan(r) or math.isinf(r):  # inf / inf; an infinite effect is always detected
        return NAN if math.isnan(r) else 1.0
    df, nc = n - 1, r * math.sqrt(n)
    tc = stats.t.ppf(1 - alpha / 2, df)
    # P(T < -tc) = P(-T > tc) with -T ~ nct(df, -nc); scipy's nct.cdf(-tc, df, nc) gives nan
    # for large nc, its sf does not.
    return float(np.minimum(1.0, stats.nct.sf(tc, df, nc) + stats.nct.sf(tc, df, -nc)))  # NaN-propagating


def seeds_for_power(effect: float, sd: float, alpha: float = 0.05, power: float = 0.8,
                    max_n: int = 10000) -> int | None:
    """Smallest number of seeds n >= 2 at which the paired t test reaches `power` (module docstring)."""
    alpha, power, max_n = _level("alpha", alpha), _level("power", power), _count("max_n", max_n)
    if max_n < 2:
        raise ValueError(f"max_n must be >= 2, got {max_n}")
    if sd < 0:
        raise ValueError(f"sd must be >= 0, got {sd!r}")
    if effect == 0 or not math.isfinite(effect) or not math.isfinite(sd):
        return None  # sd == 0 needs no branch: its power is 1.0 from n = 2 on

    def enough(n: int) -> bool:
        return paired_t_power(effect, sd, n, alpha) >= power

    if enough(2):
        return 2
    lo, hi = 2, 4  # invariant: not enough(lo); enough(hi) once the doubling stops
    while hi < max_n and not enough(hi):
        lo, hi = hi, 2 * hi
    if hi >= max_n:
        hi = max_n
        if not enough(hi):
            return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if enough(mid) else (mid, hi)
    return hi


def clip_interval(lo: float, hi: float, lower: float | None = None,
                  upper: float | None = None) -> tuple[float, float]:
    """(lo, hi) with each end clipped to [lower, upper]; None is an open bound, a NaN end stays NaN."""
    if lower is not None and upper is not None and not lower <= upper:
        raise ValueError(f"clip_interval needs lower <= upper, got lower={lower!r}, upper={upper!r}")
    if lo > hi:  # False when either is NaN
        raise ValueError(f"clip_interval needs lo <= hi, got lo={lo!r}, hi={hi!r}")

    def clip(x: float) -> float:
        x = float(x)
        if math.isnan(x):
            return x
        if lower is not None:
            x = max(x, float(lower))
        if upper is not None:
            x = min(x, float(upper))
        return x

    return clip(lo), clip(hi)


def describe(values) -> dict:
    """mean, std, ci95 (95%), n, median, min, max of the finite values; nan (n = 0) when there are none."""
    s = t_interval(values)
    x = _finite(values)
    if x.size == 0:
        return {**s._asdict(), "median": NAN, "min": NAN, "max": NAN}
    return {**s._asdict(), "median": float(np.median(x)), "min": float(x.min()), "max": float(x.max())}
