"""The bad-input matrix: every command, every kind of user mistake.

The rule (see dsgdbench.py and tests/test_cli.py): a user's mistake gives exit code 2, exactly one
line on stderr starting with "error:" that names what was wrong, no traceback anywhere, and it
leaves everything already written byte-identical: the finished results folder (`finished`, two
seeds) and the test's own scratch folder (where the case's input files live and where a command
that went ahead would write: --out, plots, landscape.png).

A case is one line: id -> (argv, needles). In argv, {R} is the finished results folder and {T}
the scratch folder holding the input files made by _inputs(). `run(...)` is a tiny synthetic run
writing to {R} (a bad case must be rejected before it writes anything there).
"""

from __future__ import annotations

import gc
import os
import re
import resource
import signal
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

from dsgdbench import app
from helpers import assert_user_error, snapshot, stderr_of

CASE_TIMEOUT_S = 120  # a case that hangs (e.g. --epochs inf accepted) fails instead of blocking the file
FAST_S = 10.0  # cases that must answer at once (no n x n matrix, no list of 10^8 seeds, no huge plan)
FAST_TIMEOUT_S = 30  # ... and are killed soon after that (they run in a forked child)

R, T = "{R}", "{T}"


def run(*extra, steps: bool = True) -> list[str]:
    """`dsgdbench run` on the tiny synthetic set, results into {R}; extra flags come last (and win)."""
    return ["run", "--dataset", "synthetic", "--batch", "8", *(["--steps", "5"] if steps else []),
            "--eval-every", "1000", "--workers", "2", "--results", R, *extra]


def suite(*extra) -> list[str]:
    return ["suite", *extra, "--results", R]


DIST = ["--backend", "dist", "--procs", "2"]  # --dist-timeout only matters for the dist backend

