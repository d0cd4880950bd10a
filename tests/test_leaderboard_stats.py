"""The leaderboard's statistics checked against independent computations.

Every figure bench/leaderboard.py adds to a table (paired t test p-values, Holm-adjusted p-values,
seeds for 80% power, failure rates with their Clopper-Pearson interval, intervals clipped to a
metric's bounds, median/min/max) is recomputed here from the per-seed values written into
hand-made run folders, with scipy and statsmodels rather than bench.stats. Tuning with tuning
seeds, its warnings and the exports (provenance comments, one row per run) are checked on folders
built so that a wrong rule gives a different answer.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestPower
from statsmodels.stats.proportion import proportion_confint
from typer.testing import CliRunner

from bench import leaderboard as lb
from bench import results
from dsgdbench import app

BASE = "csgd"
DIVERGED, COLLAPSED = "diverged", "collapsed"
VERSIONS = {"torch": "2.0-test", "dsgdbench": "0.0.1", "git": "abc1234"}


# ----------------------------------------------------------------------------------------------
# run folders


def write_run(root: Path, algo: str, seed: int, test_acc, *, lr: float = 0.1, val_acc: float | None = None,
              top_eig: float | None = None, versions: dict | None = None) -> Path:
    """One run folder (config.json, summary.json). test_acc "diverged"/"collapsed" makes a failed run."""
    status = test_acc if isinstance(test_acc, str) else "completed"
    done = status == "completed"
    cfg = {"algo": algo, "topology": "ring", "workers": 4, "batch": 8, "seed": seed, "lr": lr, "steps": 100,
           "dataset": "synthetic", "model": "mlp", "val_fraction": 0.1, "grad": "plain", "opt": "sgd",
           "comm": "gossip", "results": str(root), "device": "cpu"}
    summary = {"algo": algo, "topology": "ring", "workers": 4, "total_batch": 32, "seed": seed, "lr": lr,
               "steps": 100, "status": status, "run_id": f"{algo}-lr{lr}-s{seed}",
               "config_id": f"{algo}-{lr}", "test_acc": test_acc if done else None,
               "test_loss": (100 - test_acc) / 100 if done else None, "val_acc": val_acc if done else None,
               "top_eig": top_eig if done else None, "grad_evals_per_step": 1, "bytes_per_step": 1000.0,
               "train_seconds": 10.0, "versions": versions or VERSIONS}
    if status == DIVERGED:
        summary["diverged_step"] = 40
    d = root / f"{algo}-lr{lr}-s{seed}"
    d.mkdir(parents=True)
    results.write_json(d / "config.json", cfg)
    results.write_json(d / "summary.json", summary)
    return d


# Per-seed test accuracy of the folder used by the paired tests: csgd is the baseline.
#   dsgd - csgd = 1.5, 2.0, 1.0, 1.8, 1.2    p = 0.0012: significant before and after Holm
#   sam  - csgd = 1.0, 0.2, 0.9, 0.5 (seed 4 diverged)
#                                            p = 0.039 < 0.05, but Holm (rank 2 of 3) gives 0.078
#   lamb - csgd = -0.5, 0.7, 0.1 (seed 3 collapsed, seed 4 diverged)    p = 0.8
#   adam - csgd = 3.0 (one pair; seed 1 collapsed): no test, outside the family
BASE_ACC = [80.0, 82.0, 81.0, 83.0, 79.0]
DIFFS = {"dsgd": [1.5, 2.0, 1.0, 1.8, 1.2], "sam": [1.0, 0.2, 0.9, 0.5, DIVERGED],
         "lamb": [-0.5, 0.7, 0.1, COLLAPSED, DIVERGED], "adam": [3.0, COLLAPSED]}
# top_eig only for csgd, dsgd and sam: its family has 2 members, test_acc's has 3
BASE_EIG = [10.0, 11.0, 12.0, 10.5, 11.5]
EIG_DIFFS = {"dsgd": [-1.0, -2.0, -1.5, -0.5, -1.2], "sam": [0.3, -0.2, 0.4, 0.1]}


def acc_of(algo: str) -> dict:
    """seed -> test accuracy (or failure status) of an algorithm of the paired folder."""
    if algo == BASE:
        return dict(enumerate(BASE_ACC))
    return {s: d if isinstance(d, str) else BASE_ACC[s] + d for s, d in enumerate(DIFFS[algo])}


def paired_folder(root: Path) -> Path:
    for algo in (BASE, *DIFFS):
        for seed, acc in acc_of(algo).items():
            eig = None
            if algo == BASE:
                eig = BASE_EIG[seed]
            elif algo in EIG_DIFFS and seed < len(EIG_DIFFS[algo]):
                eig = BASE_EIG[seed] + EIG_DIFFS[algo][seed]
            write_run(root, algo, seed, acc, top_eig=eig)
    return root


def paired_board(root: Path, robust: bool = False):
    return lb.leaderboard(lb.runs_frame(str(paired_folder(root))), metrics=("test_acc", "test_loss", "top_eig"),
                          baseline=BASE, robust=robust)


def by_algo(numeric: pd.DataFrame, display: pd.DataFrame, algo: str):
    i = np.flatnonzero((numeric["algo"] == algo).to_numpy())
    assert len(i) == 1, f"{algo}: {len(i)} rows"
    return numeric.iloc[i[0]], display.iloc[i[0]]


# ----------------------------------------------------------------------------------------------
# independent computations (scipy, statsmodels)


def observed_diffs(metric: str) -> dict[str, list[float]]:
    """algo -> metric(algo, s) - metric(csgd, s) over the seeds both completed, from the values written."""
    out = {}
    base = acc_of(BASE)
    for algo in DIFFS:
        a = acc_of(algo)
        shared = [s for s in a if not isinstance(a[s], str) and s in base]
        if metric == "test_acc":
            out[algo] = [a[s] - base[s] for s in shared]
        elif metric == "test_loss":
            out[algo] = [(100 - a[s]) / 100 - (100 - base[s]) / 100 for s in shared]
        else:  # top_eig
            e = EIG_DIFFS.get(algo, [])
            out[algo] = [(BASE_EIG[s] + e[s]) - BASE_EIG[s] for s in shared if s < len(e)]
    return out


def expected_tests(metric: str) -> dict[str, dict]:
    """Per algo: raw p (scipy), Holm over the algos with >= 2 pairs (statsmodels), seeds for 80% power."""
    diffs = observed_diffs(metric)
    family = [a for a, d in diffs.items() if len(d) >= 2]
    raw = {a: sps.ttest_1samp(diffs[a], 0.0).pvalue for a in family}
    adjusted = dict(zip(family, multipletests([raw[a] for a in family], alpha=0.05, method="holm")[1]))
    alpha = 0.05 / len(family)
    out = {}
    for a, d in diffs.items():
        if a not in family:
            out[a] = {"n": len(d), "p": math.nan, "p_holm": math.nan, "seeds80": math.nan, "seeds80_1pt": math.nan}
            continue
        sd = float(np.std(d, ddof=1))
        out[a] = {"n": len(d), "mean": float(np.mean(d)), "sd": sd, "p": raw[a], "p_holm": adjusted[a],
                  "effect": abs(np.mean(d)) / sd, "seeds80": seeds80(abs(np.mean(d)) / sd, alpha),
                  "seeds80_1pt": seeds80(1.0 / sd, alpha) if metric == "test_acc" else math.nan, "alpha": alpha}
    return out


def seeds80(effect: float, alpha: float) -> int:
    """Pairs a two-sided paired t test at alpha needs for 80% power at this standardized effect (>= 2)."""
    power = TTestPower().power
    if power(effect_size=effect, nobs=2, alpha=alpha) >= 0.8:
        return 2  # a paired test needs two pairs, however large the effect (the solver may give n < 2 or fail)
    n = max(2, math.ceil(TTestPower().solve_power(effect_size=effect, alpha=alpha, power=0.8,
                                                  alternative="two-sided")))
    # ceil is the smallest whole number of pairs with power >= 0.8 (guards against solver tolerance)
    assert power(effect_size=effect, nobs=n, alpha=alpha) >= 0.8 - 1e-9
    assert n == 2 or power(effect_size=effect, nobs=n - 1, alpha=alpha) < 0.8
    return n


def status_text(counts: dict[str, int], n: int) -> str:
    k = sum(counts.values())
    if k == 0:
        return "ok"
    lo, hi = proportion_confint(k, n, alpha=0.05, method="beta")
    what = ", ".join(f"{v} {s}" for s, v in counts.items() if v)
    return f"{k}/{n} failed ({what}; {100 * lo:.0f}–{100 * hi:.0f}%)"


# ----------------------------------------------------------------------------------------------
# paired tests against the baseline


@pytest.mark.parametrize("metric", ["test_acc", "test_loss", "top_eig"])
def test_paired_p_values_and_holm_match_scipy_and_statsmodels(tmp_path, metric):
    numeric, _ = paired_board(tmp_path)
    want = expected_tests(metric)
    # the families differ: three comparisons with >= 2 pairs for test accuracy and loss, two for top_eig
    assert sum(not math.isnan(w["p"]) for w in want.values()) == (2 if metric == "top_eig" else 3)
    for algo, w in want.items():
        num, _ = by_algo(numeric, numeric, algo)
        assert num[f"delta_{metric}_n"] == w["n"], algo
        assert num[f"delta_{metric}_p"] == pytest.approx(w["p"], rel=1e-9, nan_ok=True), algo
        assert num[f"delta_{metric}_p_holm"] == pytest.approx(w["p_holm"], rel=1e-9, nan_ok=True), algo
        if w["n"] >= 2:
            assert num[f"delta_{metric}_mean"] == pytest.approx(w["mean"], abs=1e-9)
            assert num[f"delta_{metric}_std"] == pytest.approx(w["sd"], rel=1e-9)
            ci = sps.t.ppf(0.975, w["n"] - 1) * w["sd"] / math.sqrt(w["n"])
            assert num[f"delta_{metric}_ci95"] == pytest.approx(ci, rel=1e-9)
    base, _ = by_algo(numeric, numeric, BASE)
    assert base["is_baseline"] and math.isnan(base[f"delta_{metric}_p"])


def test_holm_turns_a_raw_significance_off(tmp_path):
    """sam: raw p < 0.05 (its 95% CI excludes 0), Holm's p >= 0.05: no "*"; dsgd keeps its "*"."""
    numeric, display = paired_board(tmp_path)
    want = expected_tests("test_acc")
    col = f"Δ test acc vs {BASE}"
    sam, sam_d = by_algo(numeric, display, "sam")
    assert want["sam"]["p"] < 0.05 <= want["sam"]["p_holm"]  # the construction
    assert sam["delta_test_acc_p"] < 0.05 and sam["delta_test_acc_p_holm"] >= 0.05
    assert abs(sam["delta_test_acc_mean"]) > sam["delta_test_acc_ci95"]  # the old rule would have starred it
    assert lb.SIGNIFICANT not in sam_d[col] and sam_d[col].endswith("(4)")
    for algo in ("dsgd", "sam", "lamb", "adam"):
        num, disp = by_algo(numeric, display, algo)
        starred = disp[col].endswith(f" {lb.SIGNIFICANT}")
        assert starred == (num["delta_test_acc_p_holm"] < 0.05), (algo, disp[col])
    assert by_algo(numeric, display, "dsgd")[1][col].endswith(" *")
    assert by_algo(numeric, display, "lamb")[1][col] == "+0.10 ± 1.49 (3)"
    # the p (Holm) column shows the adjusted p, not the raw one
    assert sam_d["p (Holm)"] == f"{want['sam']['p_holm']:.3f}" == "0.078"
    assert by_algo(numeric, display, "dsgd")[1]["p (Holm)"] == f"{want['dsgd']['p_holm']:.3f}"
    adam, adam_d = by_algo(numeric, display, "adam")  # one pair: no test, no power, no star
    assert adam_d[col] == "+3.00 (1)" and adam_d["p (Holm)"] == "—" and adam_d["seeds for 80%"] == "— / —"
    assert by_algo(numeric, display, BASE)[1][col] == "baseline"
    assert any("Holm-corrected over the 3 comparisons" in n for n in display.attrs["notes"])


