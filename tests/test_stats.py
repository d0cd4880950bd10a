"""bench.stats against independent computations: statsmodels, closed forms, brute-force definitions."""

import math

import numpy as np
import pytest
from scipy import integrate, stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestPower
from statsmodels.stats.proportion import proportion_confint
from statsmodels.stats.weightstats import DescrStatsW

import bench.stats as bs
from bench.stats import (Stats, clip_interval, clopper_pearson, describe, holm, paired_t_power,
                         paired_t_test, seeds_for_power, t_interval)

nan = float("nan")


def same(a, b):
    """Equal sequences, NaN equal to NaN."""
    return len(a) == len(b) and all((math.isnan(x) and math.isnan(y)) or x == y for x, y in zip(a, b))


# --- t_interval ----------------------------------------------------------------------------------

@pytest.mark.parametrize("conf", [0.95, 0.9, 0.99])
@pytest.mark.parametrize("n", [2, 3, 5, 17])
def test_t_interval_matches_statsmodels_and_hand_formula(n, conf):
    x = np.random.default_rng(n).normal(3.0, 2.0, n)
    s = t_interval(x, conf)
    mean = math.fsum(x) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in x) / (n - 1))
    lo, hi = DescrStatsW(x).tconfint_mean(alpha=1 - conf)
    assert s.n == n and isinstance(s.n, int)
    assert s.mean == pytest.approx(mean, rel=1e-13)
    assert s.std == pytest.approx(std, rel=1e-12)
    assert s.ci95 == pytest.approx((hi - lo) / 2, rel=1e-10)


def test_t_interval_closed_form_quantiles():
    # df = 1 is the Cauchy distribution: t_q = tan(pi (q - 1/2)); df = 2: t_q = (2q - 1) / sqrt(2 q (1 - q)).
    s = t_interval([0.0, 2.0])  # mean 1, std sqrt(2): ci = t * sqrt(2) / sqrt(2)
    assert s == pytest.approx((1.0, math.sqrt(2), math.tan(math.pi * 0.475), 2), rel=1e-12)
    q = 0.95
    s = t_interval([1.0, 2.0, 6.0], conf=0.9)  # mean 3, std sqrt(7)
    t2 = (2 * q - 1) / math.sqrt(2 * q * (1 - q))
    assert s.ci95 == pytest.approx(t2 * math.sqrt(7) / math.sqrt(3), rel=1e-12)
    t3 = 3.182446305  # t_{0.975, 3} from a table
    assert t_interval([1, 2, 3, 4]).ci95 == pytest.approx(t3 * math.sqrt(5 / 3) / 2, rel=1e-9)


def test_t_interval_ignores_nonfinite_and_non_numeric():
    messy = [1.0, nan, None, "x", 2.0, float("inf"), -float("inf"), True, np.float32(6.0), 3]
    assert t_interval(messy) == t_interval([1.0, 2.0, 6.0, 3.0])
    assert t_interval(messy).n == 4


def test_t_interval_small_n():
    assert same(t_interval([]), (nan, nan, nan, 0))
    assert same(t_interval([nan, None]), (nan, nan, nan, 0))
    assert same(t_interval([None, 4.5, nan]), (4.5, nan, nan, 1))
    s = t_interval([2.5, 2.5, 2.5])
    assert isinstance(s, Stats) and (s.mean, s.std, s.ci95, s.n) == (2.5, 0.0, 0.0, 3)


@pytest.mark.parametrize("conf", [0, 1, 1.5, -0.1, nan])
def test_t_interval_rejects_bad_conf(conf):
    with pytest.raises(ValueError, match="conf"):
        t_interval([1, 2, 3], conf)


def test_t_interval_rejects_a_string():
    with pytest.raises(TypeError):
        t_interval("123")


# --- paired_t_test -------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
def test_paired_t_test_matches_statsmodels(seed):
    rng = np.random.default_rng(seed)
    d = rng.normal(0.3 * seed, 1.0, 2 + 3 * seed)
    assert paired_t_test(d) == pytest.approx(DescrStatsW(d).ttest_mean(0.0)[1], rel=1e-10)


def test_paired_t_test_closed_form_two_pairs():
    # n = 2: t = mean / (std / sqrt 2) and T_1 is Cauchy, so p = 1 - (2 / pi) atan(|t|).
    d = [1.0, 3.0]  # mean 2, std sqrt 2 -> t = 2
    assert paired_t_test(d) == pytest.approx(1 - 2 / math.pi * math.atan(2.0), rel=1e-12)
    assert paired_t_test([-1.0, -3.0]) == paired_t_test(d)