CASES: dict[str, tuple[list[str], tuple]] = {  # needles: str, or a tuple of alternatives
    # --- run: non-finite floats
    "lr-inf": (run("--lr", "inf"), ("--lr", "inf")),
    "lr-nan": (run("--lr", "nan"), ("--lr", "nan")),
    "epochs-inf": (run("--epochs", "inf", steps=False), ("--epochs", "inf")),
    "weight-decay-nan": (run("--weight-decay", "nan"), ("--weight-decay", "nan")),
    "momentum-nan": (run("--momentum", "nan"), ("--momentum", "nan")),
    "sigma-nan": (run("--algo", "ad-sam", "--sigma", "nan"), ("--sigma", "nan")),
    "p-nan": (run("--algo", "dsgd-ac", "--p", "nan"), ("--p", "nan")),
    "clip-nan": (run("--algo", "lamb", "--clip", "nan"), ("--clip", "nan")),
    "eps-inf": (run("--algo", "lamb", "--eps", "inf"), ("--eps", "inf")),
    "rho-inf": (run("--algo", "sam", "--rho", "inf"), ("--rho", "inf")),
    "gamma-min-nan": (run("--algo", "dsgd-ac", "--gamma-min", "nan"), ("--gamma-min", "nan")),
    "val-fraction-nan": (run("--val-fraction", "nan"), ("--val-fraction", "nan")),
    "dist-timeout-inf": (run(*DIST, "--dist-timeout", "inf"), ("--dist-timeout", "inf")),
    "dist-timeout-0": (run(*DIST, "--dist-timeout", "0"), ("--dist-timeout",)),
    "dist-timeout-neg": (run(*DIST, "--dist-timeout=-1"), ("--dist-timeout",)),
    "milestones-nan": (run("--schedule", "multistep", "--milestones", "0.5,nan"), ("--milestones", "nan")),
    # --- run: out of range
    "lr-0": (run("--lr", "0"), ("--lr",)),
    "lr-neg": (run("--lr=-1"), ("--lr",)),
    "workers-0": (run("--workers", "0"), ("--workers",)),
    "workers-neg": (run("--workers=-3"), ("--workers", "-3")),
    "batch-0": (run("--batch", "0"), ("--batch",)),
    "steps-0": (run("--steps", "0"), ("--steps",)),
    "epochs-0": (run("--epochs", "0", steps=False), ("--epochs",)),
    "momentum-1": (run("--momentum", "1"), ("--momentum",)),
    "betas-1": (run("--algo", "lamb", "--betas", "0.9,1"), ("--betas",)),
    "samples-0": (run("--algo", "ad-sam", "--samples", "0"), ("--samples",)),
    "gamma-min-2": (run("--algo", "dsgd-ac", "--gamma-min", "2"), ("--gamma-min",)),
    "hessian-samples-neg": (run("--hessian-samples=-1"), ("--hessian-samples",)),
    "eval-every-neg": (run("--eval-every=-1"), ("--eval-every",)),
    "checkpoint-every-neg": (run("--checkpoint-every=-1"), ("--checkpoint-every",)),
    "val-fraction-1": (run("--val-fraction", "1"), ("--val-fraction",)),
    "procs-0": (run("--procs", "0"), ("--procs", "0")),
    "procs-0-dist": (run("--backend", "dist", "--procs", "0"), ("--procs", "0")),
    "procs-3-of-4": (run("--workers", "4", "--procs", "3"), ("3 processes", "--workers")),
    # --- run: names
    "algo-typo": (run("--algo", "samm"), ("samm", "'sam'")),
    "grad-typo": (run("--grad", "samm"), ("gradient oracle", "samm", "'sam'")),
    "opt-typo": (run("--opt", "sdg"), ("sdg", "sgd")),
    "comm-typo": (run("--comm", "gosip"), ("gosip", "gossip")),
    "topology-typo": (run("--topology", "rnig"), ("rnig", "ring")),
    "dataset-typo": (run("--dataset", "synthetc"), ("synthetc", "synthetic")),
    "model-typo": (run("--model", "mpl"), ("mpl", "mlp")),
    "precision-fp16": (run("--precision", "fp16"), ("--precision", "fp16")),
    "executor-typo": (run("--executor", "nativ"), ("--executor", "nativ")),
    "backend-mpi": (run("--backend", "mpi"), ("--backend", "mpi")),
    "device-tpu": (run("--device", "tpu"), ("--device", "tpu")),
    "schedule-typo": (run("--schedule", "cosin"), ("--schedule", "cosin")),
    "lr-scaling-typo": (run("--lr-scaling", "linar"), ("--lr-scaling", "linar")),
    "order-typo": (run("--order", "atx"), ("--order", "atx")),
    "partition-typo": (run("--partition", "noniid"), ("partition", "noniid", "dirichlet")),
    "partition-dirichlet-0": (run("--partition", "dirichlet:0"), ("dirichlet:0",)),
    "partition-dirichlet-abc": (run("--partition", "dirichlet:abc"), ("dirichlet:abc",)),
    "set-short-typo": (run("--set", "rhoo=0.1"), ("rhoo", "'rho'")),
    "set-component-typo": (run("--set", "sma.rho=0.1"), ("sma", "sam")),
    "set-value-text": (run("--algo", "sam", "--set", "sam.rho=abc"), ("sam.rho", "abc")),
    "set-unused-component": (run("--algo", "dsgd", "--set", "sam.rho=0.1"), ("--set sam.rho", "dsgd")),
    "set-no-equals": (run("--set", "rho0.1"), ("--set", "rho0.1")),
    "rho-with-dsgd": (run("--algo", "dsgd", "--rho", "0.1"), ("--rho", "sam")),
    # --- run: sizes
    "workers-200000": (run("--workers", "200000"), ("--workers", "200000")),
    "batch-gt-shard": (run("--workers", "4", "--batch", "1000"), ("--batch", "1000")),
    "torus-7": (run("--workers", "7", "--topology", "torus"), ("torus", "7")),
    "one-peer-exp-6": (run("--workers", "6", "--topology", "one-peer-exp"), ("one-peer-exp", "6")),
    "random-p-2": (run("--workers", "4", "--topology", "random:p=2"), ("random", "p")),
    # --- run: files
    "init-missing": (run("--init", f"{T}/nope.pt"), ("--init", "nope.pt")),
    "init-folder": (run("--init", f"{T}/emptydir"), ("--init", "emptydir", ("folder", "directory"))),
    "init-text": (run("--init", f"{T}/notes.txt"), ("--init", "notes.txt")),
    "topology-file-missing": (run("--topology", f"file:{T}/missing.npy"), ("missing.npy",)),
    "topology-file-not-ds": (run("--workers", "4", "--topology", f"file:{T}/not_ds.npy"),
                             ("not_ds.npy", "doubly stochastic")),
    "config-missing": (run("--config", f"{T}/nope.toml"), ("--config", "nope.toml")),
    "config-folder": (run("--config", f"{T}/emptydir"), ("--config", "emptydir")),
    "config-binary": (run("--config", f"{T}/binary.toml"), ("--config", "binary.toml")),
    "config-invalid-toml": (run("--config", f"{T}/invalid.toml"), ("--config", "toml")),
    "config-unknown-key": (run("--config", f"{T}/unknown_key.toml"), ("unknown_key.toml", "learning_rate")),
    "config-wrong-type": (run("--config", f"{T}/wrong_type.toml"), ("wrong_type.toml", "lr", "fast")),
    "results-empty": (run("--results", ""), ("--results",)),
    "results-is-file": (run("--results", f"{T}/afile"), ("--results", "afile")),
    # --- run: seeds (a descending range 5-1 is a mistake, not an empty list of runs)
    "seeds-text": (run("--seeds", "a,b"), ("--seeds", "a,b")),
    "seeds-descending": (run("--seeds", "5-1"), ("--seeds", "5-1")),
    "seed-neg": (run("--seed=-1"), ("--seed", "-1")),
    "seeds-huge": (run("--seeds", "0-100000000"), ("--seeds", "0-100000000")),
    # --- suite
    "suite-unknown-name": (suite("quik"), ("unknown suite", "quik", "did you mean 'quick'")),
    "suite-missing-file": (suite(f"{T}/nope.toml"), ("nope.toml",)),
    "suite-top-level-key": (suite(f"{T}/topkey.toml"), ("grdi", "grid")),
    "suite-empty-grid": (suite(f"{T}/emptygrid.toml"), ("[grid]", "empty")),
    "suite-grid-not-list": (suite(f"{T}/notlist.toml"), ("[grid]", "algo", "list")),
    "suite-filter-typo": (suite(f"{T}/tiny.toml", "--filter", "algorithm=csgd"), ("--filter", "algorithm")),
    "suite-filter-no-value": (suite(f"{T}/tiny.toml", "--filter", "algo="), ("--filter", "algo")),
    "suite-set-typo": (suite(f"{T}/tiny.toml", "--set", "lrr=0.1"), ("--set", "lrr")),
    "suite-seeds-huge": (suite(f"{T}/tiny.toml", "--seeds", "0-100000000", "--dry-run"), ("--seeds", "0-100000000")),
    "suite-grid-huge": (suite(f"{T}/big.toml", "--dry-run"), ("390625",)),  # + names an override flag, below
    # --- compare
    "compare-missing-dir": (["compare", f"{T}/nowhere"], ("nowhere",)),
    "compare-empty-dir": (["compare", f"{T}/emptydir"], ("emptydir", "runs")),
    "compare-format-typo": (["compare", R, "--format", "xlsx"], ("--format", "xlsx")),
    "compare-out-ext": (["compare", R, "--out", f"{T}/table.xlsx"], ("--out", ".xlsx")),
    "compare-columns-typo": (["compare", R, "--columns", "test_acc,tset_loss"], ("--columns", "tset_loss")),
    "compare-by-typo": (["compare", R, "--by", "algoo"], ("--by", "algoo")),
    "compare-baseline-absent": (["compare", R, "--baseline", "lamb"], ("--baseline", "lamb")),
    "compare-tune-no-val": (["compare", R, "--tune", "lr"], ("--tune", "validation")),
    "compare-target-acc-0": (["compare", R, "--target-acc", "0"], ("--target-acc",)),
    "compare-target-acc-150": (["compare", R, "--target-acc", "150"], ("--target-acc", "150")),
    # --- plot (--out in the scratch folder: a rejected plot writes nothing anywhere)
    "plot-missing-dir": (["plot", f"{T}/nowhere", "--out", f"{T}/plots"], ("nowhere",)),
    "plot-empty-dir": (["plot", f"{T}/emptydir", "--out", f"{T}/plots"], ("emptydir", "runs")),
    "plot-by-typo": (["plot", R, "--by", "algoo", "--out", f"{T}/plots"], ("--by", "algoo")),
    "plot-tune-no-val": (["plot", R, "--tune", "lr", "--out", f"{T}/plots"], ("--tune", "validation")),
    "plot-tune-seeds-alone": (["plot", R, "--tune-seeds", "0", "--out", f"{T}/plots"], ("--tune-seeds", "--tune")),
    # --- topology
    "topology-unknown": (["topology", "rnig"], ("rnig", "ring")),
    "topology-workers-0": (["topology", "ring", "--workers", "0"], ("--workers",)),
    "topology-format-typo": (["topology", "ring", "--format", "xml"], ("--format", "xml")),
    "topology-random-p-2": (["topology", "random:p=2", "--workers", "8"], ("random", "p")),
    "topology-one-peer-exp-6": (["topology", "one-peer-exp", "--workers", "6"], ("one-peer-exp", "6")),
    # --- list
    "list-unknown": (["list", "algoritms"], ("algoritms", "algorithms")),
    # --- speed
    "speed-device-tpu": (["speed", "--device", "tpu"], ("--device", "tpu")),
    "speed-workers-0": (["speed", "--workers", "0"], ("--workers",)),
    "speed-executors-typo": (["speed", "--executors", "loop,vamp"], ("--executors", "vamp")),
    "speed-scale-workers": (["speed", "--scale", "--workers", "32"], ("--scale", "--workers")),
    # --- landscape (a folder that is not a run: empty, and the results root above the runs)
    "landscape-empty-dir": (["landscape", f"{T}/emptydir", "--out", f"{T}/l.png"], ("emptydir",)),
    "landscape-results-root": (["landscape", R, "--out", f"{T}/l.png"], ("run",)),
}

