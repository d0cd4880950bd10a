"""The command line, end to end: run, compare, list, topology, --config, and the bad-input rule.

The rule for a user's mistake: exit code 2, one line on stderr starting "error:", no
traceback, and nothing that was already written is lost.

Every training run here is tiny (synthetic data set, 2-4 workers, batch 8, 5-6 steps).
Fixtures live in this file on purpose (no conftest.py).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import algorithms
import topologies
from bench.config import RunConfig
from bench.errors import UserError
from bench.data import DATASETS
from bench.models import MODELS
from dsgdbench import app
from helpers import assert_user_error, snapshot, stderr_of

TINY = ["--dataset", "synthetic", "--batch", "8", "--steps", "5", "--eval-every", "1000"]  # one evaluation, at the end
RUN_FILES = ("config.json", "metrics.csv", "summary.json", "model.pt")
REQUIRED_SUMMARY_KEYS = (
    "algo", "topology", "workers", "dataset", "model", "seed", "total_batch", "steps", "status", "test_acc",
    "test_loss", "train_acc", "train_loss", "consensus_distance", "spectral_gap", "train_seconds", "eval_seconds",
    "versions",
)


# ----------------------------------------------------------------------------------------------
# helpers


def cli(*args, **kw):
    """Invoke the app in-process; a wide terminal so that rich tables are not truncated."""
    runner = CliRunner(env={"COLUMNS": "250"})
    return runner.invoke(app, [str(a) for a in args], **kw)


def stdout_of(res) -> str:
    return res.stdout


def assert_ok(res):
    assert res.exit_code == 0, f"exit {res.exit_code}\n{res.output}\n{res.exc_info}"
    assert "Traceback" not in res.output




def run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in Path(root).rglob("summary.json"))


def summaries(root: Path) -> list[dict]:
    return [json.loads((d / "summary.json").read_text()) for d in run_dirs(root)]


def read_csv_text(text: str) -> pd.DataFrame:
    return pd.read_csv(io.StringIO(text), comment="#")  # the provenance comes first, as # lines


# ----------------------------------------------------------------------------------------------
# fixtures (module scope: the end-to-end runs are made once)


@pytest.fixture(scope="module")
def e2e(tmp_path_factory) -> Path:
    """dsgd/ring with 3 seeds and csgd with 2 seeds, 4 workers, 6 steps."""
    root = tmp_path_factory.mktemp("e2e") / "results"
    res = cli("run", "--dataset", "synthetic", "--algo", "dsgd", "--topology", "ring", "--workers", "4",
              "--batch", "8", "--steps", "6", "--seeds", "0,1,2", "--results", root)
    assert_ok(res)
    res = cli("run", "--dataset", "synthetic", "--algo", "csgd", "--topology", "ring", "--workers", "4",
              "--batch", "8", "--steps", "6", "--seeds", "0-1", "--results", root)
    assert_ok(res)
    return root


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A results folder holding one finished run (the thing bad input must never damage)."""
    root = tmp_path_factory.mktemp("finished") / "results"
    assert_ok(cli("run", *TINY, "--workers", "2", "--results", root))
    assert len(run_dirs(root)) == 1
    return root


# ----------------------------------------------------------------------------------------------
# end to end


def test_run_writes_all_files(e2e):
    dirs = run_dirs(e2e)
    assert len(dirs) == 5
    for d in dirs:
        for name in RUN_FILES:
            assert (d / name).is_file(), f"{d / name} missing"
        # no temporary files left over by the atomic writes
        assert sorted(p.name for p in d.iterdir()) == sorted(RUN_FILES)
        cfg = json.loads((d / "config.json").read_text())
        s = json.loads((d / "summary.json").read_text())
        assert cfg["seed"] == s["seed"] and cfg["algo"] == s["algo"] and cfg["steps"] == 6
        metrics = pd.read_csv(d / "metrics.csv")
        assert {"step", "test_acc", "test_loss", "lr"} <= set(metrics.columns)
        assert metrics["step"].iloc[-1] == 6
        assert metrics["test_acc"].iloc[-1] == pytest.approx(s["test_acc"])
        state = torch.load(d / "model.pt", map_location="cpu")
        assert state and all(isinstance(v, torch.Tensor) for v in state.values())
        assert d.name == s["run_id"]