def test_paired_t_test_tiny_p_is_not_rounded_to_zero():
    d = np.array([10.0, 10.1, 9.9, 10.05, 9.95, 10.02])  # t ~ 300: p ~ 1e-11, 1 - cdf would lose it
    p = paired_t_test(d)
    assert 0 < p < 1e-9 and p == pytest.approx(DescrStatsW(d).ttest_mean(0.0)[1], rel=1e-8)


def test_paired_t_test_ignores_nan_and_needs_two_values():
    assert paired_t_test([1.0, nan, 3.0, None]) == paired_t_test([1.0, 3.0])
    assert math.isnan(paired_t_test([]))
    assert math.isnan(paired_t_test([1.5, nan]))


def test_paired_t_test_equal_diffs_convention():
    assert np.std([0.1] * 3, ddof=1) != 0  # floating point: equal values need not give std 0 ...
    assert paired_t_test([0.1, 0.1, 0.1]) == 0.0  # ... the convention still applies
    assert paired_t_test([-2.0, -2.0]) == 0.0
    assert paired_t_test([0.0, 0.0, 0.0, nan]) == 1.0


# --- holm ----------------------------------------------------------------------------------------

def holm_by_definition(p):
    """adj_(k) = max_{j <= k} min(1, (m - j + 1) p_(j)) over the sorted p, written out with loops."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    out = [0.0] * m
    for k in range(1, m + 1):
        out[order[k - 1]] = max(min(1.0, (m - j + 1) * p[order[j - 1]]) for j in range(1, k + 1))
    return out


def holm_rejects(p, alpha):
    """Holm's step-down test: reject H_(1), H_(2), ... while p_(j) <= alpha / (m - j + 1)."""
    m = len(p)
    rejected = set()
    for j, i in enumerate(sorted(range(m), key=lambda i: p[i]), start=1):
        if p[i] > alpha / (m - j + 1):
            break
        rejected.add(i)
    return rejected


@pytest.mark.parametrize("seed", range(12))
def test_holm_matches_statsmodels_and_definition(seed):
    rng = np.random.default_rng(seed)
    m = 1 + seed * 2
    p = rng.uniform(0, 1, m) ** 3  # many small ones
    if m > 3:
        p[1] = p[0]  # a tie
        p[2] = 0.0
        p[3] = 1.0
    adj = holm(p)
    np.testing.assert_allclose(adj, multipletests(p, method="holm")[1], rtol=1e-14, atol=0)
    np.testing.assert_allclose(adj, holm_by_definition(list(p)), rtol=1e-14, atol=0)
    for alpha in (0.001, 0.01, 0.05, 0.1, 0.5):  # adjusted p <= alpha  <=>  rejected at level alpha
        assert {i for i in range(m) if adj[i] <= alpha} == holm_rejects(list(p), alpha)


def test_holm_hand_example_keeps_input_order():
    # sorted 0.01, 0.03, 0.04 -> 3 * 0.01, 2 * 0.03, max(0.06, 1 * 0.04)
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06], rtol=1e-15)
    np.testing.assert_allclose(holm([0.04, 0.03, 0.01]), [0.06, 0.06, 0.03], rtol=1e-15)
    assert holm([0.6, 0.7]).tolist() == [1.0, 1.0]


def test_holm_nan_stays_nan_and_does_not_count():
    p = [0.02, nan, 0.01, None, 0.04]
    adj = holm(p)
    assert np.isnan(adj[[1, 3]]).all()
    sm = multipletests([0.02, 0.01, 0.04], method="holm")[1]
    np.testing.assert_allclose(adj[[0, 2, 4]], sm, rtol=1e-15)
    np.testing.assert_allclose(adj[[0, 2, 4]], [0.04, 0.03, 0.04], rtol=1e-15)  # m = 3, not 5
    assert np.isnan(holm([nan, nan])).all() and holm([]).shape == (0,)


@pytest.mark.parametrize("bad", [[0.1, 1.2], [-0.01], [0.1, float("inf")], [[0.1, 0.2]]])
def test_holm_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        holm(bad)


# --- clopper_pearson -----------------------------------------------------------------------------

