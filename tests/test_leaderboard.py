"""compare's statistics (bench/leaderboard.py): CI over seeds, paired differences to a baseline,
tuning on the validation split, time to accuracy, exports, and the command line.

Result folders are written by hand with the files bench/results.py writes (config.json,
summary.json, metrics.csv), so every expected number is computed independently. One test
makes real tiny runs to check that the same holds on what the runner writes.
"""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from statsmodels.stats.proportion import proportion_confint
from typer.testing import CliRunner

from bench import leaderboard as lb
from bench import results
from bench.errors import UserError
from dsgdbench import app

T2, T3 = 4.302653, 3.182446  # t_{0.975, n-1} for n = 3 and n = 4


# ----------------------------------------------------------------------------------------------
# helpers


def write_run(root: Path, algo: str, seed: int, test_acc: float | None, *, status: str = "completed",
              lr: float = 0.1, topology: str = "ring", workers: int = 4, batch: int = 8, steps: int = 100,
              val_acc: float | None = None, curve: list[tuple[int, float, float]] | None = None,
              config: dict | None = None, **summary_kw) -> Path:
    """One run folder as the runner leaves it.

    config: more config.json fields; curve: (step, test_acc, train_seconds) rows of metrics.csv.
    """
    if algo == "csgd":
        topology = "allreduce"
    cfg = {"algo": algo, "topology": topology, "workers": workers, "batch": batch, "seed": seed, "lr": lr,
           "steps": steps, "epochs": 150.0, "dataset": "synthetic", "model": "mlp", "val_fraction": 0.1,
           "grad": "plain", "opt": "sgd", "comm": "allreduce" if algo == "csgd" else "gossip",
           "milestones": [0.5, 0.75], "results": str(root), "device": "cpu", "init": None,
           "data_dir": None, **(config or {})}  # None-valued fields as in real configs
    done = status == "completed"
    summary = {"algo": algo, "topology": topology, "workers": workers, "total_batch": workers * batch, "seed": seed,
               "lr": lr, "steps": steps, "status": status, "config_id": f"{algo}-{topology}-{lr}-{workers}-{steps}",
               "test_acc": test_acc if done else None, "test_loss": (100 - test_acc) / 100 if done else None,
               "val_acc": val_acc if done else None, "grad_evals_per_step": 1, "bytes_per_step": 1000.0,
               "train_seconds": 10.0, "versions": {"torch": "x"}, **summary_kw}
    root.mkdir(parents=True, exist_ok=True)
    d = root / f"{algo}-{topology}-n{workers}-b{batch}-s{seed}-{len(list(root.iterdir()))}"
    d.mkdir()
    results.write_json(d / "config.json", cfg)
    if curve is None:
        curve = [(steps, test_acc if done else math.nan, 10.0)]
    results.write_csv(d / "metrics.csv", [{"step": s, "epoch": s / 10, "lr": lr, "test_acc": a, "test_loss": 0.5,
                                           "train_seconds": t} for s, a, t in curve])
    results.write_json(d / "summary.json", summary)
    return d


def frame(root: Path) -> pd.DataFrame:
    return lb.runs_frame(str(root))


def row(numeric: pd.DataFrame, display: pd.DataFrame, **labels):
    mask = np.ones(len(numeric), dtype=bool)
    for k, v in labels.items():
        mask &= (numeric[k] == v).to_numpy()
    assert mask.sum() == 1, f"{labels}: {mask.sum()} rows"
    i = int(np.flatnonzero(mask)[0])
    return numeric.iloc[i], display.iloc[i]


def cli(*args):
    return CliRunner(env={"COLUMNS": "250"}).invoke(app, [str(a) for a in args])


def assert_ok(res):
    assert res.exit_code == 0, f"exit {res.exit_code}\n{res.output}\n{res.exc_info}"


def read_csv_export(text: str) -> pd.DataFrame:
    """A CSV export parsed back: its provenance lines are "# " comments before the header."""
    assert text.startswith("# made by `dsgdbench compare"), text[:200]
    return pd.read_csv(io.StringIO(text), comment="#")


def status_text(k: int, n: int, what: str) -> str:
    """The status of a group with k failed runs of n, from statsmodels' Clopper-Pearson interval."""
    lo, hi = proportion_confint(k, n, alpha=0.05, method="beta")
    return f"{k}/{n} failed ({what}; {100 * lo:.0f}–{100 * hi:.0f}%)"


def assert_user_error(res, *needles):
    assert res.exit_code == 2, f"exit {res.exit_code}\n{res.output}"
    assert "Traceback" not in res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    for n in needles:
        assert n.lower() in lines[0].lower(), f"{n!r} not in {lines[0]!r}"


