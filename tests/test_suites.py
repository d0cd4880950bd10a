"""Suites: the shipped TOML files, expansion and de-duplication, bad input, and tiny suites run
end to end through the CLI (run, rerun skips, an interrupted suite continues, --force).

Every training run here is tiny (synthetic data set, 2-4 workers, batch 8, 3-5 steps, no Hessian).
"""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from bench import suites
from bench.errors import UserError
from bench.models import MODELS
from dsgdbench import app

SEVEN = ["csgd", "dsgd", "dsgd-ac", "sam", "ad-sam", "lamb", "d-lamb"]
DECENTRALIZED = {"dsgd", "dsgd-ac", "d-lamb"}

TINY_SUITE = """
description = "tiny test suite"
seeds = [0, 1]

[base]
dataset = "synthetic"
model = "mlp"
workers = 4
batch = 8
steps = 5
lr = 0.05
schedule = "constant"
eval_every = 1000
hessian = false

[grid]
algo = ["csgd", "dsgd"]
topology = ["ring", "exponential"]
"""  # 6 runs: csgd has no topology (one run per seed), dsgd on 2 topologies x 2 seeds


# ----------------------------------------------------------------------------------------------
# helpers


def cli(*args):
    return CliRunner(env={"COLUMNS": "250"}).invoke(app, [str(a) for a in args])


def stderr_of(res) -> str:
    try:
        return res.stderr
    except ValueError:
        return res.output


def assert_ok(res):
    assert res.exit_code == 0, f"exit {res.exit_code}\n{res.output}\n{res.exc_info}"
    assert "Traceback" not in res.output


def assert_user_error(res, *needles) -> str:
    assert res.exception is None or isinstance(res.exception, SystemExit), f"{res.exception!r}\n{res.output}"
    assert res.exit_code == 2, f"exit {res.exit_code}\n{res.output}"
    assert "Traceback" not in res.output
    lines = stderr_of(res).strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr:\n{stderr_of(res)}"
    assert lines[0].startswith("error:"), lines[0]
    for n in needles:
        assert n.lower() in lines[0].lower(), f"{n!r} not in {lines[0]!r}"
    return lines[0]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in Path(root).rglob("summary.json"))


def snapshot(root: Path) -> dict:
    return {str(f.relative_to(root)): (f.stat().st_mtime_ns, f.read_bytes())
            for f in sorted(Path(root).rglob("*")) if f.is_file()}


def planned(ref, **kw) -> suites.Plan:
    """The plan of a suite, against an empty results folder unless one is given (what is planned after
    tuning depends on what the folder holds)."""
    import tempfile

    kw.setdefault("results", tempfile.mkdtemp(prefix="dsgdbench-plan-"))
    return suites.plan(suites.load_suite(str(ref)), check_run=False, **kw)


@pytest.fixture
def wrn(monkeypatch):
    """dsgdac-table names the CIFAR WideResNet-28-10; stand in for it if it is not registered."""
    if "wrn28_10" not in MODELS:
        monkeypatch.setitem(MODELS._items, "wrn28_10", MODELS.get("resnet18"))
        monkeypatch.setitem(MODELS._help, "wrn28_10", "stand-in")


# ----------------------------------------------------------------------------------------------
# the shipped suites


def test_shipped_suites_are_package_data():
    assert set(suites.shipped_names()) >= {"quick", "quick-tune", "large-batch", "dsgdac", "beyond", "zhu2023-fig1",
                                           "dsgdac-table"}


# (runs planned now, report runs planned after tuning): counted by hand from the TOML files
@pytest.mark.parametrize("name,count,pending", [
    ("quick", 7 * 3, 0), ("quick-tune", 7 * 4 * 2, 7 * 3), ("large-batch", 3 * 2 * 6 * 2, 3 * 2 * 10),
    ("dsgdac", 6 * 5 * 2, 6 * 6), ("beyond", 226 * 2, 38 * 3), ("zhu2023-fig1", 8, 0), ("dsgdac-table", 21, 0)])