def bisect(f, lo=0.0, hi=1.0):
    """Root of an increasing f on [lo, hi], to float precision (2^-60 < 1e-18)."""
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
    return (lo + hi) / 2


def cp_by_bisection(k, n, conf):
    """lo: P(X >= k | p) = a/2 (increasing in p); hi: P(X <= k | p) = a/2 (decreasing in p)."""
    a = 1 - conf
    lo = 0.0 if k == 0 else bisect(lambda p: stats.binom.sf(k - 1, n, p) - a / 2)
    hi = 1.0 if k == n else bisect(lambda p: a / 2 - stats.binom.cdf(k, n, p))
    return lo, hi


@pytest.mark.parametrize("conf", [0.95, 0.9, 0.99])
def test_clopper_pearson_matches_statsmodels_and_bisection(conf):
    for n in [1, 2, 3, 5, 8, 13, 30, 100]:
        for k in range(n + 1):
            lo, hi = clopper_pearson(k, n, conf)
            assert 0.0 <= lo <= k / n <= hi <= 1.0
            sm = proportion_confint(k, n, alpha=1 - conf, method="beta")
            assert (lo, hi) == pytest.approx(sm, abs=1e-12)
            assert (lo, hi) == pytest.approx(cp_by_bisection(k, n, conf), abs=1e-9)


def test_clopper_pearson_closed_forms():
    # k = 0: hi solves (1 - hi)^n = a/2; k = n: lo solves lo^n = a/2.
    for n in (1, 3, 10):
        assert clopper_pearson(0, n) == pytest.approx((0.0, 1 - 0.025 ** (1 / n)), rel=1e-12)
        assert clopper_pearson(n, n) == pytest.approx((0.025 ** (1 / n), 1.0), rel=1e-12)
    assert clopper_pearson(0, 3) == (0.0, pytest.approx(0.707598, abs=1e-6))
    assert clopper_pearson(2.0, 4) == clopper_pearson(2, 4)  # a whole float is accepted


@pytest.mark.parametrize("k, n", [(-1, 3), (4, 3), (0, 0), (1.5, 3), (1, 2.5), (nan, 3), (None, 3)])
def test_clopper_pearson_rejects_bad_counts(k, n):
    with pytest.raises(ValueError, match="k|n"):
        clopper_pearson(k, n)


def test_clopper_pearson_rejects_bad_conf():
    with pytest.raises(ValueError, match="conf"):
        clopper_pearson(1, 3, conf=1.0)


# --- paired_t_power ------------------------------------------------------------------------------

def power_by_integration(effect, sd, n, alpha):
    """T = (Z + nc) / sqrt(V / df), Z ~ N(0, 1), V ~ chi2(df) independent, so conditioning on V:
    power = E_V[ P(Z > tc s - nc) + P(Z < -tc s - nc) ],  s = sqrt(V / df)."""
    df, nc = n - 1, effect / sd * math.sqrt(n)
    tc = stats.t.ppf(1 - alpha / 2, df)

    def f(v):
        s = math.sqrt(v / df)
        return stats.chi2.pdf(v, df) * (stats.norm.sf(tc * s - nc) + stats.norm.cdf(-tc * s - nc))

    mid = stats.chi2.ppf(0.5, df)  # split at the median so quad sees the bulk of the density
    return (integrate.quad(f, 0, mid, epsabs=1e-13, epsrel=1e-11, limit=200)[0]
            + integrate.quad(f, mid, np.inf, epsabs=1e-13, epsrel=1e-11, limit=200)[0])


CASES = [(0.5, 1.0, 2, 0.05), (1.0, 2.0, 5, 0.05), (-0.7, 1.0, 10, 0.05), (0.3, 1.0, 30, 0.05 / 6),
         (2.0, 1.0, 3, 0.01), (0.1, 1.0, 200, 0.05), (1.2, 0.5, 4, 0.05 / 6), (0.0, 1.0, 7, 0.05)]


@pytest.mark.parametrize("effect, sd, n, alpha", CASES)
def test_power_matches_statsmodels_and_integration(effect, sd, n, alpha):
    pw = paired_t_power(effect, sd, n, alpha)
    sm = TTestPower().power(effect_size=effect / sd, nobs=n, alpha=alpha, alternative="two-sided")
    assert pw == pytest.approx(sm, abs=1e-12)
    # quad is asked for ~1e-11 relative accuracy; 1e-8 leaves room for its error estimate being loose
    assert pw == pytest.approx(power_by_integration(effect, sd, n, alpha), abs=1e-8)


