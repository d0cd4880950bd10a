"""dsgdbench plot and bench.plots: figures from a real suite of tiny runs.

The suite: C-SGD, D-SGD and DSGD-AC on the synthetic data set (mlp, 4 workers of
batch 8, 10 steps, evaluated every 2 steps), seeds 0 and 1; the Hessian eigenvalue
(on 128 training samples) for C-SGD and D-SGD only. It is trained once for the module.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_hex
from typer.testing import CliRunner

from bench import plots
from bench.errors import UserError
from bench.leaderboard import runs_frame
from dsgdbench import app

RUN = ["--dataset", "synthetic", "--model", "mlp", "--workers", "4", "--batch", "8", "--steps", "10",
       "--eval-every", "2", "--seeds", "0,1"]
HESSIAN = ["--hessian", "--hessian-samples", "128"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PRESETS = ("csgd", "dsgd", "dsgd-ac", "sam", "ad-sam", "lamb", "d-lamb")


def cli(*args):
    return CliRunner(env={"COLUMNS": "250"}).invoke(app, [str(a) for a in args])


def stderr_of(res) -> str:
    try:
        return res.stderr
    except ValueError:  # click < 8.2 mixes stderr into output
        return res.output


def assert_ok(res):
    assert res.exit_code == 0, f"exit {res.exit_code}\n{res.output}\n{res.exc_info}"


def assert_user_error(res, *needles):
    assert res.exit_code == 2, f"exit {res.exit_code}\n{res.output}\n{res.exc_info}"
    assert "Traceback" not in res.output
    lines = stderr_of(res).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    for n in needles:
        assert n.lower() in lines[0].lower(), lines[0]


def assert_png(path: Path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert len(data) > 10_000, f"{path} is suspiciously small ({len(data)} bytes)"
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 300
    assert img[..., :3].std() > 0.01  # not a blank canvas


def copy_runs(src: Path, dst: Path, keep=lambda d: True) -> Path:
    for s in sorted(src.rglob("summary.json")):
        if keep(s.parent):
            shutil.copytree(s.parent, dst / s.parent.name)
    return dst


def algo_colours_drawn(fig) -> dict[str, set[str]]:
    """{algo: colours of its artists} over every axis of the figure (artists carry gid "algo:<name>")."""
    drawn: dict[str, set[str]] = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            if (line.get_gid() or "").startswith("algo:"):
                drawn.setdefault(line.get_gid()[5:], set()).add(to_hex(line.get_color()))
        for coll in ax.collections:
            if (coll.get_gid() or "").startswith("algo:"):
                for c in coll.get_facecolor():
                    drawn.setdefault(coll.get_gid()[5:], set()).add(to_hex(c[:3]))
    return drawn


def main_lines(ax, algo: str):
    """The mean curves of an algorithm (solid or dashed, with a legend label)."""
    return [ln for ln in ax.get_lines() if ln.get_gid() == f"algo:{algo}" and not ln.get_label().startswith("_")]


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plots") / "results"
    for algo, hessian in (("csgd", HESSIAN), ("dsgd", HESSIAN), ("dsgd-ac", ["--no-hessian"])):
        assert_ok(cli("run", "--algo", algo, *RUN, *hessian, "--results", root))
    return root


@pytest.fixture(scope="module")
def figures(suite):
    return plots.build_figures(runs_frame(str(suite)))


# ----------------------------------------------------------------------------------------------
# the command


def test_plot_writes_three_pngs_to_dir_plots(suite, tmp_path):
    root = copy_runs(suite, tmp_path / "runs")
    res = cli("plot", root)
    assert_ok(res)
    out = root / "plots"
    assert sorted(p.name for p in out.iterdir()) == ["acc_vs_step.png", "consensus.png", "eig_vs_acc.png"]
    for name in plots.FILES.values():
        assert_png(out / name)
        assert f"wrote {out / name}" in res.stdout


def test_skipped_figures_are_noted(suite, tmp_path):
    root = copy_runs(suite, tmp_path / "csgd", keep=lambda d: d.name.startswith("csgd-"))
    res = cli("plot", root, "--out", tmp_path / "out")
    assert_ok(res)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["acc_vs_step.png", "eig_vs_acc.png"]
    assert "skipped consensus.png" in stderr_of(res)
    assert "eig_vs_acc.png" not in stderr_of(res)  # C-SGD ran with --hessian

    df = runs_frame(str(suite))
    notes = []
    written = plots.make_plots(df[df["algo"] == "dsgd-ac"], tmp_path / "ac", note=notes.append)
    assert [p.name for p in written] == ["acc_vs_step.png", "consensus.png"]
    assert len(notes) == 1 and notes[0].startswith("skipped eig_vs_acc.png") and "--hessian" in notes[0]


def test_plot_tuned_on_tuning_seeds(tmp_path):
    """plot --tune lr --tune-seeds 1: the lr chosen on seed 1, seed 0's runs of it drawn."""
    root = tmp_path / "res"
    for lr in ("0.05", "0.5"):
        assert_ok(cli("run", "--algo", "csgd", *RUN, "--lr", lr, "--val-fraction", "0.25", "--no-hessian",
                      "--results", root))
    res = cli("plot", root, "--tune", "lr", "--tune-seeds", "1", "--out", tmp_path / "out")
    assert_ok(res)
    # no Hessian, one algorithm without a graph: the accuracy figure only
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["acc_vs_step.png"]