def test_summary_has_required_keys(e2e):
    ss = summaries(e2e)
    for s in ss:
        missing = [k for k in REQUIRED_SUMMARY_KEYS if k not in s]
        assert not missing, f"summary lacks {missing}"
        assert {"torch", "dsgdbench", "git"} <= set(s["versions"])
        assert s["versions"]["torch"] == torch.__version__
        assert s["status"] == "completed"
        assert s["dataset"] == "synthetic" and s["model"] == "mlp"
        assert s["workers"] == 4 and s["total_batch"] == 32 and s["steps"] == 6
        assert 0 <= s["test_acc"] <= 100 and 0 <= s["train_acc"] <= 100
        assert np.isfinite(s["test_loss"]) and np.isfinite(s["train_loss"])
        assert s["consensus_distance"] >= 0 and s["train_seconds"] >= 0 and s["eval_seconds"] >= 0
    assert sorted((s["algo"], s["seed"]) for s in ss) == [("csgd", 0), ("csgd", 1), ("dsgd", 0), ("dsgd", 1), ("dsgd", 2)]
    ring = [s for s in ss if s["algo"] == "dsgd"]
    # ring of 4 with 1/3 weights: eigenvalues of W are 1, 1/3, 1/3, -1/3 -> gap 2/3
    assert all(s["spectral_gap"] == pytest.approx(2 / 3) for s in ring)
    assert all(s["consensus_distance"] > 0 for s in ring)
    assert all(s["consensus_distance"] == pytest.approx(0, abs=1e-6) for s in ss if s["algo"] == "csgd")


def test_compare_csv_mean_and_std(e2e):
    res = cli("compare", e2e, "--format", "csv")
    assert_ok(res)
    df = read_csv_text(stdout_of(res))
    assert len(df) == 2
    assert {"algo", "seeds", "diverged", "test_acc_mean", "test_acc_std"} <= set(df.columns)
    for algo, n_seeds in (("dsgd", 3), ("csgd", 2)):
        accs = np.array([s["test_acc"] for s in summaries(e2e) if s["algo"] == algo])
        assert len(accs) == n_seeds
        row = df[df["algo"] == algo].iloc[0]
        assert row["seeds"] == n_seeds and row["diverged"] == 0
        assert row["test_acc_mean"] == pytest.approx(np.mean(accs), rel=1e-12)
        assert row["test_acc_std"] == pytest.approx(np.std(accs, ddof=1), rel=1e-9)
    # sorted by mean test accuracy, best first
    assert list(df["test_acc_mean"]) == sorted(df["test_acc_mean"], reverse=True)


def test_compare_md(e2e):
    res = cli("compare", e2e, "--format", "md")
    assert_ok(res)
    text = stdout_of(res)
    assert "±" in text
    rows = [ln for ln in text.splitlines() if ln.startswith("|")]
    assert len(rows) == 2 + 2  # header, separator, 2 groups
    assert any("dsgd" in r for r in rows) and any("csgd" in r for r in rows)
    dsgd = np.array([s["test_acc"] for s in summaries(e2e) if s["algo"] == "dsgd"])
    assert f"{dsgd.mean():.2f} ± {dsgd.std(ddof=1):.2f}" in text


def test_compare_table(e2e):
    res = cli("compare", e2e)
    assert_ok(res)
    text = stdout_of(res)
    assert "5 runs" in text
    data_rows = [ln for ln in text.splitlines() if ln.startswith("│")]
    assert len(data_rows) == 2, text
    assert any("dsgd" in r for r in data_rows) and any("csgd" in r for r in data_rows)
    assert "±" in text