FAST = {"workers-200000", "seeds-huge", "suite-seeds-huge", "suite-grid-huge"}
FAST_MEMORY = 3 << 30  # ... within this much more address space (a runaway gets MemoryError, not the machine)


# ----------------------------------------------------------------------------------------------
# helpers (as in tests/test_cli.py)


def cli(*args):
    return CliRunner(env={"COLUMNS": "250"}).invoke(app, [str(a) for a in args])


def invoke(*args) -> SimpleNamespace:
    """cli(), keeping only what the checks read: an exception loses its traceback (whose frames may hold a
    runaway's gigabytes) after the last frames are noted, so a failing case cannot starve the next ones."""
    res = cli(*args)
    exc, where = res.exception, ""
    if exc is not None and not isinstance(exc, SystemExit):
        where = "".join(traceback.format_exception(exc)[-4:])
        exc.__traceback__ = None
    out = SimpleNamespace(exit_code=res.exit_code, output=res.output, stderr=stderr_of(res), exception=exc,
                          where=where)
    del res
    gc.collect()
    return out




def _inputs(t: Path) -> None:
    """The input files the cases name, in the scratch folder."""
    (t / "emptydir").mkdir()
    (t / "afile").write_text("I am a file\n")
    (t / "notes.txt").write_text("these are my notes, not a state_dict\n")
    ring4 = np.array([[1, 1, 0, 1], [1, 1, 1, 0], [0, 1, 1, 1], [1, 0, 1, 1]]) / 3
    not_ds = ring4.copy()
    not_ds[0, 0] += 0.2
    np.save(t / "not_ds.npy", not_ds)
    (t / "binary.toml").write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))
                                    + b"\xff\xfe\x00")
    (t / "invalid.toml").write_text("lr = = 3\n[base\n")
    (t / "unknown_key.toml").write_text("learning_rate = 0.1\n")
    (t / "wrong_type.toml").write_text('lr = "fast"\n')
    (t / "topkey.toml").write_text('[base]\ndataset = "synthetic"\n[grdi]\nalgo = ["csgd"]\n')
    (t / "emptygrid.toml").write_text('[base]\ndataset = "synthetic"\n[grid]\n')
    (t / "notlist.toml").write_text('[base]\ndataset = "synthetic"\n[grid]\nalgo = "csgd"\n')
    (t / "tiny.toml").write_text(
        '[base]\ndataset = "synthetic"\nmodel = "mlp"\nworkers = 2\nbatch = 8\nsteps = 5\neval_every = 1000\n'
        'hessian = false\n[grid]\nalgo = ["csgd", "dsgd"]\n')
    big = {  # 5^8 = 390625 configurations, every one valid on its own
        "lr": [0.01, 0.02, 0.03, 0.04, 0.05], "warmup": [0, 1, 2, 3, 4], "batch": [1, 2, 3, 4, 5],
        "eval_every": [1000, 1001, 1002, 1003, 1004], "eval_train_samples": [100, 101, 102, 103, 104],
        "hessian_samples": [10, 11, 12, 13, 14], "weight_decay": [0.0, 1e-4, 2e-4, 3e-4, 4e-4],
        "momentum": [0.5, 0.6, 0.7, 0.8, 0.9],
    }
    (t / "big.toml").write_text(
        '[base]\ndataset = "synthetic"\nmodel = "mlp"\nworkers = 2\nsteps = 5\nhessian = false\n[grid]\n'
        + "".join(f"{k} = {v!r}\n" for k, v in big.items()))


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished results folder: two seeds of a tiny D-SGD run (what bad input must never damage)."""
    root = tmp_path_factory.mktemp("finished") / "results"
    res = cli("run", "--dataset", "synthetic", "--batch", "8", "--steps", "5", "--eval-every", "1000",
              "--workers", "2", "--seeds", "0,1", "--results", root)
    assert res.exit_code == 0, f"exit {res.exit_code}\n{res.output}\n{res.exc_info}"
    assert len(list(root.rglob("summary.json"))) == 2
    return root


@pytest.fixture
def time_limit():
    """Fail (rather than hang) a case that runs away: SIGALRM raises inside the command."""

    def alarm(signum, frame):
        raise TimeoutError(f"case still running after {CASE_TIMEOUT_S} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(CASE_TIMEOUT_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def invoke_isolated(*args) -> SimpleNamespace:
    """The real CLI in a subprocess: a case that should answer at once but builds 10^8 seeds or 390625
    configurations is killed after FAST_TIMEOUT_S without taking the test process with it. (A fork of
    the test process would not do: torch's thread pools, started by the fixtures, deadlock in a forked
    child.) The child's address space is capped at FAST_MEMORY above what importing the CLI takes."""
    import subprocess
    import sys

    def cap():
        resource.setrlimit(resource.RLIMIT_DATA, (FAST_MEMORY + (2 << 30), resource.getrlimit(resource.RLIMIT_DATA)[1]))

    root = Path(__file__).resolve().parent.parent
    try:
        p = subprocess.run([sys.executable, str(root / "dsgdbench.py"), *map(str, args)], capture_output=True,
                           text=True, timeout=FAST_TIMEOUT_S, cwd=root, preexec_fn=cap,
                           env=dict(os.environ, COLUMNS="250", OMP_NUM_THREADS="1"))
    except subprocess.TimeoutExpired:
        return SimpleNamespace(exit_code=None, output="", stderr="", where="",
                               exception=TimeoutError(f"still running after {FAST_TIMEOUT_S} s (killed)"))
    return SimpleNamespace(exit_code=p.returncode, output=p.stdout + p.stderr, stderr=p.stderr, where="",
                           exception=None)