def test_user_mistakes_exit_2(suite, tmp_path):
    (tmp_path / "empty").mkdir()
    assert_user_error(cli("plot", tmp_path / "empty"), "no finished runs")
    assert_user_error(cli("plot", tmp_path / "missing"), "does not exist")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert_user_error(cli("plot", suite, "--out", blocker), "--out")
    assert_user_error(cli("plot", suite, "--out", blocker / "sub"), "--out")
    assert_user_error(cli("plot", suite, "--by", "algo,colour"), "--by", "colour")
    with pytest.raises(UserError):
        plots.make_plots(pd.DataFrame(), tmp_path / "x")


# ----------------------------------------------------------------------------------------------
# what the figures hold


def test_colour_function():
    colours = plots.algo_colors(PRESETS)
    assert colours == {a: plots.ALGO_COLORS[a] for a in PRESETS}
    assert len(set(colours.values())) == len(PRESETS)
    mixed = plots.algo_colors(["zeta", "dsgd", "alpha", "my-sgd"])
    again = plots.algo_colors(["my-sgd", "alpha", "dsgd", "zeta", "alpha"])
    assert mixed == again  # order and repeats do not matter
    assert mixed["dsgd"] == plots.ALGO_COLORS["dsgd"]  # a preset's colour does not depend on the others
    others = [mixed[n] for n in ("alpha", "my-sgd", "zeta")]
    assert len(set(others)) == 3 and not set(others) & set(plots.ALGO_COLORS.values())


def test_same_colour_per_algorithm_in_every_figure(figures):
    assert set(figures) == {"acc", "consensus", "eig"}
    expected = plots.algo_colors(PRESETS)
    present = {"acc": {"csgd", "dsgd", "dsgd-ac"}, "consensus": {"dsgd", "dsgd-ac"}, "eig": {"csgd", "dsgd"}}
    for name, fig in figures.items():
        drawn = algo_colours_drawn(fig)
        assert set(drawn) == present[name], name
        for algo, cols in drawn.items():
            assert cols == {expected[algo]}, f"{name}: {algo} drawn in {cols}"


def test_acc_figure_mean_and_labels(suite, figures):
    (ax,) = figures["acc"].axes
    assert ax.get_xlabel() == "step" and ax.get_ylabel() == "test accuracy (%)"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["csgd allreduce, 2 seeds", "dsgd ring, 2 seeds", "dsgd-ac ring, 2 seeds"]
    df = runs_frame(str(suite))
    for algo in ("csgd", "dsgd", "dsgd-ac"):
        acc = [pd.read_csv(Path(d) / "metrics.csv").set_index("step")["test_acc"]
               for d in df.loc[df["algo"] == algo, "run_dir"]]
        expected = pd.concat(acc, axis=1).mean(axis=1)
        (line,) = main_lines(ax, algo)
        assert list(line.get_xdata()) == [2, 4, 6, 8, 10]
        np.testing.assert_allclose(line.get_ydata(), expected.to_numpy())


def test_consensus_figure_log_scale_and_gamma(suite, figures):
    (ax, twin) = figures["consensus"].axes
    assert ax.get_yscale() == "log" and ax.get_ylabel() == plots.CONSENSUS_LABEL
    assert twin.get_ylabel() == plots.GAMMA_LABEL
    (gamma,) = twin.get_lines()
    assert gamma.get_gid() == "algo:dsgd-ac"
    run = next(d for d in suite.iterdir() if d.name.startswith("dsgd-ac-"))
    np.testing.assert_allclose(gamma.get_ydata(), pd.read_csv(run / "metrics.csv")["gamma"].to_numpy())
    assert gamma.get_ydata()[-1] < gamma.get_ydata()[0] <= 1.0
    labels = [t.get_text() for t in twin.get_legend().get_texts()]
    assert labels == ["dsgd ring, 2 seeds", "dsgd-ac ring, 2 seeds", "γ_t dsgd-ac ring"]