def test_power_large_noncentrality_is_finite():
    # scipy's nct.cdf(-tc, 50, 40) is nan (and so is statsmodels' power there); integration is not
    for effect, n in [(40 / math.sqrt(51), 51), (8 / math.sqrt(2), 2), (3.0, 10000)]:
        pw = paired_t_power(effect, 1.0, n)
        assert pw == pytest.approx(power_by_integration(effect, 1.0, n, 0.05), abs=1e-8)


def test_power_monte_carlo():
    # 200,000 simulated experiments of n = 6 pairs, each tested with scipy's ttest_1samp at 0.05.
    # The rejection rate has standard error sqrt(p (1 - p) / R) <= 0.5 / sqrt(2e5) = 0.0011; the
    # tolerance 0.006 is > 5 standard errors (seed fixed, so deterministic; a correct power fails
    # for a random seed with probability < 1e-6). Getting df or sqrt(n) wrong moves the power by > 0.02.
    rng = np.random.default_rng(12345)
    n, effect, sd = 6, 0.8, 1.3
    d = rng.normal(effect, sd, (200_000, n))
    rate = np.mean(stats.ttest_1samp(d, 0.0, axis=1).pvalue < 0.05)
    assert paired_t_power(effect, sd, n) == pytest.approx(rate, abs=0.006)
    assert abs(paired_t_power(effect, sd, n + 1) - rate) > 0.02  # the check tells n from n +- 1
    assert abs(paired_t_power(effect, sd, n - 1) - rate) > 0.02


def test_power_properties():
    for n in (2, 3, 10, 100):
        assert paired_t_power(0.0, 1.0, n, 0.05) == pytest.approx(0.05, abs=1e-12)  # size of the test
        assert paired_t_power(0.4, 1.0, n) == paired_t_power(-0.4, 1.0, n) == paired_t_power(0.8, 2.0, n)
    pw = [paired_t_power(0.3, 1.0, n) for n in range(2, 300)]
    assert all(a < b for a, b in zip(pw, pw[1:]))  # increasing in n: what seeds_for_power relies on


def test_power_edge_cases():
    assert math.isnan(paired_t_power(1.0, 1.0, 1)) and math.isnan(paired_t_power(1.0, 1.0, 0))
    assert math.isnan(paired_t_power(nan, 1.0, 5)) and math.isnan(paired_t_power(1.0, nan, 5))
    assert paired_t_power(0.5, 0.0, 3) == 1.0  # paired_t_test's convention for equal diffs
    assert paired_t_power(0.0, 0.0, 3) == 0.0
    assert paired_t_power(float("inf"), 1.0, 3) == 1.0
    assert math.isnan(paired_t_power(float("inf"), float("inf"), 3))
    with pytest.raises(ValueError, match="sd"):
        paired_t_power(1.0, -1.0, 5)
    with pytest.raises(ValueError, match="n"):
        paired_t_power(1.0, 1.0, 4.5)
    with pytest.raises(ValueError, match="alpha"):
        paired_t_power(1.0, 1.0, 5, alpha=0)


# --- seeds_for_power -----------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [0.05, 0.05 / 6])
def test_seeds_for_power_matches_statsmodels(alpha):
    for effect in np.round(np.linspace(0.1, 3.0, 30), 2):
        for target in (0.8, 0.9):
            n = seeds_for_power(effect, 1.0, alpha, target)
            sm = TTestPower().solve_power(effect_size=effect, alpha=alpha, power=target,
                                          alternative="two-sided")
            assert n == math.ceil(sm), (effect, target)
            assert seeds_for_power(-2 * effect, 2.0, alpha, target) == n  # only |effect| / sd matters


@pytest.mark.parametrize("effect, alpha, target", [(0.5, 0.05, 0.8), (1.0, 0.05 / 6, 0.9), (2.5, 0.05, 0.8),
                                                   (0.25, 0.01, 0.5)])
def test_seeds_for_power_is_smallest_by_linear_scan(effect, alpha, target):
    n = seeds_for_power(effect, 1.0, alpha, target)
    scan = next(m for m in range(2, 1000) if paired_t_power(effect, 1.0, m, alpha) >= target)
    assert n == scan and isinstance(n, int)
    assert power_by_integration(effect, 1.0, n, alpha) >= target  # the boundary, by the independent power
    assert n == 2 or power_by_integration(effect, 1.0, n - 1, alpha) < target