@pytest.mark.parametrize("metric", ["test_acc", "test_loss", "top_eig"])
def test_seeds_for_80_percent_power_match_statsmodels(tmp_path, metric):
    numeric, _ = paired_board(tmp_path)
    want = expected_tests(metric)
    for algo, w in want.items():
        num, _ = by_algo(numeric, numeric, algo)
        if w["n"] < 2:
            assert math.isnan(num[f"delta_{metric}_seeds80"]), algo
            continue
        assert num[f"delta_{metric}_seeds80"] == w["seeds80"], (algo, w)
        if metric == "test_acc":
            assert num["delta_test_acc_seeds80_1pt"] == w["seeds80_1pt"], (algo, w)
    if metric != "test_acc":  # "1 point" is a difference of accuracy only
        assert f"delta_{metric}_seeds80_1pt" not in numeric.columns
    # the level is 0.05 / m with m the size of this metric's family: the construction tells m from m +- 1
    # (and from the unadjusted 0.05) for some row
    m = sum(not math.isnan(w["p"]) for w in want.values())
    assert any(all(seeds80(w["effect"], 0.05 / k) != w["seeds80"] for k in (1, m - 1, m + 1))
               for w in want.values() if w["n"] >= 2)


def test_seeds_for_80_percent_display(tmp_path):
    numeric, display = paired_board(tmp_path)
    want = expected_tests("test_acc")
    for algo in ("dsgd", "sam", "lamb"):
        _, disp = by_algo(numeric, display, algo)
        assert disp["seeds for 80%"] == f"{want[algo]['seeds80']} / {want[algo]['seeds80_1pt']}", algo
    assert by_algo(numeric, display, BASE)[1]["seeds for 80%"] == ""
    # the new columns follow the 95% CI (and the robust summary) directly
    cols = list(display.columns)
    i = cols.index("95% CI")
    assert cols[i + 1:i + 4] == [f"Δ test acc vs {BASE}", "p (Holm)", "seeds for 80%"]
    _, robust = paired_board(tmp_path / "robust", robust=True)
    cols = list(robust.columns)
    i = cols.index("95% CI")
    assert cols[i + 1:i + 5] == ["median [min, max]", f"Δ test acc vs {BASE}", "p (Holm)", "seeds for 80%"]