# ----------------------------------------------------------------------------------------------
# the matrix


def test_matrix_is_large_enough():
    assert len(CASES) >= 70
    assert {a[0] for a, _ in CASES.values()} >= {"run", "suite", "compare", "plot", "topology", "list", "speed",
                                                  "landscape"}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, finished, tmp_path, time_limit):
    argv, needles = CASES[case]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    _inputs(scratch)
    argv = [a.replace(R, str(finished)).replace(T, str(scratch)) for a in argv]
    before, before_scratch = snapshot(finished), snapshot(scratch)

    t0 = time.perf_counter()
    res = invoke_isolated(*argv) if case in FAST else invoke(*argv)
    elapsed = time.perf_counter() - t0

    problems = []  # every check, so that a failing case reports all that is wrong with it
    try:
        line = assert_user_error(res, *needles, redact={str(scratch): T, str(finished): R})
        if case == "suite-grid-huge":  # names the count (needle) and the explicit override that allows it
            assert re.search(r"(?<![\w-])--[a-z][a-z-]+", line), f"no override option named in {line!r}"
    except AssertionError as e:
        problems.append("user-error check: " + str(e).split("\nassert ")[0].strip())  # no rewrite noise
    if case in FAST and elapsed >= FAST_S:
        problems.append(f"took {elapsed:.1f} s (must answer in < {FAST_S:g} s)")
    if snapshot(finished) != before:
        problems.append("the finished results folder changed")
    if snapshot(scratch) != before_scratch:
        problems.append("the command wrote into the scratch folder")
    assert not problems, "\n".join(problems)