# ----------------------------------------------------------------------------------------------
# statistics over seeds


def test_t_quantiles():
    assert lb.t_quantile(2) == pytest.approx(T2, abs=1e-6)
    assert lb.t_quantile(3) == pytest.approx(T3, abs=1e-6)
    assert lb.t_quantile(1) == pytest.approx(12.706205, abs=1e-6)


def test_summarize_hand_values():
    s = lb.summarize([80.0, 82.0, 87.0])  # deviations -3, -1, 4
    assert s.n == 3 and s.mean == pytest.approx(83.0)
    assert s.std == pytest.approx(math.sqrt(13.0))
    assert s.ci95 == pytest.approx(T2 * math.sqrt(13.0) / math.sqrt(3), rel=1e-6)
    s = lb.summarize([1.0, 2.0, None, float("nan"), 3.0, 4.0])  # missing values are left out
    assert s.n == 4 and s.mean == pytest.approx(2.5)
    assert s.ci95 == pytest.approx(T3 * math.sqrt(5 / 3) / 2, rel=1e-6)
    one = lb.summarize([70.0])
    assert one.n == 1 and one.mean == 70.0 and math.isnan(one.std) and math.isnan(one.ci95)
    none = lb.summarize([None])
    assert none.n == 0 and math.isnan(none.mean)


def test_leaderboard_ci_columns_and_diverged(tmp_path):
    for seed, acc in enumerate((80.0, 82.0, 87.0)):
        write_run(tmp_path, "dsgd", seed, acc)
    write_run(tmp_path, "dsgd", 3, None, status="diverged")
    write_run(tmp_path, "sam", 0, 75.0)
    numeric, display = lb.leaderboard(frame(tmp_path), metrics=("test_acc", "test_loss"))
    num, disp = row(numeric, display, algo="dsgd")
    ci = T2 * math.sqrt(13.0) / math.sqrt(3)  # 8.9567: the diverged seed is not a fourth value
    assert num["seeds"] == 4 and num["diverged"] == 1 and num["test_acc_n"] == 3
    assert num["test_acc_mean"] == pytest.approx(83.0) and num["test_acc_std"] == pytest.approx(math.sqrt(13))
    assert num["test_acc_ci95"] == pytest.approx(ci, rel=1e-6)
    assert num["test_loss_ci95"] == pytest.approx(ci / 100, rel=1e-6)
    assert disp["test acc (%)"] == "83.00 ± 3.61"
    assert disp["95% CI"] == "[74.04, 91.96]" == f"[{83 - ci:.2f}, {83 + ci:.2f}]"
    # failures are counted, with the exact (Clopper-Pearson) interval of the rate
    assert disp["status"] == status_text(1, 4, "1 diverged") == "1/4 failed (1 diverged; 1–81%)"
    assert disp["seeds"] == "4" and num["failed"] == 1 and num["collapsed"] == 0
    assert num["failure_rate"] == pytest.approx(0.25)
    assert (num["failure_lo"], num["failure_hi"]) == pytest.approx(proportion_confint(1, 4, method="beta"))
    num, disp = row(numeric, display, algo="sam")
    assert num["test_acc_n"] == 1 and math.isnan(num["test_acc_ci95"])
    assert disp["test acc (%)"] == "75.00" and disp["95% CI"] == "—" and disp["status"] == "ok"


def test_default_columns(tmp_path):
    for seed in range(2):
        write_run(tmp_path, "dsgd", seed, 80.0 + seed, top_eig=10.0 + seed, consensus_distance=0.1, train_loss=0.3,
                  train_acc=95.0 + 2 * seed, adaptive_top_eig=0.5, grad_evals_per_step=2, bytes_per_step=2.5e6)
    numeric, display = lb.leaderboard(frame(tmp_path))
    # train loss, train accuracy and adaptive sharpness are default columns now
    assert list(display.columns) == ["algo", "topology", "workers", "total_batch", "seeds", "test acc (%)", "95% CI",
                                     "test loss", "train loss", "train acc (%)", "top-1 eigenvalue",
                                     "adaptive sharpness", "computation", "bytes/step", "train time (s)", "status"]
    assert display.iloc[0]["computation"] == "2x" and display.iloc[0]["bytes/step"] == "2.5 MB"
    assert display.iloc[0]["top-1 eigenvalue"] == "10.50 ± 0.71"
    assert display.iloc[0]["train acc (%)"] == "96.00 ± 1.41" and display.iloc[0]["adaptive sharpness"] == "0.5 ± 0"
    assert "consensus_distance_mean" not in numeric
    assert numeric.iloc[0]["train_loss_mean"] == pytest.approx(0.3) and numeric.iloc[0]["train_acc_n"] == 2
    numeric, display = lb.leaderboard(frame(tmp_path), metrics=("consensus_distance", "train_loss", "val_acc"))
    assert "consensus dist." in display and "train loss" in display and "val acc (%)" not in display  # no val_acc
    assert numeric.iloc[0]["train_loss_n"] == 2