def test_seeds_for_80_percent_at_least_two(tmp_path):
    """A huge effect (d = 13, 14, 15: 14 sd) is detected with the fewest pairs a t test has: 2.

    (statsmodels' power is NaN for some larger effects, so the effect is 14, where it is finite.)"""
    d = [13.0, 14.0, 15.0]
    for seed, x in enumerate(d):
        write_run(tmp_path, BASE, seed, 40.0)
        write_run(tmp_path, "dsgd", seed, 40.0 + x)
    numeric, display = lb.leaderboard(lb.runs_frame(str(tmp_path)), metrics=("test_acc",), baseline=BASE)
    num, disp = by_algo(numeric, display, "dsgd")
    sd = float(np.std(d, ddof=1))
    assert TTestPower().power(effect_size=14.0 / sd, nobs=2, alpha=0.05) >= 0.8  # the construction
    assert num["delta_test_acc_seeds80"] == 2 == seeds80(14.0 / sd, 0.05)
    assert num["delta_test_acc_seeds80_1pt"] == seeds80(1.0 / sd, 0.05) > 2
    assert disp["seeds for 80%"] == f"2 / {seeds80(1.0 / sd, 0.05)}" and disp["Δ test acc vs csgd"].endswith(" *")


# ----------------------------------------------------------------------------------------------
# failures