def test_shipped_suite_expands(name, count, pending, wrn, tmp_path):
    """dsgdac: csgd, dsgd, sam and dsgd-ac with p = 1, 2, 3; beyond: 8 gossip methods x 2 graphs x 2 partitions
    + 3 graph-free ones x 2 partitions = 38 configurations, with their lr grids: 6 values (csgd 2, dsgd, qg-dsgdm,
    decentlam, choco 16, sgp 4, local-sgd 2 configurations: 24 x 6), dsgt 4 x 8, d2 and exact-diffusion 8 x 5,
    diloco 2 x 5: 226 points."""
    # an empty results folder (nothing tuned yet) and an empty data folder (CIFAR suites plan without CIFAR)
    p = planned(name, data_dir=str(tmp_path), results=str(tmp_path / "res"))
    assert len(p.runs) == count and p.pending == pending
    assert len({r.run_id for r in p.runs}) == count
    assert p.suite.description and suites.load_suite(name).results == f"results/{name}"
    for r in p.runs:
        assert r.cfg.results == str(tmp_path / "res")
        assert r.resolved.run_id() == r.run_id


def test_quick_suite_contents():
    p = planned("quick")
    assert sorted({r.cfg.algo for r in p.runs}) == sorted(SEVEN)
    assert sorted({r.cfg.seed for r in p.runs}) == [0, 1, 2]
    for r in p.runs:
        c = r.resolved
        assert (c.dataset, c.workers, c.hessian, c.val_fraction, c.batch, c.warmup) == ("mnist1d", 16, True, 0.1, 32, 28)
        assert c.topology == ("ring" if c.algo in DECENTRALIZED else "allreduce")
        tuned_lr = {"ad-sam": 0.1, "lamb": 0.02, "d-lamb": 0.05}  # quick-tune's choices, in quick.toml
        assert c.lr == tuned_lr.get(c.algo, 0.2)
        assert c.steps == round(80 * 3600 / 512)  # 80 epochs of N / B steps (3600 samples left by val_fraction 0.1)


def test_quick_is_quick_tunes_report_phase(tmp_path):
    """quick's runs are the report runs quick-tune plans from its choices (the same run ids): faked here by
    finished tuning summaries that make quick's learning rates win."""
    root = tmp_path / "qt"
    tune = planned("quick-tune", results=str(root))
    win = {r.cfg.algo: r.cfg.lr for r in planned("quick").runs}
    for r in tune.runs:
        d = root / r.run_id
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps({"algo": r.cfg.algo, "status": "completed",
                                                    "val_acc": 90.0 if r.cfg.lr == win[r.cfg.algo] else 50.0}))
    report = planned("quick-tune", results=str(root))
    assert {r.run_id for r in report.runs if r.phase == "report"} == {r.run_id for r in planned("quick").runs}


def test_large_batch_suite_contents():
    """Tuning runs: every (algo, topology, batch, lr) on seeds 100-101 (C-SGD's topologies are one run),
    no Hessian; the report runs come once they are finished."""
    p = planned("large-batch")
    by = {}
    for r in p.runs:
        by.setdefault((r.cfg.algo, r.resolved.topology), []).append(r)
    assert sorted(by) == [("csgd", "allreduce"), ("dsgd", "exponential"), ("dsgd", "ring")]
    n_lr = len(p.suite.grid["lr"])
    assert all(len(v) == 2 * n_lr * 2 for v in by.values())  # 2 batches x the lrs x 2 tuning seeds
    assert p.merged == 2 * n_lr * 2  # csgd on the exponential graph: the ring's runs
    for r in p.runs:
        c = r.resolved
        assert r.phase == "tune" and c.seed in (100, 101) and not c.hessian
        assert c.steps == 600 and c.val_fraction == 0.1 and c.warmup == 40 and c.dataset == "mnist1d:60000"
    assert {r.cfg.batch for r in p.runs} == {8, 128}
    assert p.pending == 3 * 2 * 10  # 3 configurations x 2 batches x 10 report seeds