def test_compare_by_and_columns(e2e):
    res = cli("compare", e2e, "--format", "csv", "--by", "algo", "--columns", "test_acc,train_loss")
    assert_ok(res)
    df = read_csv_text(stdout_of(res))
    assert sorted(df["algo"]) == ["csgd", "dsgd"]
    assert "train_loss_mean" in df.columns and "test_loss_mean" not in df.columns
    assert_user_error(cli("compare", e2e, "--by", "nosuchkey"), "--by", "nosuchkey")
    assert_user_error(cli("compare", e2e, "--columns", "test_acc,bogus"), "--columns", "bogus")
    assert_user_error(cli("compare", e2e, "--format", "xml"), "--format", "xml")


def test_compare_missing_or_empty_folder(tmp_path):
    assert_user_error(cli("compare", tmp_path / "nope"), "does not exist")
    (tmp_path / "empty").mkdir()
    assert_user_error(cli("compare", tmp_path / "empty"), "no finished runs")


# ----------------------------------------------------------------------------------------------
# rerun, --force


def test_rerun_is_skipped_unless_force(tmp_path):
    root = tmp_path / "res"
    args = ["run", *TINY, "--workers", "2", "--results", root]
    assert_ok(cli(*args))
    (d,) = run_dirs(root)
    before = snapshot(root)

    res = cli(*args)
    assert_ok(res)
    assert re.search(r"^skipped\b", stdout_of(res), re.M), stdout_of(res)
    assert snapshot(root) == before

    res = cli(*args, "--force")
    assert_ok(res)
    assert not re.search(r"^skipped\b", stdout_of(res), re.M)
    assert "test acc" in stdout_of(res)
    after = snapshot(root)
    assert set(after) == set(before)
    assert after["/".join([d.name, "summary.json"])][1] != before["/".join([d.name, "summary.json"])][1]
    assert len(run_dirs(root)) == 1


# ----------------------------------------------------------------------------------------------
# compare --out


def test_compare_out_files(e2e, tmp_path):
    csv_file, md_file = tmp_path / "board.csv", tmp_path / "board.md"
    assert_ok(cli("compare", e2e, "--out", csv_file))
    df = pd.read_csv(csv_file, comment="#")
    assert len(df) == 2 and "test_acc_mean" in df.columns
    assert_ok(cli("compare", e2e, "--out", md_file))
    text = md_file.read_text()
    assert "±" in text and text.count("\n|") >= 3

    bad = tmp_path / "board.txt"
    assert_user_error(cli("compare", e2e, "--out", bad), "--out", ".txt")
    assert not bad.exists()
    # an earlier export survives a failed one
    assert_user_error(cli("compare", e2e, "--out", tmp_path / "nodir" / "x.csv"), "--out")
    assert pd.read_csv(csv_file, comment="#").equals(df)


# ----------------------------------------------------------------------------------------------
# list


@pytest.mark.parametrize("what,registry", [
    ("algorithms", algorithms.PRESETS),
    ("topologies", topologies.TOPOLOGIES),
    ("datasets", DATASETS),
    ("models", MODELS),
])
def test_list_section(what, registry):
    res = cli("list", what)
    assert_ok(res)
    text = stdout_of(res)
    assert len(registry) > 0
    for name in registry:
        assert re.search(rf"(^|[\s│]){re.escape(name)}([\s│]|$)", text, re.M), f"{name} not listed by `list {what}`"


def test_list_all_and_components():
    res = cli("list")
    assert_ok(res)
    text = stdout_of(res)
    for reg in (algorithms.PRESETS, topologies.TOPOLOGIES, DATASETS, MODELS):
        for name in reg:
            assert name in text
    for flag, reg in (("--grad", algorithms.ORACLES), ("--opt", algorithms.OPTIMIZERS), ("--comm", algorithms.RULES)):
        for name in reg:
            assert f"{flag} {name}" in text