def test_failure_counts_rates_and_clopper_pearson(tmp_path):
    numeric, display = paired_board(tmp_path)
    for algo in (BASE, *DIFFS):
        acc = acc_of(algo)
        n = len(acc)
        counts = {DIVERGED: sum(v == DIVERGED for v in acc.values()),
                  COLLAPSED: sum(v == COLLAPSED for v in acc.values())}
        k = sum(counts.values())
        num, disp = by_algo(numeric, display, algo)
        assert (num["seeds"], num["failed"], num["diverged"], num["collapsed"]) == (n, k, counts[DIVERGED],
                                                                                 counts[COLLAPSED]), algo
        assert num["failure_rate"] == pytest.approx(k / n)
        lo, hi = proportion_confint(k, n, alpha=0.05, method="beta")
        assert num["failure_lo"] == pytest.approx(lo, abs=1e-9) and num["failure_hi"] == pytest.approx(hi, abs=1e-9)
        assert disp["status"] == status_text(counts, n), algo
        assert disp["seeds"] == str(n)
        # a failed run is never averaged in
        done = [v for v in acc.values() if not isinstance(v, str)]
        assert num["test_acc_n"] == len(done) and num["test_acc_mean"] == pytest.approx(np.mean(done))
    assert by_algo(numeric, display, "lamb")[1]["status"] == "2/5 failed (1 diverged, 1 collapsed; 5–85%)"
    assert by_algo(numeric, display, "adam")[1]["status"] == "1/2 failed (1 collapsed; 1–99%)"
    assert by_algo(numeric, display, "dsgd")[1]["status"] == "ok"
    assert any("Clopper-Pearson" in n for n in display.attrs["notes"])


# ----------------------------------------------------------------------------------------------
# intervals within bounds, median, min, max