def test_cifar_suites_contents(wrn, tmp_path):
    p = planned("zhu2023-fig1", data_dir=str(tmp_path))
    assert {(r.cfg.batch, r.cfg.lr) for r in p.runs} == {(64, 0.1), (512, 0.8)}
    assert {r.resolved.topology for r in p.runs} == {"allreduce", "ring", "grid", "exponential"}
    for r in p.runs:
        c = r.resolved
        assert (c.dataset, c.model, c.steps, c.warmup, c.schedule, c.milestones) == (
            "cifar10", "resnet18", 6000, 60, "multistep", (0.4, 0.8))
        assert (c.param("momentum"), c.param("weight_decay"), c.augment, c.device) == (0.9, 5e-4, True, "cuda")
    p = planned("dsgdac-table", data_dir=str(tmp_path))
    assert sorted({r.cfg.algo for r in p.runs}) == sorted(SEVEN)
    for r in p.runs:
        c = r.resolved
        assert (c.model, c.batch, c.schedule) == ("wrn28_10", 128, "cosine")
        values = dict(c.params)
        for key, want in (("sgd.wd_1d", False), ("gossip-ac.p", 3.0), ("gossip-ac.ac_start", "10ep"),
                          ("sam.rho", 0.05)):
            assert values.get(key, want) == want  # where the run has that component
        assert c.warmup == round(10 * 50000 / (16 * 128))  # an epoch is N / B steps
        assert c.steps == round(200 * 50000 / (16 * 128))
        assert c.topology == ("ring" if c.algo in DECENTRALIZED else "allreduce")


def test_dry_run_lists_runs_and_trains_nothing(tmp_path):
    root = tmp_path / "res"
    res = cli("suite", "quick", "--dry-run", "--results", root)
    assert_ok(res)
    p = planned("quick")
    for r in p.runs:
        assert r.run_id in res.stdout
    assert "21 runs: 0 done, 21 to run" in res.stdout
    assert not root.exists()


def test_dry_run_of_cifar_suites_without_cifar(tmp_path, wrn):
    for name, count in (("zhu2023-fig1", 8), ("dsgdac-table", 21)):
        res = cli("suite", name, "--dry-run", "--data-dir", tmp_path, "--results", tmp_path / "res")
        assert_ok(res)
        assert f"{count} runs: 0 done, {count} to run" in res.stdout
        assert "cifar10 is not on disk here" in res.stdout
    assert not (tmp_path / "res").exists()


def test_cifar_suite_without_cifar_fails_before_running(tmp_path):
    res = cli("suite", "zhu2023-fig1", "--set", "device=cpu", "--data-dir", tmp_path, "--results", tmp_path / "res")
    assert_user_error(res, "zhu2023-fig1", "cifar10", "--data-dir")
    assert not (tmp_path / "res").exists()