# ----------------------------------------------------------------------------------------------
# paired differences against a baseline


def _paired_folder(root: Path) -> Path:
    # dsgd - csgd per seed: 1, 1, 0.5 (seed 3 has no csgd partner; csgd seed 4 diverged)
    for seed, (d, c) in enumerate([(81.0, 80.0), (83.0, 82.0), (86.0, 85.5)]):
        write_run(root, "dsgd", seed, d)
        write_run(root, "csgd", seed, c)
    write_run(root, "dsgd", 3, 99.0)
    write_run(root, "dsgd", 4, 70.0)
    write_run(root, "csgd", 4, None, status="diverged")
    # sam - csgd per seed: +2, -2 (no significant difference)
    write_run(root, "sam", 0, 82.0)
    write_run(root, "sam", 1, 80.0)
    return root


def test_paired_differences_hand_values(tmp_path):
    numeric, display = lb.leaderboard(frame(_paired_folder(tmp_path)), metrics=("test_acc", "test_loss"),
                                      baseline="csgd")
    d, dd = row(numeric, display, algo="dsgd")
    # d = (1, 1, 0.5): mean 5/6, std sqrt(1/12), ci = t * std / sqrt(3) = T2 / 6
    assert d["delta_test_acc_n"] == 3
    assert d["delta_test_acc_mean"] == pytest.approx(5 / 6)
    assert d["delta_test_acc_std"] == pytest.approx(math.sqrt(1 / 12))
    assert d["delta_test_acc_ci95"] == pytest.approx(T2 / 6, rel=1e-6)
    assert d["delta_test_loss_mean"] == pytest.approx(-5 / 600)
    # the CI excludes 0 (0.833 > 0.717) and the raw p is 0.038, but Holm over the two comparisons of the table
    # (dsgd, sam) gives 0.075: no "*", which now means p (Holm) < 0.05
    p_dsgd = sps.ttest_1samp([1.0, 1.0, 0.5], 0.0).pvalue
    assert d["delta_test_acc_p"] == pytest.approx(p_dsgd) and p_dsgd < 0.05
    assert d["delta_test_acc_p_holm"] == pytest.approx(min(1.0, 2 * p_dsgd)) and d["delta_test_acc_p_holm"] > 0.05
    assert dd["Δ test acc vs csgd"] == "+0.83 ± 0.72 (3)" and dd["p (Holm)"] == f"{2 * p_dsgd:.3f}"
    assert not d["is_baseline"]
    s, sd = row(numeric, display, algo="sam")
    assert s["delta_test_acc_mean"] == pytest.approx(0.0) and s["delta_test_acc_n"] == 2
    assert s["delta_test_acc_ci95"] == pytest.approx(12.706205 * math.sqrt(8) / math.sqrt(2), rel=1e-6)
    assert sd["Δ test acc vs csgd"] == "+0.00 ± 25.41 (2)"
    c, cd = row(numeric, display, algo="csgd")
    assert cd["Δ test acc vs csgd"] == "baseline" and c["is_baseline"] and c["delta_test_acc_n"] == 0
    assert any("paired" in n for n in display.attrs["notes"])
    # pairing matters: the unpaired group means differ by something else
    assert d["test_acc_mean"] - c["test_acc_mean"] != pytest.approx(d["delta_test_acc_mean"])


def test_paired_differences_function():
    runs = pd.DataFrame({"algo": "a", "seed": [0, 1, 2], "status": ["completed", "completed", "diverged"],
                         "test_acc": [10.0, 12.0, None]})
    base = pd.DataFrame({"algo": "b", "seed": [2, 1, 0], "status": "completed", "test_acc": [1.0, 2.0, 4.0]})
    d = lb.paired_differences(runs, base, "test_acc")  # seeds 0 and 1: 6, 10
    assert d.n == 2 and d.mean == pytest.approx(8.0) and d.ci95 == pytest.approx(12.706205 * 2, rel=1e-6)
    assert lb.excludes_zero(d) is False
    dup = pd.concat([base, base.iloc[:1]])
    with pytest.raises(UserError, match="seed 2 appears twice"):
        lb.paired_differences(runs, dup, "test_acc")