def test_list_unknown():
    assert_user_error(cli("list", "foo"), "foo", "algorithms")


# ----------------------------------------------------------------------------------------------
# topology


def test_topology_ring_json():
    res = cli("topology", "ring", "--workers", "16", "--format", "json")
    assert_ok(res)
    props = json.loads(stdout_of(res))
    assert round(props["lambda2"], 3) == 0.949
    assert props["spectral_gap"] == pytest.approx(1 - props["lambda2"])
    assert props["workers"] == 16 and props["max_degree"] == 2


def test_topology_grid_json():
    res = cli("topology", "grid", "--workers", "16", "--format", "json")
    assert_ok(res)
    assert round(json.loads(stdout_of(res))["lambda2"], 3) == 0.869


def test_topology_table():
    res = cli("topology", "torus:4x4", "--workers", "16")
    assert_ok(res)
    assert "lambda2" in stdout_of(res)


def test_topology_torus_bad_n():
    line = assert_user_error(cli("topology", "torus", "--workers", "7"), "torus", "n=7")
    listed = [int(v) for v in re.findall(r"\b\d+\b", line.split("n=7", 1)[1])]
    assert 6 in listed and 8 in listed and 9 in listed
    assert 7 not in listed


def test_topology_bad_input():
    assert_user_error(cli("topology", "rign"), "rign", "ring")
    assert_user_error(cli("topology", "ring", "--workers", "0"), "--workers")
    assert_user_error(cli("topology", "ring", "--format", "xml"), "--format")


# ----------------------------------------------------------------------------------------------
# bad input to `run`: one line, exit 2, nothing lost


def _matrix_files(tmp: Path) -> dict:
    ring4 = np.array([[1, 1, 0, 1], [1, 1, 1, 0], [0, 1, 1, 1], [1, 0, 1, 1]]) / 3
    not_ds = ring4.copy()
    not_ds[0, 0] += 0.2
    disconnected = np.zeros((4, 4))
    disconnected[:2, :2] = disconnected[2:, 2:] = 0.5
    files = {}
    np.save(tmp / "not_ds.npy", not_ds)
    files["not_ds"] = (tmp / "not_ds.npy", ("not doubly stochastic",))
    np.save(tmp / "rect.npy", np.ones((4, 3)) / 3)
    files["rect"] = (tmp / "rect.npy", ("square", "4x3"))
    np.save(tmp / "disc.npy", disconnected)
    files["disconnected"] = (tmp / "disc.npy", ("disconnected",))
    np.savetxt(tmp / "three.csv", np.ones((3, 3)) / 3, delimiter=",")
    files["wrong_size_csv"] = (tmp / "three.csv", ("3x3", "n=4"))
    np.savetxt(tmp / "not_ds.csv", not_ds, delimiter=",")
    files["not_ds_csv"] = (tmp / "not_ds.csv", ("not doubly stochastic",))
    files["missing"] = (tmp / "missing.npy", ("does not exist",))
    return files