def test_seeds_for_power_max_n_boundary():
    n = seeds_for_power(0.3, 1.0)
    assert n == math.ceil(TTestPower().solve_power(effect_size=0.3, alpha=0.05, power=0.8)) == 90
    assert seeds_for_power(0.3, 1.0, max_n=n) == n  # reached exactly at max_n (not a power of 2)
    assert seeds_for_power(0.3, 1.0, max_n=n - 1) is None
    assert seeds_for_power(0.3, 1.0, max_n=2) is None
    assert seeds_for_power(0.01, 1.0) is None  # needs ~78,000 > 10,000
    assert seeds_for_power(20.0, 1.0, max_n=2) == 2  # power 0.97 with 2 pairs


def test_seeds_for_power_uses_a_logarithmic_search(monkeypatch):
    calls = []
    power = bs.paired_t_power

    def counted(*args):
        calls.append(args)
        return power(*args)

    monkeypatch.setattr(bs, "paired_t_power", counted)
    assert seeds_for_power(0.05, 1.0, max_n=10000) == math.ceil(
        TTestPower().solve_power(effect_size=0.05, alpha=0.05, power=0.8, alternative="two-sided"))
    assert len(calls) <= 2 * math.ceil(math.log2(10000)) + 2  # doubling + bisection, not a scan


def test_seeds_for_power_edge_cases():
    inf = float("inf")
    for effect, sd in [(0.0, 1.0), (nan, 1.0), (inf, 1.0), (-inf, 1.0), (1.0, nan), (1.0, inf), (0.0, 0.0)]:
        assert seeds_for_power(effect, sd) is None, (effect, sd)
    assert seeds_for_power(0.5, 0.0) == 2  # no noise: the convention of paired_t_test rejects with 2 pairs
    with pytest.raises(ValueError, match="sd"):
        seeds_for_power(1.0, -1.0)
    with pytest.raises(ValueError, match="max_n"):
        seeds_for_power(1.0, 1.0, max_n=1)
    with pytest.raises(ValueError, match="power"):
        seeds_for_power(1.0, 1.0, power=1.0)


# --- clip_interval and describe ------------------------------------------------------------------

def test_clip_interval():
    assert clip_interval(-5.0, 105.0, 0, 100) == (0.0, 100.0)
    assert clip_interval(10.0, 20.0, 0, 100) == (10.0, 20.0)
    assert clip_interval(95.0, 103.0, upper=100) == (95.0, 100.0)
    assert clip_interval(-3.0, 2.0, lower=0) == (0.0, 2.0)
    assert clip_interval(-3.0, 2.0) == (-3.0, 2.0)
    assert clip_interval(110.0, 120.0, 0, 100) == (100.0, 100.0)  # both ends outside: a point at the bound
    assert same(clip_interval(nan, 5.0, 0, 100), (nan, 5.0))
    assert same(clip_interval(-1.0, nan, 0, 100), (0.0, nan))
    assert all(type(v) is float for v in clip_interval(np.float32(1), 2, 0, 100))
    with pytest.raises(ValueError, match="lower <= upper"):
        clip_interval(1.0, 2.0, 5, 0)
    with pytest.raises(ValueError, match="lo <= hi"):
        clip_interval(3.0, 2.0)


def test_describe():
    values = [3.0, nan, 1.0, None, 10.0, 2.0]
    d = describe(values)
    assert list(d) == ["mean", "std", "ci95", "n", "median", "min", "max"]
    assert (d["mean"], d["std"], d["ci95"], d["n"]) == tuple(t_interval(values))
    assert (d["n"], d["median"], d["min"], d["max"]) == (4, 2.5, 1.0, 10.0)
    assert d["mean"] == 4.0 and d["std"] == pytest.approx(math.sqrt(50 / 3), rel=1e-14)
    empty = describe([nan, None])
    assert empty["n"] == 0 and all(math.isnan(empty[k]) for k in empty if k != "n")
    one = describe([7.0])
    assert (one["mean"], one["median"], one["min"], one["max"], one["n"]) == (7.0, 7.0, 7.0, 7.0, 1)
    assert math.isnan(one["std"]) and math.isnan(one["ci95"])