def test_baseline_matches_workload_and_lr(tmp_path):
    for seed in range(2):
        for lr, off in ((0.1, 0.0), (0.2, 5.0)):
            write_run(tmp_path, "csgd", seed, 80.0 + off + seed, lr=lr)
            write_run(tmp_path, "dsgd", seed, 81.0 + off + 3 * seed, lr=lr)
        write_run(tmp_path, "dsgd", seed, 60.0, workers=8)  # a workload csgd never ran
        write_run(tmp_path, "dsgd", seed, 60.0, steps=200)
    numeric, display = lb.leaderboard(frame(tmp_path), metrics=("test_acc",), baseline="csgd")
    for lr in (0.1, 0.2):
        d, _ = row(numeric, display, algo="dsgd", lr=lr, workers=4, steps=100)
        assert d["delta_test_acc_mean"] == pytest.approx(2.0) and d["delta_test_acc_n"] == 2  # diffs 1, 3
    for kw in ({"workers": 8}, {"steps": 200}):
        d, dd = row(numeric, display, algo="dsgd", **kw)
        assert dd["Δ test acc vs csgd"] == "no csgd run" and d["delta_test_acc_n"] == 0


def test_baseline_without_a_match_and_unknown(tmp_path):
    for lr in (0.1, 0.2):
        write_run(tmp_path, "csgd", 0, 80.0, lr=lr)
    write_run(tmp_path, "dsgd", 0, 81.0, lr=0.4)
    write_run(tmp_path, "dsgd", 0, 82.0, lr=0.2)
    df = frame(tmp_path)
    numeric, display = lb.leaderboard(df, baseline="csgd")  # two csgd lrs: a row at 0.4 matches neither
    d, dd = row(numeric, display, algo="dsgd", lr=0.4)
    assert dd["Δ test acc vs csgd"] == "no csgd run at lr=0.4" and d["delta_test_acc_n"] == 0
    d, dd = row(numeric, display, algo="dsgd", lr=0.2)
    assert d["delta_test_acc_mean"] == pytest.approx(2.0) and dd["Δ test acc vs csgd"] == "+2.00 (1)"
    with pytest.raises(UserError, match="'lamb'.*present: csgd, dsgd"):
        lb.leaderboard(df, baseline="lamb")
    with pytest.raises(UserError, match="add algo to --by"):
        lb.leaderboard(df, by=["workers"], baseline="csgd")


def test_baseline_refines_on_topology(tmp_path):
    # dsgd as the baseline of dsgd-ac: two dsgd topologies, each row finds the one it ran on; C-SGD (no
    # graph) and a graph D-SGD never ran have none, and their cells say why
    for topo, acc in (("ring", 80.0), ("torus", 84.0)):
        write_run(tmp_path, "dsgd", 0, acc, topology=topo)
        write_run(tmp_path, "dsgd-ac", 0, acc + 1.5, topology=topo)
    write_run(tmp_path, "dsgd-ac", 0, 70.0, topology="exponential")
    write_run(tmp_path, "csgd", 0, 90.0)
    numeric, display = lb.leaderboard(frame(tmp_path), metrics=("test_acc",), baseline="dsgd")
    for topo in ("ring", "torus"):
        d, dd = row(numeric, display, algo="dsgd-ac", topology=topo)
        assert d["delta_test_acc_mean"] == pytest.approx(1.5) and dd["Δ test acc vs dsgd"] == "+1.50 (1)"
    assert row(numeric, display, algo="dsgd-ac", topology="exponential")[1]["Δ test acc vs dsgd"] == \
        "no dsgd run at topology=exponential"
    assert row(numeric, display, algo="csgd")[1]["Δ test acc vs dsgd"] == "no dsgd run at topology=allreduce"


# ----------------------------------------------------------------------------------------------
# --tune on the validation split


def _grid(root: Path) -> Path:
    """dsgd: lr 0.1 / 0.2 / 0.4; best val at 0.2, best test at 0.4. csgd: best val at 0.1."""
    for seed in range(3):
        write_run(root, "dsgd", seed, 85.0 + seed, lr=0.1, val_acc=80.0 + seed)
        write_run(root, "dsgd", seed, 87.0 + seed, lr=0.2, val_acc=84.0 + seed)
        write_run(root, "dsgd", seed, 95.0, lr=0.4, val_acc=70.0)
        write_run(root, "csgd", seed, 84.0 + seed, lr=0.1, val_acc=90.0)
        write_run(root, "csgd", seed, 83.0, lr=0.2, val_acc=89.0)
    return root