BAD_RUN_ARGS = {
    "algo-typo": (["--algo", "dgsd"], ("unknown algorithm", "dgsd", "did you mean 'dsgd'")),
    "topology": (["--topology", "rign"], ("unknown topology", "rign", "ring")),
    "dataset": (["--dataset", "imagenet"], ("unknown dataset", "imagenet", "synthetic")),
    "model": (["--model", "vgg"], ("unknown model", "vgg", "mlp")),
    "workers0": (["--workers", "0"], ("--workers", "0")),
    "batch-gt-shard": (["--workers", "4", "--batch", "1000"], ("--batch 1000", "128")),
    "schedule": (["--schedule", "foo"], ("--schedule", "foo", "cosine")),
    "order": (["--order", "foo"], ("--order", "foo", "cta")),
    "lr-scaling": (["--lr-scaling", "sqrt"], ("--lr-scaling", "sqrt")),
    "rho0": (["--algo", "sam", "--rho", "0"], ("--rho", "> 0")),
    "rho-neg": (["--algo", "sam", "--rho=-0.1"], ("--rho",)),
    "rho-unused": (["--rho", "0.1"], ("--rho", "dsgd", "sam")),
    "set-unknown": (["--set", "sam.rhoo=1"], ("rhoo", "did you mean 'rho'")),
    "set-component": (["--set", "sma.rho=1"], ("sma", "sam")),
    "sigma-neg": (["--algo", "ad-sam", "--sigma=-1"], ("--sigma", ">= 0")),
    "p-neg": (["--algo", "dsgd-ac", "--p=-1"], ("--p", ">= 0")),
    "betas-1": (["--algo", "lamb", "--betas", "0.9,1.0"], ("--betas", "[0, 1)")),
    "betas-neg": (["--algo", "lamb", "--betas=-0.1,0.9"], ("--betas",)),
    "betas-count": (["--algo", "lamb", "--betas", "0.9"], ("--betas", "2")),
    "betas-text": (["--algo", "lamb", "--betas", "a,b"], ("--betas",)),
    "grad": (["--grad", "foo"], ("gradient oracle", "foo", "sam")),
    "opt": (["--opt", "adam"], ("adam", "sgd")),
    "comm": (["--comm", "gosip"], ("gosip", "gossip")),
    "partition": (["--partition", "noniid"], ("partition", "dirichlet")),
    "dirichlet-alpha": (["--partition", "dirichlet:0"], ("dirichlet:0", "> 0")),
    "seeds": (["--seeds", "a,b"], ("--seeds",)),
    "milestones": (["--schedule", "multistep", "--milestones", "0.5,1.5"], ("--milestones",)),
    "momentum": (["--momentum", "1.0"], ("--momentum",)),
    "ac-start": (["--algo", "dsgd-ac", "--ac-start", "soon"], ("--ac-start", "soon")),
    "val-fraction": (["--val-fraction", "1.0"], ("--val-fraction",)),
    "device": (["--device", "tpu"], ("--device", "tpu")),
    "lr0": (["--lr", "0"], ("--lr",)),
    "hessian-samples": (["--hessian-samples=-1"], ("--hessian-samples",)),
    "precision": (["--precision", "fp16"], ("--precision", "bf16")),
    "executor": (["--executor", "vamp"], ("--executor", "vmap")),
    "init-missing": (["--init", "no_such_weights.pt"], ("--init", "no such file")),
    "augment-signals": (["--augment"], ("--augment", "image")),
    "cifar-missing": (["--dataset", "cifar10", "--data-dir", "{empty}"], ("cifar10", "--data-dir")),
}


@pytest.mark.parametrize("case", list(BAD_RUN_ARGS))
def test_run_bad_input(case, finished, tmp_path):
    extra, needles = BAD_RUN_ARGS[case]
    empty = tmp_path / "empty"
    empty.mkdir()
    extra = [a.replace("{empty}", str(empty)) for a in extra]
    before = snapshot(finished)
    args = ["run", *TINY, "--workers", "2", *extra, "--results", finished]
    assert_user_error(cli(*args), *needles)
    assert snapshot(finished) == before
    assert list(empty.iterdir()) == []


@pytest.mark.parametrize("case", ["not_ds", "rect", "disconnected", "wrong_size_csv", "not_ds_csv", "missing"])
def test_run_bad_matrix_file(case, finished, tmp_path):
    path, needles = _matrix_files(tmp_path)[case]
    before = snapshot(finished)
    res = cli("run", *TINY, "--workers", "4", "--topology", f"file:{path}", "--results", finished)
    assert_user_error(res, str(path), *needles)
    assert snapshot(finished) == before


def test_run_good_matrix_file(tmp_path):
    W = np.array([[1, 1, 0, 1], [1, 1, 1, 0], [0, 1, 1, 1], [1, 0, 1, 1]]) / 3
    np.savetxt(tmp_path / "ring4.csv", W, delimiter=",")
    root = tmp_path / "res"
    assert_ok(cli("run", *TINY, "--workers", "4", "--topology", f"file:{tmp_path / 'ring4.csv'}", "--results", root))
    (s,) = summaries(root)
    assert s["status"] == "completed" and s["spectral_gap"] == pytest.approx(2 / 3)