def test_interval_clipped_to_bounds_and_robust_summary(tmp_path):
    near = [99.0, 99.9, 100.0]  # the t interval of the mean reaches past 100 %
    for seed, acc in enumerate(near):
        write_run(tmp_path, "sgdm", seed, acc)
    write_run(tmp_path, "sgdm", 3, DIVERGED)
    spread = [80.0, 81.0, 90.0]  # median 81 != mean 83.67
    for seed, acc in enumerate(spread):
        write_run(tmp_path, "dsgd", seed, acc)
    numeric, display = lb.leaderboard(lb.runs_frame(str(tmp_path)), metrics=("test_acc", "test_loss"), robust=True)

    num, disp = by_algo(numeric, display, "sgdm")
    m, sd = np.mean(near), np.std(near, ddof=1)
    ci = sps.t.ppf(0.975, len(near) - 1) * sd / math.sqrt(len(near))
    assert m + ci > 100  # the construction
    assert num["test_acc_ci95"] == pytest.approx(ci, rel=1e-9)
    assert num["test_acc_lo"] == pytest.approx(m - ci, rel=1e-9) and num["test_acc_hi"] == 100.0
    assert disp["95% CI"] == f"[{m - ci:.2f}, 100.00]"
    loss = [(100 - a) / 100 for a in near]  # 0.01, 0.001, 0: its interval reaches below 0
    lm, lci = np.mean(loss), sps.t.ppf(0.975, 2) * np.std(loss, ddof=1) / math.sqrt(3)
    assert lm - lci < 0 and num["test_loss_lo"] == 0.0 and num["test_loss_hi"] == pytest.approx(lm + lci)
    assert num["test_acc_median"] == pytest.approx(np.median(near))
    assert (num["test_acc_min"], num["test_acc_max"]) == (min(near), max(near))

    num, disp = by_algo(numeric, display, "dsgd")
    m, sd = np.mean(spread), np.std(spread, ddof=1)
    ci = sps.t.ppf(0.975, 2) * sd / math.sqrt(3)
    assert (num["test_acc_lo"], num["test_acc_hi"]) == pytest.approx((m - ci, m + ci), rel=1e-9)  # not clipped
    assert num["test_acc_median"] == 81.0 and num["test_acc_min"] == 80.0 and num["test_acc_max"] == 90.0
    assert num["test_loss_median"] == pytest.approx(0.19)
    assert disp["median [min, max]"] == "81.00 [80.00, 90.00]"
    assert disp["95% CI"] == f"[{m - ci:.2f}, {m + ci:.2f}]"


def test_one_seed_has_no_interval(tmp_path):
    write_run(tmp_path, "dsgd", 0, 99.5)
    numeric, display = lb.leaderboard(lb.runs_frame(str(tmp_path)), metrics=("test_acc",), robust=True)
    num, disp = numeric.iloc[0], display.iloc[0]
    assert math.isnan(num["test_acc_lo"]) and math.isnan(num["test_acc_hi"]) and disp["95% CI"] == "—"
    assert num["test_acc_median"] == num["test_acc_min"] == num["test_acc_max"] == 99.5
    assert disp["median [min, max]"] == "99.50 [99.50, 99.50]"


# ----------------------------------------------------------------------------------------------
# tuning on tuning seeds, reporting the others

TUNE, REPORT = [100, 101], [0, 1, 2]


def tune_folder(root: Path) -> Path:
    """val_acc per lr; the tuning seeds and the report seeds prefer different values.

    dsgd: tuning seeds best at lr 0.4, the largest of three (edge); the report seeds would pick 0.1
          (pooled over all seeds, 0.1 wins too).
    csgd: lr 0.4 has the best val_acc on seed 101 but diverged on seed 100: 0.1 wins (middle value).
    sam:  two values, the best is the largest: not an edge (a grid of 2 has no inside).
    adam: three values, best in the middle, no run on a report seed.
    """
    tune_val = {"dsgd": {0.05: 70.0, 0.1: 78.0, 0.4: 80.0}, "csgd": {0.05: 70.0, 0.1: 85.0, 0.4: 99.0},
                "sam": {0.1: 60.0, 0.4: 65.0}, "adam": {0.05: 50.0, 0.1: 55.0, 0.4: 52.0}}
    report_val = {"dsgd": {0.05: 70.0, 0.1: 95.0, 0.4: 60.0}, "csgd": {0.05: 70.0, 0.1: 85.0, 0.4: 99.0},
                  "sam": {0.1: 90.0, 0.4: 50.0}}
    for algo, grid in tune_val.items():
        for lr, v in grid.items():
            for k, seed in enumerate(TUNE):
                if algo == "csgd" and lr == 0.4 and seed == 100:
                    write_run(root, algo, seed, DIVERGED, lr=lr)
                    continue
                write_run(root, algo, seed, 50.0 + v / 10, lr=lr, val_acc=v + (k - 0.5))  # +-0.5 around v
    for algo, grid in report_val.items():
        for lr, v in grid.items():
            for seed in REPORT:
                # test accuracy encodes (lr, seed) so that the reported runs can be identified
                write_run(root, algo, seed, 10 * lr + seed + 60.0, lr=lr, val_acc=v)
    return root