def test_tune_picks_best_validation_value(tmp_path):
    df = frame(_grid(tmp_path))
    selected, choices = lb.tune_runs(df, ["lr"])
    assert len(selected) == 6
    assert sorted(selected[selected["algo"] == "dsgd"]["cfg.lr"]) == [0.2] * 3
    assert sorted(selected[selected["algo"] == "csgd"]["cfg.lr"]) == [0.1] * 3
    assert (selected[lb.CANDIDATES] == [3 if a == "dsgd" else 2 for a in selected["algo"]]).all()
    ch = choices.set_index("algo")
    assert ch.loc["dsgd", "lr"] == 0.2 and ch.loc["dsgd", "candidates"] == 3
    assert ch.loc["dsgd", "val_acc_mean"] == pytest.approx(85.0) and ch.loc["dsgd", "tune_seeds"] == 3
    assert ch.loc["dsgd", "reported"] == 3 and ch.loc["dsgd", "failed"] == 0
    assert ch.loc["csgd", "lr"] == 0.1 and ch.loc["csgd", "candidates"] == 2
    # the table reports the winners' test accuracy, not the best test accuracy
    numeric, display = lb.leaderboard(selected, metrics=("test_acc",), tuned=["lr"], baseline="csgd")
    d, dd = row(numeric, display, algo="dsgd")
    assert d["test_acc_mean"] == pytest.approx(88.0) and dd["lr (tuned)"] == "0.2 (of 3)"
    assert d["tuned_lr"] == 0.2 and d["tuned_lr_of"] == 3
    assert d["delta_test_acc_mean"] == pytest.approx(3.0)  # paired with csgd at its own tuned lr
    assert row(numeric, display, algo="csgd")[1]["lr (tuned)"] == "0.1 (of 2)"
    assert "lr" not in numeric.columns  # the tuned key is a column of its own, not a group key


def test_tune_diverged_seed_ranks_below_completed(tmp_path):
    for seed in range(3):
        write_run(tmp_path, "dsgd", seed, 80.0, lr=0.1, val_acc=70.0)
        if seed < 2:
            write_run(tmp_path, "dsgd", seed, 90.0, lr=0.4, val_acc=95.0)
        else:
            write_run(tmp_path, "dsgd", seed, None, lr=0.4, status="diverged")
        write_run(tmp_path, "dsgd", seed, None, lr=0.8, status="diverged")
    selected, choices = lb.tune_runs(frame(tmp_path), ["lr"])
    assert set(selected["cfg.lr"]) == {0.1} and choices.iloc[0]["candidates"] == 3
    assert choices.iloc[0]["failed"] == 0


def test_tune_errors(tmp_path):
    for seed in range(2):
        write_run(tmp_path, "dsgd", seed, 80.0, lr=0.1)
        write_run(tmp_path, "dsgd", seed, 82.0, lr=0.2)
    df = frame(tmp_path)
    with pytest.raises(UserError, match="--val-fraction"):
        lb.tune_runs(df, ["lr"])
    df["val_acc"] = 50.0
    with pytest.raises(UserError, match="every run has workers = 4"):
        lb.tune_runs(df, ["workers"])
    with pytest.raises(UserError, match="unknown --tune key 'lrr'.*did you mean 'lr'"):
        lb.tune_runs(df, ["lrr"])
    with pytest.raises(UserError, match="--tune 'seed'"):
        lb.tune_runs(df, ["seed"])
    selected, _ = lb.tune_runs(df, ["lr"])  # a tie goes to the smaller value
    assert set(selected["cfg.lr"]) == {0.1}


def test_tune_two_keys(tmp_path):
    for lr in (0.1, 0.2):
        for wd in (0.0, 5e-4):
            write_run(tmp_path, "dsgd", 0, 80.0, lr=lr, val_acc=90.0 if (lr, wd) == (0.2, 0.0) else 50.0,
                      config={"weight_decay": wd})
    selected, choices = lb.tune_runs(frame(tmp_path), ["lr", "weight_decay"])
    assert len(selected) == 1 and choices.iloc[0]["candidates"] == 4
    assert (selected.iloc[0]["cfg.lr"], selected.iloc[0]["cfg.weight_decay"]) == (0.2, 0.0)