def test_rejected_run_leaves_no_folder(tmp_path):
    root = tmp_path / "res"
    root.mkdir()
    assert_user_error(cli("run", *TINY, "--workers", "4", "--batch", "1000", "--results", root), "--batch")
    assert list(root.iterdir()) == []


def test_run_negative_seed(finished):
    before = snapshot(finished)
    assert_user_error(cli("run", *TINY, "--workers", "2", "--seed=-1", "--results", finished), "seed")
    assert snapshot(finished) == before


def test_run_unwritable_results(tmp_path, finished):
    afile = tmp_path / "afile"
    afile.write_text("I am a file\n")
    assert_user_error(cli("run", *TINY, "--workers", "2", "--results", afile / "sub"),
                      "not writable", "--results")
    assert afile.read_text() == "I am a file\n"
    assert_user_error(cli("run", *TINY, "--workers", "2", "--results", afile), "--results")
    assert afile.read_text() == "I am a file\n"


def test_run_bad_option_type_is_usage_error():
    """click's own parsing errors are exit 2 without a traceback as well."""
    res = cli("run", *TINY, "--workers", "many")
    assert res.exit_code == 2
    assert "Traceback" not in res.output


# ----------------------------------------------------------------------------------------------
# corrupt summaries, diverged runs


def test_compare_skips_corrupt_summary(e2e, tmp_path):
    root = tmp_path / "res"
    for d in run_dirs(e2e):
        if "dsgd" in d.name:
            shutil.copytree(d, root / d.name)
    bad = root / "broken-run" / "summary.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("{this is not json ]]\x00garbage")
    nodict = root / "odd-run" / "summary.json"
    nodict.parent.mkdir()
    nodict.write_text(json.dumps({"hello": 1}))

    res = cli("compare", root, "--format", "csv")
    assert_ok(res)
    df = read_csv_text(stdout_of(res))
    assert list(df["algo"]) == ["dsgd"] and df["seeds"].iloc[0] == 3
    err = "".join(stderr_of(res).split())  # rich may wrap long paths
    assert "warning" in err
    assert str(bad).replace(" ", "") in err
    assert str(nodict).replace(" ", "") in err
    # the table form warns too and still shows the good runs
    res = cli("compare", root)
    assert_ok(res)
    assert "dsgd" in stdout_of(res) and "warning" in stderr_of(res)


def test_diverged_run_is_counted_not_averaged(e2e, tmp_path):
    root = tmp_path / "res"
    for d in run_dirs(e2e):
        if "dsgd" in d.name:
            shutil.copytree(d, root / d.name)
    res = cli("run", *TINY, "--workers", "2", "--lr", "1e8", "--no-stop-on-collapse", "--results", root)
    assert_ok(res)
    assert "diverged" in stdout_of(res)
    (s,) = [s for s in summaries(root) if s["workers"] == 2]
    assert s["status"] == "diverged" and s["diverged_step"] is not None
    assert s["test_acc"] is None

    res = cli("compare", root, "--format", "csv")
    assert_ok(res)
    df = read_csv_text(stdout_of(res))
    assert len(df) == 2
    div = df[df["workers"] == 2].iloc[0]
    assert div["diverged"] == 1 and div["seeds"] == 1
    assert np.isnan(div["test_acc_mean"])
    good = df[df["workers"] == 4].iloc[0]
    accs = [s["test_acc"] for s in summaries(root) if s["workers"] == 4]
    assert good["diverged"] == 0 and good["test_acc_mean"] == pytest.approx(np.mean(accs))
    # ranked below every run that finished
    assert df.index[df["workers"] == 2][0] == len(df) - 1

    res = cli("compare", root, "--format", "md")
    assert_ok(res)
    assert "1/1 failed (1 diverged" in stdout_of(res)
    res = cli("compare", root)
    assert_ok(res)
    assert "1/1 failed (1 diverged" in " ".join(stdout_of(res).split())