def test_list_suites(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no results folder: nothing tuned yet
    res = cli("list", "suites")
    assert_ok(res)
    text = " ".join(res.stdout.split())
    for name, count in (("quick", "21 runs"), ("large-batch", "72 tuning + 60 report runs"), ("zhu2023-fig1", "8 runs")):
        assert name in text
        assert f"({count})" in text


# ----------------------------------------------------------------------------------------------
# --filter, --seeds, --set


def test_filter_and_seeds():
    p = planned("quick", seeds="5-6", filters=["algo=csgd,dsgd"])
    assert sorted((r.cfg.algo, r.cfg.seed) for r in p.runs) == [("csgd", 5), ("csgd", 6), ("dsgd", 5), ("dsgd", 6)]
    assert p.filtered_out == 2 * 5
    # two filters: both must hold
    p = planned("quick", filters=["algo=sam", "seed=1"])
    assert [(r.cfg.algo, r.cfg.seed) for r in p.runs] == [("sam", 1)]
    # a value as the suite writes it or as resolved: csgd was written on the ring ...
    p = planned("large-batch", filters=["topology=ring"])
    assert sorted({(r.cfg.algo, r.resolved.topology) for r in p.runs}) == [("csgd", "allreduce"), ("dsgd", "ring")]
    # ... and runs on all-reduce
    p = planned("large-batch", filters=["topology=allreduce", "batch=128", "lr=0.025"])  # the 2 tuning seeds
    assert len(p.runs) == 2 and all(r.cfg.algo == "csgd" and r.resolved.lr == 0.025 for r in p.runs)


def test_filter_and_seeds_via_cli(tmp_path):
    res = cli("suite", "quick", "--dry-run", "--seeds", "7", "--filter", "algo=lamb,d-lamb", "--results", tmp_path)
    assert_ok(res)
    ids = re.findall(r"\b((?:lamb|d-lamb)-\S+-s7-[0-9a-f]{8})\b", res.stdout)
    assert len(set(ids)) == 2
    assert "2 runs: 0 done, 2 to run" in res.stdout


def test_set_overrides_every_run():
    p = planned("quick", overrides=["epochs=2", "hessian=false"])
    assert all(r.resolved.steps == 2 * 7 and not r.resolved.hessian for r in p.runs)


# ----------------------------------------------------------------------------------------------
# bad input: one line, exit 2, nothing written


BAD_SUITES = {
    "top-level key": ('[base]\ndataset = "synthetic"\n[grdi]\nalgo = ["csgd"]\n', ("grdi", "did you mean 'grid'")),
    "field at top level": ('lr = 0.1\n', ("'lr'", "[base]")),
    "base field": ('[base]\nlearning_rate = 0.1\n', ("[base]", "learning_rate")),
    "grid field": ('[grid]\nlrr = [0.1]\n', ("[grid]", "lrr", "did you mean 'lr'")),
    "variant field": ('[[variants]]\nbatchsize = 8\n', ("variants", "batchsize")),
    "per_algo field": ('[per_algo.lamb]\nlrr = 0.1\n', ("per_algo.lamb", "lrr")),
    "per_algo algorithm": ('[per_algo.lanb]\nlr = 0.1\n', ("unknown algorithm", "lanb", "lamb")),
    "grid algorithm": ('[grid]\nalgo = ["csgd", "dgsd"]\n', ("unknown algorithm", "dgsd", "did you mean 'dsgd'")),
    "grid topology": ('[grid]\ntopology = ["ring", "rign"]\n', ("unknown topology", "rign")),
    "grid not a list": ('[grid]\nalgo = "csgd"\n', ("[grid]", "algo", "list")),
    "grid empty list": ('[grid]\nalgo = []\n', ("[grid]", "algo", "empty")),
    "grid empty table": ('[grid]\n', ("[grid]", "empty")),
    "grid value type": ('[grid]\nlr = [0.1, "fast"]\n', ("[grid] lr", "'fast'")),
    "grid and variants": ('[grid]\nlr = [0.1]\n[[variants]]\nlr = 0.2\n', ("'lr'", "[grid]", "[[variants]]")),
    "per_algo vs grid": ('[grid]\nlr = [0.1]\n[per_algo.lamb]\nlr = 0.01\n', ("per_algo.lamb", "'lr'", "[grid]")),
    "seed in base": ('[base]\nseed = 3\n', ("'seed'", "seeds")),
    "seeds": ('seeds = [0, "one"]\n', ("seeds",)),
    "range": ('[base]\nworkers = 0\n', ("--workers",)),
    "invalid toml": ('[base\n', ("invalid toml",)),
}


@pytest.mark.parametrize("case", list(BAD_SUITES))
def test_bad_suite_file(case, tmp_path):
    text, needles = BAD_SUITES[case]
    f = write(tmp_path / "bad.toml", text)
    res = cli("suite", f, "--results", tmp_path / "res")
    assert_user_error(res, *needles)
    assert not (tmp_path / "res").exists()
    assert_user_error(cli("suite", f, "--dry-run"), *needles)


BAD_ARGS = {
    "filter key": (["--filter", "algorithm=csgd"], ("--filter", "algorithm", "did you mean 'algo'")),
    "filter form": (["--filter", "csgd"], ("--filter", "KEY=VALUE")),
    "filter value": (["--filter", "workers=many"], ("--filter", "workers", "int")),
    "filter none": (["--filter", "algo=sgd"], ("matches none",)),
    "seeds": (["--seeds", "a,b"], ("--seeds",)),
    "set key": (["--set", "lrr=0.1"], ("--set", "lrr")),
    "set value": (["--set", "lr=0"], ("--lr", "> 0")),
    "set seed": (["--set", "seed=3"], ("--set", "--seeds")),
}


@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_bad_arguments(case, tmp_path):
    args, needles = BAD_ARGS[case]
    f = write(tmp_path / "tiny.toml", TINY_SUITE)
    assert_user_error(cli("suite", f, *args, "--results", tmp_path / "res"), *needles)
    assert not (tmp_path / "res").exists()


def test_unknown_suite_name_and_missing_file(tmp_path):
    assert_user_error(cli("suite", "quik"), "unknown suite", "quik", "did you mean 'quick'")
    assert_user_error(cli("suite", tmp_path / "nope.toml"), "nope.toml", "no such file")


def test_default_name_and_results_folder(tmp_path):
    s = suites.load_suite(str(write(tmp_path / "tiny.toml", TINY_SUITE)))
    assert (s.name, s.results, s.seeds) == ("tiny", "results/tiny", (0, 1))


def test_unwritable_results_folder(tmp_path):
    f = write(tmp_path / "tiny.toml", TINY_SUITE)
    afile = write(tmp_path / "afile", "a file\n")
    assert_user_error(cli("suite", f, "--results", afile / "sub"), "not writable")
    assert afile.read_text() == "a file\n"


# ----------------------------------------------------------------------------------------------
# end to end


def _summaries(root: Path) -> dict[str, dict]:
    return {d.name: json.loads((d / "summary.json").read_text()) for d in run_dirs(root)}


def test_suite_end_to_end_rerun_and_resume(tmp_path):
    f = write(tmp_path / "tiny.toml", TINY_SUITE)
    root = tmp_path / "res"
    expected = [r.run_id for r in planned(f, results=str(root)).runs]
    assert len(expected) == 6  # csgd x {ring, exponential} is one run per seed

    res = cli("suite", f, "--results", root)
    assert_ok(res)
    got = _summaries(root)
    assert sorted(got) == sorted(expected)  # the folders are the planned run ids
    assert all(s["status"] == "completed" and s["steps"] == 5 for s in got.values())
    assert sorted((s["algo"], s["topology"], s["seed"]) for s in got.values()) == sorted(
        [("csgd", "allreduce", k) for k in (0, 1)] + [("dsgd", t, k) for t in ("ring", "exponential") for k in (0, 1)])
    out = res.stdout
    assert "ran 6, skipped 0" in out
    assert f"dsgdbench compare {root} --baseline csgd" in "".join(out.split("\n"))
    assert len(re.findall(r"^\[\d/6\] ", out, re.M)) == 6

    # a rerun skips every finished run and writes nothing
    before = snapshot(root)
    res = cli("suite", f, "--results", root)
    assert_ok(res)
    assert "ran 0, skipped 6" in res.stdout
    assert snapshot(root) == before
    res = cli("suite", f, "--results", root, "--dry-run")
    assert_ok(res)
    assert "6 runs: 6 done, 0 to run" in res.stdout

    # an interrupted suite (one run never finished) reruns only that run
    lost = root / expected[3]
    shutil.rmtree(lost)
    res = cli("suite", f, "--results", root)
    assert_ok(res)
    assert "ran 1, skipped 5" in res.stdout
    assert "[6/6]" in res.stdout  # the run count includes the runs already done
    after = snapshot(root)
    assert sorted(_summaries(root)) == sorted(expected)
    assert {k: v for k, v in after.items() if not k.startswith(lost.name)} == {
        k: v for k, v in before.items() if not k.startswith(lost.name)}

    # --force reruns finished runs (here only those the filter keeps)
    res = cli("suite", f, "--results", root, "--force", "--filter", "algo=csgd", "--filter", "seed=0")
    assert_ok(res)
    assert "ran 1, skipped 0" in res.stdout
    changed = {k.split("/")[0] for k, v in snapshot(root).items() if after.get(k) != v}
    assert len(changed) == 1 and changed.pop().startswith("csgd-allreduce-n4-b8-s0-")


def test_diverged_runs_are_results(tmp_path):
    f = write(tmp_path / "div.toml", TINY_SUITE.replace('topology = ["ring", "exponential"]', "")
              .replace('algo = ["csgd", "dsgd"]', 'lr = [0.05, 1e8]').replace("seeds = [0, 1]", "seeds = [0]")
              .replace("lr = 0.05\n", ""))
    root = tmp_path / "res"
    res = cli("suite", f, "--results", root)
    assert_ok(res)
    statuses = sorted(s["status"] for s in _summaries(root).values())
    assert statuses == ["completed", "diverged"]
    assert "ran 2 (1 failed: diverged or collapsed), skipped 0" in res.stdout
    # a diverged run is finished: the rerun skips it
    res = cli("suite", f, "--results", root)
    assert_ok(res)
    assert "ran 0, skipped 2" in res.stdout


def test_all_configurations_validated_before_any_run(tmp_path):
    """A bad value in the last configuration stops the suite before the first one trains."""
    text = TINY_SUITE.replace('topology = ["ring", "exponential"]', 'topology = ["ring", "torus"]\nworkers = [4, 7]')
    res = cli("suite", write(tmp_path / "t.toml", text), "--results", tmp_path / "res")
    assert_user_error(res, "torus", "n=7")
    assert not (tmp_path / "res").exists()
    text = TINY_SUITE.replace('seeds = [0, 1]', 'seeds = [0, 1]\n[[variants]]\nbatch = 8\n[[variants]]\nbatch = 500')
    text = text.replace("batch = 8\nsteps", "steps")
    res = cli("suite", write(tmp_path / "u.toml", text), "--results", tmp_path / "res")
    assert_user_error(res, "--batch 500", "shard")
    assert not (tmp_path / "res").exists()


def test_variants_and_per_algo_precedence(tmp_path):
    text = TINY_SUITE + """
[[variants]]
batch = 4
momentum = 0.5

[[variants]]
batch = 8
momentum = 0.0

[per_algo.dsgd]
weight_decay = 0.0
"""
    p = planned(write(tmp_path / "t.toml", text))
    assert len(p.runs) == 12
    for r in p.runs:
        c = r.resolved
        assert (c.batch, c.param("momentum")) in ((4, 0.5), (8, 0.0))
        assert c.param("weight_decay") == (0.0 if c.algo == "dsgd" else 5e-4)
    with pytest.raises(UserError, match="per_algo.dsgd"):
        planned(write(tmp_path / "u.toml", text.replace("weight_decay = 0.0", "momentum = 0.9")))


@pytest.mark.parametrize("name", ["quick", "large-batch"])
def test_planned_run_ids_match_the_runner(name):
    """The plan's run ids are the folders the runner writes (done/todo depends on it)."""
    from bench.runner import prepare

    p = planned(name)
    for r in (p.runs[0], p.runs[-1], next(r for r in p.runs if r.cfg.algo == "csgd")):
        resolved, _, _ = prepare(r.cfg)
        assert resolved.run_id() == r.run_id


TUNED = """
name = "tuned"
seeds = [0, 1]
tune_seeds = [100, 101]
tune = ["lr"]
results = "{root}"
[base]
dataset = "synthetic"
model = "mlp"
workers = 4
batch = 8
steps = 30
val_fraction = 0.25
hessian = true
[grid]
algo = ["csgd", "dsgd"]
lr = [0.01, 0.1, 0.5]
order = ["cta"]  # a key of gossip's only: it places D-SGD's runs and not C-SGD's
[per_algo.dsgd.grid]
lr = [0.05, 0.2, 1.0]
"""


def test_tuned_suite_chooses_on_tuning_seeds_and_reports_the_others(tmp_path):
    """Phase 1: every lr of each algorithm's own grid on seeds 100, 101; phase 2: the value with the best mean
    val_acc (computed here from the summaries) on seeds 0, 1; compare --tune lr then reports only those."""
    import json as _json

    root = tmp_path / "res"
    f = write(tmp_path / "tuned.toml", TUNED.format(root=root.as_posix()))
    res = cli("suite", f, "--dry-run")
    assert_ok(res)
    assert "report runs" in " ".join(res.stdout.split())
    p = planned(f)
    assert {(r.cfg.algo, r.cfg.lr) for r in p.runs} == {("csgd", v) for v in (0.01, 0.1, 0.5)} | {
        ("dsgd", v) for v in (0.05, 0.2, 1.0)}
    assert {r.cfg.seed for r in p.runs} == {100, 101} and p.pending == 4
    res = cli("suite", f)
    assert_ok(res)
    sums = [_json.loads(s.read_text()) for s in root.glob("*/summary.json")]
    assert len(sums) == 12 + 4
    for algo in ("csgd", "dsgd"):
        tune = [s for s in sums if s["algo"] == algo and s["seed"] >= 100]
        by_lr = {}
        for s in tune:
            by_lr.setdefault(s["lr"], []).append(s)
        rank = sorted(by_lr, key=lambda lr: (sum(x["status"] != "completed" for x in by_lr[lr]),
                                             -np.mean([x["val_acc"] for x in by_lr[lr] if x["status"] == "completed"]
                                                      or [-1]), lr))
        report = [s for s in sums if s["algo"] == algo and s["seed"] < 100]
        assert sorted(s["seed"] for s in report) == [0, 1] and {s["lr"] for s in report} == {rank[0]}
        # the Hessian plays no part in the choice: only the report runs measure it, as the suite asks
        assert all("top_eig" not in s for s in tune) and all(s.get("top_eig") is not None for s in report)
    assert _json.loads((root / "suite.json").read_text())["tune_seeds"] == [100, 101]
    res = cli("compare", root, "--tune", "lr", "--format", "csv")
    assert_ok(res)
    df = pd.read_csv(io.StringIO(res.stdout), comment="#")
    assert sorted(df["seeds"]) == [2, 2]  # the report seeds only
    res = cli("compare", root, "--format", "csv")  # a tuned suite's folder is compared tuned by default
    assert_ok(res)
    assert pd.read_csv(io.StringIO(res.stdout), comment="#").equals(df)
    assert "--tune lr on seeds 100,101" in res.stderr
    res = cli("compare", root, "--tune", "none", "--format", "csv")  # every run: one group per lr, seeds mixed
    assert_ok(res)
    every = pd.read_csv(io.StringIO(res.stdout), comment="#")
    assert len(every) == 6 and every["seeds"].sum() == 16
    res = cli("suite", f)
    assert_ok(res)
    assert "ran 0" in res.stdout  # both phases finished: nothing to do
    res = cli("suite", f, "--dry-run")  # notes name each choice by the grid keys its configuration has
    assert_ok(res)
    text = " ".join(res.stdout.split())
    assert "tuned csgd (all): lr=" in text and "tuned dsgd (order=cta): lr=" in text