def test_tune_on_a_hand_built_frame():
    """Only the tuned field among the config columns: all runs form one configuration."""
    df = pd.DataFrame({"algo": "dsgd", "seed": [0, 1, 0, 1], "status": "completed", "cfg.lr": [0.1, 0.1, 0.3, 0.3],
                       "val_acc": [60.0, 62.0, 70.0, 50.0], "test_acc": [1.0, 2.0, 3.0, 4.0]})
    selected, choices = lb.tune_runs(df, ["lr"])  # means 61 and 60
    assert list(selected.index) == [0, 1] and list(selected[lb.CANDIDATES]) == [2, 2]
    assert choices.iloc[0]["lr"] == 0.1 and choices.iloc[0]["val_acc_mean"] == pytest.approx(61.0)


# ----------------------------------------------------------------------------------------------
# --target-acc from metrics.csv


def test_target_acc(tmp_path):
    write_run(tmp_path, "dsgd", 0, 85.0, curve=[(10, 50.0, 1.0), (20, 80.0, 2.0), (30, 85.0, 3.0)])
    write_run(tmp_path, "dsgd", 1, 82.0, curve=[(10, 60.0, 1.5), (20, 70.0, 3.0), (30, 78.0, 4.5), (40, 82.0, 6.0)])
    write_run(tmp_path, "dsgd", 2, 75.0, curve=[(10, 70.0, 1.0), (20, 75.0, 2.0)])
    write_run(tmp_path, "dsgd", 3, None, status="diverged", curve=[(10, 90.0, 1.0)])  # reached, then diverged
    for seed in range(2):
        write_run(tmp_path, "csgd", seed, 85.0, curve=[(10, 81.0, 0.5)])
    write_run(tmp_path, "sam", 0, 60.0, curve=[(10, 60.0, 1.0)])
    numeric, display = lb.leaderboard(frame(tmp_path), metrics=("test_acc",), target_acc=80)
    d, dd = row(numeric, display, algo="dsgd")
    assert d["target_reached"] == 2 and d["target_steps_mean"] == pytest.approx(30.0)
    assert d["target_seconds_mean"] == pytest.approx(4.0)
    assert dd["steps to 80%"] == "30 (2/4 reached)" and dd["train s to 80%"] == "4.0 (2/4 reached)"
    c, cd = row(numeric, display, algo="csgd")
    assert c["target_reached"] == 2 and cd["steps to 80%"] == "10" and cd["train s to 80%"] == "0.5"
    s, sd = row(numeric, display, algo="sam")
    assert s["target_reached"] == 0 and math.isnan(s["target_steps_mean"])
    assert sd["steps to 80%"] == "—" and sd["train s to 80%"] == "—"
    with pytest.raises(UserError, match="--target-acc"):
        lb.leaderboard(frame(tmp_path), target_acc=0)


# ----------------------------------------------------------------------------------------------
# exports, parsed back


def _board(root: Path):
    _paired_folder(root)
    return lb.leaderboard(frame(root), metrics=("test_acc", "test_loss"), baseline="csgd")


def test_export_csv(tmp_path):
    numeric, display = _board(tmp_path)
    back = pd.read_csv(io.StringIO(lb.render(numeric, display, "csv")))
    assert list(back["algo"]) == list(numeric["algo"])
    for col in ("test_acc_mean", "test_acc_std", "test_acc_ci95", "test_acc_n", "delta_test_acc_mean",
                "delta_test_acc_ci95", "delta_test_acc_n", "test_loss_ci95"):
        assert back[col].to_numpy() == pytest.approx(numeric[col].to_numpy(dtype=float), nan_ok=True), col


def test_export_markdown(tmp_path):
    numeric, display = _board(tmp_path)
    text = lb.render(numeric, display, "md")
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in text.splitlines() if ln.startswith("|")]
    header, body = rows[0], rows[2:]
    assert header == [str(c) for c in display.columns]
    assert len(body) == len(display)
    for cells, (_, r) in zip(body, display.iterrows()):
        assert cells == [str(v) for v in r]
    dsgd = body[[c[0] for c in body].index("dsgd")]
    assert dsgd[header.index("Δ test acc vs csgd")] == "+0.83 ± 0.72 (3)"  # p (Holm) = 0.075: no "*"
    notes = text.splitlines()[len(display) + 2:]  # under the table: the paired-test note, then the failures note
    assert any(ln.startswith("Δ: paired difference") for ln in notes) and notes[-1].startswith("failed runs")