# ----------------------------------------------------------------------------------------------
# entry points


def test_python_m_help(tmp_path):
    p = subprocess.run([sys.executable, "-m", "dsgdbench", "--help"], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    for cmd in ("run", "compare", "list", "topology", "speed"):
        assert cmd in p.stdout


def test_console_script_help(tmp_path):
    exe = shutil.which("dsgdbench")
    if exe is None:
        pytest.skip("console script dsgdbench not installed")
    p = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "compare" in p.stdout and "topology" in p.stdout


def test_command_help_in_process():
    for cmd in ("run", "compare", "list", "topology", "speed"):
        assert_ok(cli(cmd, "--help"))


# ----------------------------------------------------------------------------------------------
# --config FILE.toml


def _toml(path: Path, results: Path, **extra) -> Path:
    lines = ['dataset = "synthetic"', 'algo = "csgd"', "workers = 2", "batch = 8", "steps = 3", "lr = 0.05",
             "eval_every = 1000",
             'schedule = "constant"', f'results = "{results.as_posix()}"']
    lines += [f"{k} = {v}" for k, v in extra.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def cli_argv(monkeypatch, *args):
    """Invoke with sys.argv set as a real process would see it."""
    args = [str(a) for a in args]
    monkeypatch.setattr(sys, "argv", ["dsgdbench", *args])
    return cli(*args)


def test_config_values_are_used(tmp_path, monkeypatch):
    root = tmp_path / "res"
    cfg = _toml(tmp_path / "c.toml", root)
    assert_ok(cli_argv(monkeypatch, "run", "--config", cfg))
    (s,) = summaries(root)
    assert (s["algo"], s["workers"], s["batch"], s["steps"], s["lr"], s["dataset"]) == ("csgd", 2, 8, 3, 0.05,
                                                                                         "synthetic")
    config = json.loads((run_dirs(root)[0] / "config.json").read_text())
    assert config["schedule"] == "constant"


def test_config_typed_flag_wins(tmp_path, monkeypatch):
    root = tmp_path / "res"
    cfg = _toml(tmp_path / "c.toml", root)
    assert_ok(cli_argv(monkeypatch, "run", "--config", cfg, "--lr", "0.2", "--batch=4"))
    (s,) = summaries(root)
    assert s["lr"] == 0.2 and s["batch"] == 4
    assert s["algo"] == "csgd" and s["steps"] == 3  # the rest still from the file


def test_config_short_and_negative_flags_win(tmp_path):
    """-n and --no-X typed on the command line also win over the file."""
    root = tmp_path / "res"
    cfg = _toml(tmp_path / "c.toml", root, wd_1d="true", nesterov="true")
    assert_ok(cli("run", "--config", cfg, "-n", "4", "--no-wd-1d"))
    (d,) = run_dirs(root)
    config = json.loads((d / "config.json").read_text())
    assert config["workers"] == 4 and config["params"]["sgd.wd_1d"] is False
    assert config["params"]["sgd.nesterov"] is True  # not typed: from the file


def test_config_unknown_key(tmp_path, monkeypatch, finished):
    before = snapshot(finished)
    cfg = _toml(tmp_path / "c.toml", finished, learning_rate=0.1)
    assert_user_error(cli_argv(monkeypatch, "run", "--config", cfg), "learning_rate")
    assert snapshot(finished) == before


def test_config_missing_or_invalid_file(tmp_path, monkeypatch):
    assert_user_error(cli_argv(monkeypatch, "run", "--config", tmp_path / "nope.toml"), "--config", "no such file")
    bad = tmp_path / "bad.toml"
    bad.write_text("lr = = 3\n")
    assert_user_error(cli_argv(monkeypatch, "run", "--config", bad), "--config", "invalid toml")


def test_config_wrong_value_type(tmp_path, monkeypatch):
    root = tmp_path / "res"
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'dataset = "synthetic"\nworkers = 2\nbatch = 8\nsteps = 5\nlr = "fast"\n'
                   f'results = "{root.as_posix()}"\n')
    assert_user_error(cli_argv(monkeypatch, "run", "--config", cfg), "lr")


def test_config_seeds_and_force(tmp_path, monkeypatch):
    """seeds in the file as an int, a list or a range string; force must be a boolean."""
    root = tmp_path / "res"
    assert_ok(cli_argv(monkeypatch, "run", "--config", _toml(tmp_path / "a.toml", root, seeds=3)))
    assert_ok(cli_argv(monkeypatch, "run", "--config", _toml(tmp_path / "b.toml", root, seeds='"0-1"')))
    assert sorted(s["seed"] for s in summaries(root)) == [0, 1, 3]
    before = snapshot(root)
    for extra, words in (({"seeds": "[]"}, ("seeds",)), ({"seeds": '"x"'}, ("seeds",)),
                         ({"seeds": "true"}, ("seeds",)), ({"force": '"no"'}, ("force",)),
                         ({"betas": "[0.9]"}, ("--betas", "2"))):
        assert_user_error(cli_argv(monkeypatch, "run", "--config", _toml(tmp_path / "c.toml", root, **extra)),
                          *words)
    assert snapshot(root) == before


def test_toml_ac_start_may_be_a_number():
    assert RunConfig.from_dict({"algo": "dsgd-ac", "ac_start": 0.1}).validate().param("ac_start") == "0.1"
    with pytest.raises(UserError, match="ac_start"):
        RunConfig.from_dict({"ac_start": True})


# ----------------------------------------------------------------------------------------------
# a component added in one file (tests/plugins/signum.py, registered through DSGDBENCH_PLUGINS)


def test_plugin_component_shows_in_help_and_list():
    res = cli("run", "--help")
    assert_ok(res)
    assert "--beta" in res.output and "Signum momentum" in res.output
    res = cli("list", "components")
    assert_ok(res)
    assert "--opt signum" in res.output and "signum.beta" in res.output
    res = cli("list", "algorithms")
    assert "d-signum" in res.output


def test_plugin_component_runs_through_the_cli(tmp_path):
    root = tmp_path / "res"
    assert_ok(cli("run", *TINY, "--workers", "4", "--algo", "d-signum", "--beta", "0.7", "--results", root))
    (d,) = run_dirs(root)
    config = json.loads((d / "config.json").read_text())
    assert config["opt"] == "signum" and config["params"]["signum.beta"] == 0.7
    assert json.loads((d / "summary.json").read_text())["status"] == "completed"
    assert_user_error(cli("run", *TINY, "--algo", "d-signum", "--beta", "1.5", "--results", root),
                      "--beta", "signum.beta", "[0, 1)")


def test_deterministic_flag_is_recorded_and_changes_nothing_on_cpu(tmp_path, monkeypatch):
    """--deterministic turns on torch's deterministic algorithms with the cuBLAS workspace they need (set
    before any GPU use); CPU kernels are deterministic already, so the numbers equal a plain run's."""
    import torch

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    args = ["run", *TINY, "--workers", "4", "--algo", "dsgd", "--no-hessian"]
    try:
        assert_ok(cli(*args, "--deterministic", "--results", tmp_path / "det"))
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)
    assert_ok(cli(*args, "--results", tmp_path / "plain"))
    (det,), (plain,) = run_dirs(tmp_path / "det"), run_dirs(tmp_path / "plain")
    sd, sp = (json.loads((d / "summary.json").read_text()) for d in (det, plain))
    assert sd["deterministic"] is True and sp["deterministic"] is False
    assert sd["test_loss"] == sp["test_loss"] and sd["consensus_distance"] == sp["consensus_distance"]