def test_tune_chooses_on_tuning_seeds_and_reports_the_others(tmp_path):
    df = lb.runs_frame(str(tune_folder(tmp_path)))
    selected, choices = lb.tune_runs(df, ["lr"], tune_seeds=TUNE)
    ch = choices.set_index("algo")
    assert set(ch.index) == {"dsgd", "csgd", "sam", "adam"}
    assert list(choices.columns[-7:]) == ["candidates", "tune_seeds", "reported", "failed", "val_acc_mean",
                                          "val_acc_std", "edge"]
    # dsgd: chosen on seeds 100, 101 (0.4: 80 > 78), although the report seeds (and all seeds pooled) prefer 0.1
    assert ch.loc["dsgd", "lr"] == 0.4
    assert ch.loc["dsgd", "val_acc_mean"] == pytest.approx(80.0)  # the tuning seeds' mean only
    assert ch.loc["dsgd", "val_acc_std"] == pytest.approx(np.std([79.5, 80.5], ddof=1))
    assert (ch.loc["dsgd", "candidates"], ch.loc["dsgd", "tune_seeds"], ch.loc["dsgd", "reported"]) == (3, 2, 3)
    pooled = df[df["algo"] == "dsgd"].groupby("cfg.lr")["val_acc"].mean()
    assert pooled.idxmax() == 0.1 and df[(df["algo"] == "dsgd") & df["seed"].isin(REPORT)].groupby(
        "cfg.lr")["val_acc"].mean().idxmax() == 0.1  # the construction
    # csgd: 0.4 failed on one tuning seed, ranks below 0.1
    assert ch.loc["csgd", "lr"] == 0.1 and ch.loc["csgd", "failed"] == 0 and ch.loc["csgd", "tune_seeds"] == 2
    assert ch.loc["sam", "lr"] == 0.4 and ch.loc["adam", "lr"] == 0.1 and ch.loc["adam", "reported"] == 0

    # only the report seeds' runs of the chosen values are reported; no tuning seed among them
    assert set(selected["seed"]) <= set(REPORT)
    got = sorted(zip(selected["algo"], selected["cfg.lr"], selected["seed"]))
    want = sorted([("dsgd", 0.4, s) for s in REPORT] + [("csgd", 0.1, s) for s in REPORT]
                  + [("sam", 0.4, s) for s in REPORT])
    assert got == want
    assert dict(zip(selected["algo"], selected[lb.CANDIDATES])) == {"dsgd": 3, "csgd": 3, "sam": 2}

    # the table reports their test accuracy (60 + 10 lr + seed), over the report seeds
    numeric, display = lb.leaderboard(selected, metrics=("test_acc",), tuned=["lr"])
    num, disp = by_algo(numeric, display, "dsgd")
    assert num["seeds"] == 3 and num["test_acc_mean"] == pytest.approx(60.0 + 4.0 + 1.0)
    assert disp["lr (tuned)"] == "0.4 (of 3, grid edge)" and num["tuned_lr"] == 0.4 and num["tuned_lr_edge"]


def test_tune_without_tuning_seeds_shares_them(tmp_path):
    """The contrast: without tune_seeds the choice is made on every seed (dsgd then picks 0.1)."""
    df = lb.runs_frame(str(tune_folder(tmp_path)))
    selected, choices = lb.tune_runs(df, ["lr"])
    ch = choices.set_index("algo")
    assert ch.loc["dsgd", "lr"] == 0.1 and ch.loc["dsgd", "tune_seeds"] == 5 and ch.loc["dsgd", "reported"] == 5
    assert set(selected.loc[selected["algo"] == "dsgd", "seed"]) == set(TUNE + REPORT)
    lines = lb.tune_warnings(choices, ["lr"], None)
    assert any("chose on the same seeds it reports" in ln for ln in lines)


def test_tune_edge_flag_and_warnings(tmp_path):
    df = lb.runs_frame(str(tune_folder(tmp_path)))
    _, choices = lb.tune_runs(df, ["lr"], tune_seeds=TUNE)
    edge = dict(zip(choices["algo"], choices["edge"]))
    assert edge == {"dsgd": "lr", "csgd": "", "sam": "", "adam": ""}
    lines = lb.tune_warnings(choices, ["lr"], TUNE)
    assert lines == [
        "--tune lr: the chosen value is at the edge of its grid (algo=dsgd, lr=0.4); widen the grid",
        "some chosen values have no run on a report seed: run them (dsgdbench suite runs the chosen values on the "
        "report seeds when the suite has tune_seeds)",
    ]
    assert not any("same seeds" in ln for ln in lines)