def test_export_latex(tmp_path):
    numeric, display = _board(tmp_path)
    text = lb.render(numeric, display, "tex")
    lines = text.splitlines()
    assert lines[0].startswith(r"\begin{tabular}{llrrr") and r"\end{tabular}" in lines
    top, mid, bottom = lines.index(r"\toprule"), lines.index(r"\midrule"), lines.index(r"\bottomrule")
    assert top < mid < bottom
    header = [c.strip() for c in lines[mid - 1].removesuffix(r"\\").split(" & ")]
    assert "total\\_batch" in header and "test acc (\\%)" in header and "$\\Delta$ test acc vs csgd" in header
    body = [[c.strip() for c in ln.removesuffix(r"\\").split(" & ")] for ln in lines[mid + 1:bottom]]
    assert len(body) == len(display) and all(len(r) == len(header) for r in body)
    dsgd = body[[r[0] for r in body].index("dsgd")]
    assert dsgd[header.index("$\\Delta$ test acc vs csgd")] == "+0.83 $\\pm$ 0.72 (3)"  # p (Holm) = 0.075: no "*"
    ci = display.loc[display["algo"] == "dsgd", "95% CI"].iloc[0]
    assert dsgd[header.index("95\\% CI")] == ci
    assert lb.tex_escape("a_b 5% & #1 ± —") == r"a\_b 5\% \& \#1 $\pm$ --"
    # every unescaped special character outside the math is gone
    for ln in lines[top:bottom]:
        assert not re.search(r"(?<!\\)[%&#_](?![^$]*\$)", ln.replace(" & ", " ")), ln


def test_format_from_path():
    assert lb.format_from_path("t/board.tex") == "tex"
    assert lb.format_from_path("board.CSV") == "csv" and lb.format_from_path("board.md") == "md"
    with pytest.raises(UserError, match=r"\.csv, \.md or \.tex"):
        lb.format_from_path("board.xlsx")


# ----------------------------------------------------------------------------------------------
# command line


def test_cli_compare_baseline(tmp_path):
    root = _paired_folder(tmp_path / "res")
    res = cli("compare", root, "--baseline", "csgd", "--format", "csv")
    assert_ok(res)
    df = read_csv_export(res.stdout)
    d = df[df["algo"] == "dsgd"].iloc[0]
    assert d["delta_test_acc_mean"] == pytest.approx(5 / 6) and d["delta_test_acc_n"] == 3
    res = cli("compare", root, "--baseline", "csgd")
    assert_ok(res)
    assert "baseline" in res.stdout and "+0.83 ± 0.72 (3)" in res.stdout and "paired difference" in res.stdout
    assert "+0.83 ± 0.72 (3) *" not in res.stdout  # p (Holm) = 0.075
    assert_user_error(cli("compare", root, "--baseline", "nosuch"), "--baseline", "nosuch", "csgd, dsgd, sam")


def test_paired_sharpness_columns_against_scipy_and_statsmodels(tmp_path):
    """--paired shows the paired difference of the sharpness measures too: each metric is its own Holm family,
    computed here with scipy's paired t test and statsmodels' Holm."""
    from statsmodels.stats.multitest import multipletests

    root = tmp_path / "res"
    eig = {"csgd": [5.0, 6.0, 7.5, 5.5], "dsgd": [3.0, 3.5, 4.0, 3.2], "sam": [5.1, 5.9, 7.7, 5.0]}
    for algo, values in eig.items():
        for seed, v in enumerate(values):
            write_run(root, algo, seed, 90.0 + seed + (algo == "dsgd") * 0.1 * seed, top_eig=v,
                      adaptive_top_eig=v / 2)
    res = cli("compare", root, "--baseline", "csgd", "--paired", "test_acc,top_eig", "--format", "md")
    assert_ok(res)
    p = [sps.ttest_rel(eig[a], eig["csgd"]).pvalue for a in ("dsgd", "sam")]
    holm = multipletests(p, method="holm")[1]
    lines = {ln.split("|")[1].strip(): ln for ln in res.stdout.splitlines() if ln.startswith("| ")}
    for algo, ph in zip(("dsgd", "sam"), holm):
        d = np.subtract(eig[algo], eig["csgd"])
        half = sps.t.ppf(0.975, 3) * d.std(ddof=1) / 2
        mark = " *" if ph < 0.05 else ""
        assert f"{d.mean():+.2f} ± {half:.2f} (4){mark}, p {ph:.3f}" in lines[algo], (algo, lines[algo])
    assert holm[0] < 0.05 < holm[1]  # the test can tell a flatter method from an equal one
    df = read_csv_export(cli("compare", root, "--baseline", "csgd", "--format", "csv").stdout)
    got = df.set_index("algo").loc[["dsgd", "sam"], "delta_top_eig_p_holm"].to_numpy()
    np.testing.assert_allclose(got, holm, rtol=1e-10)  # the CSV has every paired metric without --paired
    assert_user_error(cli("compare", root, "--baseline", "csgd", "--paired", "val_acc"), "--paired", "top_eig")
    assert_user_error(cli("compare", root, "--paired", "top_eig"), "--paired", "--baseline")