def test_eig_figure_one_point_per_run(suite, figures):
    (ax,) = figures["eig"].axes
    assert ax.get_xlabel() == "test accuracy (%)" and ax.get_ylabel() == "top-1 Hessian eigenvalue"
    points = {tuple(np.round(xy, 6)) for c in ax.collections for xy in c.get_offsets()}
    summaries = [json.loads(f.read_text()) for f in suite.rglob("summary.json")]
    expected = {(round(s["test_acc"], 6), round(s["top_eig"], 6)) for s in summaries if s.get("top_eig")}
    assert len(expected) == 4 and points == expected
    markers = {c.get_gid(): c.get_paths()[0].vertices.shape for c in ax.collections}
    assert markers["algo:csgd"] != markers["algo:dsgd"]  # allreduce and ring get different markers


def test_one_panel_per_workload_value(suite):
    df = runs_frame(str(suite))
    df.loc[df["algo"] == "dsgd", "total_batch"] = 256  # as if D-SGD had run at another total batch
    fig = plots.build_figures(df)["acc"]
    titles = [ax.get_title() for ax in fig.axes]
    assert len(titles) == 2
    assert "total batch=32" in titles[0] and "total batch=256" in titles[1]
    assert {ln.get_gid() for ln in fig.axes[1].get_lines()} == {"algo:dsgd"}


def test_partition_gets_a_panel_and_legends_get_room(suite):
    df = runs_frame(str(suite))
    one = plots.build_figures(df)["acc"]
    df = pd.concat([df, df.assign(**{"cfg.partition": "dirichlet:0.1"})])  # as if run on non-IID shards too
    fig = plots.build_figures(df)["acc"]
    titles = [ax.get_title() for ax in fig.axes]
    assert len(titles) == 2 and any("partition=dirichlet:0.1" in t for t in titles)
    # the figure is taller by the legend rows, so the panel is not squeezed by a long legend
    many = pd.concat([df.assign(**{"cfg.lr": lr}) for lr in (0.1, 0.2, 0.3, 0.4)])
    tall = plots.build_figures(many)["acc"]
    assert tall.get_figheight() > fig.get_figheight() >= one.get_figheight()


def test_diverged_runs_end_early_and_are_labelled(suite, tmp_path):
    root = copy_runs(suite, tmp_path / "runs")
    # One seed of D-SGD diverged after step 4 (rewritten the way the runner writes a diverged run) ...
    run = next(d for d in sorted(root.iterdir()) if d.name.startswith("dsgd-ring") and "-s1-" in d.name)
    s = json.loads((run / "summary.json").read_text())
    s.update(status="diverged", diverged_step=5, test_acc=None, test_loss=None, top_eig=None)
    (run / "summary.json").write_text(json.dumps(s))
    pd.read_csv(run / "metrics.csv").head(2).to_csv(run / "metrics.csv", index=False)
    # ... and a real one: a huge learning rate.
    assert_ok(cli("run", "--algo", "dsgd", *RUN[:-2], "--seeds", "0", "--lr", "1e4", *HESSIAN,
                  "--results", root))
    statuses = [json.loads(f.read_text())["status"] for f in root.rglob("summary.json")]
    assert statuses.count("diverged") == 2

    res = cli("plot", root, "--out", tmp_path / "out")
    assert_ok(res)
    for name in plots.FILES.values():
        assert_png(tmp_path / "out" / name)

    fig = plots.build_figures(runs_frame(str(root)))["acc"]
    (ax,) = fig.axes
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "dsgd ring lr=0.2, 2 seeds (1 diverged)" in labels
    assert "dsgd ring lr=10000, 1 seed (1 diverged)" in labels
    assert "csgd allreduce lr=0.2, 2 seeds" in labels
    dsgd = [ln for ln in ax.get_lines() if ln.get_gid() == "algo:dsgd"]
    # The mean is seed 0 alone; the diverged seed's own curve stops at step 4, marked with an x.
    seed0 = pd.read_csv(next(suite.glob("dsgd-ring-*-s0-*/metrics.csv")))
    mean = next(ln for ln in dsgd if ln.get_label() == "dsgd ring lr=0.2, 2 seeds (1 diverged)")
    np.testing.assert_allclose(mean.get_ydata(), seed0["test_acc"].to_numpy())
    ends = sorted(ln.get_xdata()[-1] for ln in dsgd if ln.get_marker() == "x")
    assert ends == [2, 4]  # the lr=1e4 run stopped after its first evaluation, the edited one after step 4

    # Its consensus distance blew up (> 1e10): the log axis stays fitted to the completed runs and
    # the diverged run's end is marked on the top edge.
    (ax, _twin) = plots.build_figures(runs_frame(str(root)))["consensus"].axes
    (huge_lr,) = [d for d in root.glob("dsgd-ring-*") if json.loads((d / "summary.json").read_text())["lr"] > 1]
    blown = pd.read_csv(huge_lr / "metrics.csv")["consensus_distance"].iloc[-1]
    top = ax.get_ylim()[1]
    assert blown > 1e10 and top < 1e3
    edge = [ln for ln in ax.get_lines() if ln.get_marker() == "^"]
    assert len(edge) == 1 and edge[0].get_ydata()[0] == top