def test_tune_edge_at_the_smallest_value(tmp_path):
    for lr, v in ((0.05, 90.0), (0.1, 80.0), (0.2, 70.0)):
        for seed in TUNE:
            write_run(tmp_path, "dsgd", seed, 50.0, lr=lr, val_acc=v)
    _, choices = lb.tune_runs(lb.runs_frame(str(tmp_path)), ["lr"], tune_seeds=TUNE)
    assert choices.iloc[0]["lr"] == 0.05 and choices.iloc[0]["edge"] == "lr"
    assert choices.iloc[0]["reported"] == 0


def test_no_edge_when_every_value_failed(tmp_path):
    """Every value of the grid diverged: the choice (the smallest, by the tie rule) is no evidence that the
    best lies beyond the grid, so it is not flagged."""
    for lr in (0.05, 0.1, 0.2):
        for seed in TUNE:
            write_run(tmp_path, "d2", seed, DIVERGED, lr=lr)
            write_run(tmp_path, "dsgd", seed, 80.0, lr=lr, val_acc=90.0 - 100 * lr)  # best at 0.05: an edge
    _, choices = lb.tune_runs(lb.runs_frame(str(tmp_path)), ["lr"], tune_seeds=TUNE)
    choices = choices.set_index("algo")
    assert choices.loc["d2", "lr"] == 0.05 and choices.loc["d2", "failed"] == 2 and choices.loc["d2", "edge"] == ""
    assert choices.loc["dsgd", "edge"] == "lr"
    choices = choices.loc[["d2"]].reset_index()
    assert not any("edge" in ln for ln in lb.tune_warnings(choices, ["lr"], TUNE))


def test_cli_compare_tune_seeds(tmp_path):
    root = tune_folder(tmp_path / "res")
    res = CliRunner().invoke(app, ["compare", str(root), "--tune", "lr", "--tune-seeds", "100,101", "--columns",
                                   "test_acc", "--format", "csv"])
    assert res.exit_code == 0, res.output
    df = pd.read_csv(io.StringIO(res.stdout), comment="#").set_index("algo")
    assert set(df.index) == {"dsgd", "csgd", "sam"}
    assert df.loc["dsgd", "tuned_lr"] == 0.4 and df.loc["dsgd", "seeds"] == 3
    assert df.loc["dsgd", "test_acc_mean"] == pytest.approx(65.0)
    assert "edge of its grid (algo=dsgd, lr=0.4)" in res.stderr
    assert "same seeds" not in res.stderr
    assert bool(df.loc["dsgd", "tuned_lr_edge"]) and not bool(df.loc["csgd", "tuned_lr_edge"])
    res = CliRunner().invoke(app, ["compare", str(root), "--tune", "lr", "--tune-seeds", "100,101", "--columns",
                                   "test_acc", "--format", "md"])
    assert "| 0.4 (of 3, grid edge) |" in res.stdout.replace("  ", " ").replace("  ", " ")


# ----------------------------------------------------------------------------------------------
# exports: provenance comments, one row per run


def test_render_csv_provenance_comments_parse_back(tmp_path):
    numeric, display = paired_board(tmp_path)
    df = lb.runs_frame(str(tmp_path))
    prov = lb.provenance(df, "dsgdbench compare res --baseline csgd")
    assert prov[0].startswith("made by `dsgdbench compare res --baseline csgd` with dsgdbench ")
    n_runs = sum(len(acc_of(a)) for a in (BASE, *DIFFS))
    assert prov[1] == f"runs: {n_runs} at dsgdbench 0.0.1 (git abc1234), torch 2.0-test"
    text = lb.render(numeric, display, "csv", provenance=prov)
    lines = text.splitlines()
    assert lines[:len(prov)] == [f"# {p}" for p in prov] and not lines[len(prov)].startswith("#")
    back = pd.read_csv(io.StringIO(text), comment="#")
    assert list(back.columns) == list(numeric.columns) and len(back) == len(numeric)
    for col in ("delta_test_acc_p", "delta_test_acc_p_holm", "delta_test_acc_seeds80", "failure_lo", "failure_hi",
                "test_acc_lo", "test_acc_hi", "test_acc_median"):
        assert back[col].to_numpy(dtype=float) == pytest.approx(numeric[col].to_numpy(dtype=float), nan_ok=True), col
    assert list(back["algo"]) == list(numeric["algo"])
    # tex: comments first; md: the provenance last
    tex = lb.render(numeric, display, "tex", provenance=prov)
    assert tex.splitlines()[:2] == [f"% {p}" for p in prov] and tex.splitlines()[2].startswith(r"\begin{tabular}")
    md = lb.render(numeric, display, "md", provenance=prov).strip().splitlines()
    assert md[0].startswith("| algo") and md[-1] == prov[-1] and md[-3] == prov[0]