def test_cli_compare_out_tex_and_bad_extension(tmp_path):
    root = _paired_folder(tmp_path / "res")
    tex = tmp_path / "board.tex"
    assert_ok(cli("compare", root, "--baseline", "csgd", "--out", tex))
    text = tex.read_text()
    assert r"\toprule" in text and r"\bottomrule" in text and "$\\pm$" in text
    assert text.startswith("% made by `dsgdbench compare")
    res = cli("compare", root, "--format", "tex")
    assert_ok(res)
    # the provenance lines come first, as LaTeX comments; then the table
    lines = res.stdout.splitlines()
    first = next(i for i, ln in enumerate(lines) if not ln.startswith("% "))
    assert first >= 1 and lines[0].startswith("% made by `dsgdbench compare")
    assert lines[first].startswith(r"\begin{tabular}")
    bad = tmp_path / "board.xlsx"
    assert_user_error(cli("compare", root, "--out", bad), "--out", ".xlsx", ".tex")
    assert not bad.exists() and tex.read_text() == text


def test_cli_compare_tune_and_target(tmp_path):
    root = _grid(tmp_path / "res")
    res = cli("compare", root, "--tune", "lr", "--baseline", "csgd", "--target-acc", "80", "--format", "md")
    assert_ok(res)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    body = {r[0]: r for r in ([c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:])}
    assert set(body) == {"dsgd", "csgd"}
    assert body["dsgd"][header.index("lr (tuned)")] == "0.2 (of 3)"
    assert body["dsgd"][header.index("test acc (%)")] == "88.00 ± 1.00"
    assert body["dsgd"][header.index("steps to 80%")] == "100"
    res = cli("compare", root, "--tune", "lr")
    assert_ok(res)
    assert "15 runs" in res.stdout and "6 reported by --tune lr" in res.stdout
    assert "chose on the same seeds it reports" in res.stderr  # no --tune-seeds
    plain = tmp_path / "plain"
    for seed in range(2):
        write_run(plain, "dsgd", seed, 80.0, lr=0.1)
        write_run(plain, "dsgd", seed, 80.0, lr=0.2)
    assert_user_error(cli("compare", plain, "--tune", "lr"), "--tune", "--val-fraction")
    assert_user_error(cli("compare", plain, "--tune", "colour"), "--tune", "colour")


def test_real_runs_baseline_and_target(tmp_path):
    """Tiny real runs: the paired difference and the time to accuracy from what the runner wrote."""
    root = tmp_path / "res"
    for algo in ("csgd", "dsgd"):
        assert_ok(cli("run", "--dataset", "synthetic", "--model", "mlp", "--algo", algo, "--workers", "2",
                      "--batch", "8", "--steps", "4", "--eval-every", "2", "--no-hessian", "--val-fraction", "0.25",
                      "--seeds", "0,1", "--results", root))
    summaries = {(s["algo"], s["seed"]): s for s in (json.loads(p.read_text()) for p in root.rglob("summary.json"))}
    target = min(s["test_acc"] for s in summaries.values())  # every run reaches it by its last evaluation
    res = cli("compare", root, "--baseline", "csgd", "--target-acc", target, "--columns", "test_acc,val_acc",
              "--format", "csv")
    assert_ok(res)
    df = read_csv_export(res.stdout).set_index("algo")
    diffs = [summaries[("dsgd", s)]["test_acc"] - summaries[("csgd", s)]["test_acc"] for s in (0, 1)]
    assert df.loc["dsgd", "delta_test_acc_mean"] == pytest.approx(np.mean(diffs))
    assert df.loc["dsgd", "delta_test_acc_ci95"] == pytest.approx(12.706205 * np.std(diffs, ddof=1) / math.sqrt(2),
                                                                  rel=1e-6, abs=1e-9)
    assert df.loc["dsgd", "val_acc_n"] == 2 and df.loc["csgd", "target_reached"] == 2
    steps = []
    for p in root.rglob("metrics.csv"):
        if p.parent.name.startswith("dsgd"):
            m = pd.read_csv(p)
            steps.append(m.loc[m["test_acc"] >= target, "step"].iloc[0])
    assert df.loc["dsgd", "target_steps_mean"] == pytest.approx(np.mean(steps))