def test_provenance_lists_each_version_of_the_runs(tmp_path):
    write_run(tmp_path, "dsgd", 0, 80.0)
    write_run(tmp_path, "dsgd", 1, 81.0, versions={"torch": "2.1", "dsgdbench": "0.0.2", "git": "def5678"})
    write_run(tmp_path, "dsgd", 2, 82.0, versions={"torch": "2.1", "dsgdbench": "0.0.2", "git": "def5678"})
    lines = lb.provenance(lb.runs_frame(str(tmp_path)), "dsgdbench compare x")
    assert lines[1] == "runs: 2 at dsgdbench 0.0.2 (git def5678), torch 2.1; 1 at dsgdbench 0.0.1 (git abc1234), " \
                       "torch 2.0-test"


def test_runs_export_one_row_per_run(tmp_path):
    numeric, display = paired_board(tmp_path)
    df = lb.runs_frame(str(tmp_path))
    prov = lb.provenance(df, "dsgdbench compare res --format runs")
    text = lb.render(numeric, display, "runs", provenance=prov, runs=df)
    assert text.splitlines()[:len(prov)] == [f"# {p}" for p in prov]
    back = pd.read_csv(io.StringIO(text), comment="#")
    want = sorted((a, s, v if isinstance(v, str) else "completed") for a in (BASE, *DIFFS)
                  for s, v in acc_of(a).items())
    assert len(back) == len(want)
    assert sorted(zip(back["algo"], back["seed"], back["status"])) == want
    for a in (BASE, *DIFFS):
        for s, v in acc_of(a).items():
            r = back[(back["algo"] == a) & (back["seed"] == s)].iloc[0]
            if isinstance(v, str):
                assert math.isnan(r["test_acc"]), (a, s)
            else:
                assert r["test_acc"] == pytest.approx(v), (a, s)
    assert list(back.columns[:6]) == ["algo", "topology", "workers", "total_batch", "seed", "status"]
    assert "cfg.lr" in back.columns and "top_eig" in back.columns and "run_id" in back.columns


def test_runs_export_has_each_column_once(tmp_path):
    """A long-format export read back by name: no column may appear twice (pandas would rename it x.1)."""
    for seed in range(2):
        write_run(tmp_path, "dsgd", seed, 80.0 + seed, val_acc=70.0 + seed)
    df = lb.runs_frame(str(tmp_path))
    numeric, display = lb.leaderboard(df, metrics=("test_acc",))
    text = lb.render(numeric, display, "runs", runs=df)
    header = text.splitlines()[0].split(",")
    assert len(header) == len(set(header)), sorted(c for c in header if header.count(c) > 1)
    back = pd.read_csv(io.StringIO(text), comment="#")
    assert back["val_acc"].tolist() == [70.0, 71.0]


def test_runs_export_value_with_a_hash_reads_back(tmp_path):
    """read_csv(comment="#") cuts a line at any unquoted "#": a value holding one (a results folder named
    "sweep#2") must still read back whole, with the fields after it."""
    root = tmp_path / "sweep#2"
    for seed in range(2):
        write_run(root, "dsgd", seed, 80.0 + seed)
    df = lb.runs_frame(str(root))
    numeric, display = lb.leaderboard(df, metrics=("test_acc",))
    text = lb.render(numeric, display, "runs", provenance=lb.provenance(df, "dsgdbench compare x"), runs=df)
    back = pd.read_csv(io.StringIO(text), comment="#")
    assert back["cfg.results"].tolist() == [str(root)] * 2
    assert back["cfg.seed"].tolist() == [0, 1] and back["cfg.steps"].tolist() == [100, 100]


def test_cli_compare_format_runs(tmp_path):
    root = paired_folder(tmp_path / "res")
    res = CliRunner().invoke(app, ["compare", str(root), "--format", "runs"])
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("# made by `dsgdbench compare")
    back = pd.read_csv(io.StringIO(res.stdout), comment="#")
    assert len(back) == sum(len(acc_of(a)) for a in (BASE, *DIFFS))
    assert (back["status"] == DIVERGED).sum() == 2 and (back["status"] == COLLAPSED).sum() == 2
