"""Runs that survive faults: kill -9 and resume bit-identically, one trainer per run, --force in a
fresh folder, the disk checked before training, failures recorded as results.

The kill tests start the real CLI in a subprocess, wait until it has written a checkpoint, kill
it with SIGKILL at whatever step it has reached, run the same command again, and compare the
final model and summary with an uninterrupted run of the same configuration.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from bench import results
from bench.config import RunConfig
from bench.errors import UserError
from bench.runner import collapse_thresholds, run

ROOT = Path(__file__).resolve().parent.parent
RUN = ["--dataset", "synthetic", "--model", "mlp", "--workers", "4", "--batch", "8", "--lr", "0.05",
       "--eval-every", "25", "--checkpoint-every", "10", "--no-hessian"]
TIMES = ("train_seconds", "eval_seconds", "wall_seconds", "machine_load", "resumed_from_step", "run_dir",
         "skipped", "hessian_seconds", "adaptive_hessian_seconds")


def cli(*args, env=None) -> subprocess.Popen:
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.Popen([sys.executable, str(ROOT / "dsgdbench.py"), *map(str, args)], cwd=ROOT, env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(p: subprocess.Popen, timeout: float = 240) -> str:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err[-3000:]
    return out


def only_run(root: Path) -> Path:
    (d,) = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return d


def kill_after_checkpoint(p: subprocess.Popen, root: Path, pattern: str = "*/checkpoint.r0.pt",
                          timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not any(root.glob(pattern)):
        assert p.poll() is None, f"finished before a checkpoint was written: {p.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()


def same_run(a: Path, b: Path) -> None:
    """The final model bit for bit, and every value of the summary but the clocks."""
    ma, mb = torch.load(a / "model.pt"), torch.load(b / "model.pt")
    assert ma.keys() == mb.keys()
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert {k: v for k, v in sa.items() if k not in TIMES} == {k: v for k, v in sb.items() if k not in TIMES}
    ra, rb = (results.load_metrics(str(d)).drop(columns="train_seconds") for d in (a, b))
    assert ra.equals(rb)


@pytest.mark.parametrize("algo", ["dsgd-ac", "choco", "diloco"])
def test_kill_and_resume_is_bit_identical(tmp_path, algo):
    """SIGKILL after the first checkpoint; the same command resumes and ends as an uninterrupted run."""
    args = ["run", "--algo", algo, "--steps", "150", *RUN]
    finish(cli(*args, "--results", tmp_path / "straight"))
    p = cli(*args, "--results", tmp_path / "killed")
    kill_after_checkpoint(p, tmp_path / "killed")
    d = only_run(tmp_path / "killed")
    assert not (d / "summary.json").exists()
    finish(cli(*args, "--results", tmp_path / "killed"))
    s = json.loads((d / "summary.json").read_text())
    assert s["status"] == "completed" and 10 <= s["resumed_from_step"] < 150
    assert not list(d.glob("checkpoint*")), "checkpoints are removed once the run is finished"
    same_run(only_run(tmp_path / "straight"), d)


def test_distributed_kill_and_resume(tmp_path):
    """Two gloo ranks, killed (launcher and ranks) after both wrote a checkpoint; resumed on two ranks."""
    args = ["run", "--algo", "dsgd", "--steps", "150", "--procs", "2", *RUN]
    finish(cli(*args, "--results", tmp_path / "straight"))
    p = cli(*args, "--results", tmp_path / "killed")
    kill_after_checkpoint(p, tmp_path / "killed", "*/checkpoint.r1.pt")
    finish(cli(*args, "--results", tmp_path / "killed"))
    d = only_run(tmp_path / "killed")
    assert json.loads((d / "summary.json").read_text())["resumed_from_step"] >= 10
    same_run(only_run(tmp_path / "straight"), d)


def test_force_replaces_the_old_run_only_when_finished(tmp_path):
    args = ["run", "--algo", "dsgd", "--steps", "150", *RUN, "--results", tmp_path]
    finish(cli(*args))
    d = only_run(tmp_path)
    before = {f.name: f.read_bytes() for f in d.iterdir()}
    p = cli(*args, "--force")
    kill_after_checkpoint(p, tmp_path, ".*.rerun/checkpoint.r0.pt")
    assert {f.name: f.read_bytes() for f in d.iterdir()} == before  # the finished run is untouched
    finish(cli(*args, "--force"))
    assert not list(tmp_path.glob(".*.rerun"))
    assert json.loads((d / "summary.json").read_text())["status"] == "completed"


SUITE = """
name = "twice"
seeds = [0, 1]
results = "{root}"
[base]
dataset = "synthetic"
model = "mlp"
workers = 4
batch = 8
steps = 60
hessian = false
[grid]
algo = ["csgd", "dsgd", "dsgd-ac"]
"""


def test_two_suites_train_each_run_once(tmp_path):
    """Two processes on one results folder: every run is trained by exactly one of them."""
    f = tmp_path / "twice.toml"
    f.write_text(SUITE.format(root=(tmp_path / "res").as_posix()))
    outs = [finish(p) for p in [cli("suite", f), cli("suite", f)]]
    trained = [ln for out in outs for ln in out.splitlines() if ln.startswith("[") and "skipped" not in ln]
    assert len(trained) == 6, "\n".join(outs)
    runs = [d for d in (tmp_path / "res").iterdir() if d.is_dir() and not d.name.startswith(".")]
    assert len(runs) == 6 and all((d / "summary.json").exists() for d in runs)


def test_lock_is_taken_over_from_a_dead_process(tmp_path):
    """flock dies with its process: a lock file left by a killed trainer does not block."""
    code = textwrap.dedent(f"""
        from bench.results import RunLock
        import os, time
        RunLock({str(tmp_path)!r}, "r").acquire()
        print("locked", flush=True)
        time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    lock = results.RunLock(tmp_path, "r")
    assert not lock.acquire(wait=False) and str(p.pid) in lock.holder()
    p.kill()
    p.wait()
    assert lock.acquire(wait=False)
    lock.release(remove=True)
    assert not lock.path.exists()


def test_full_disk_is_one_line_before_training(tmp_path, monkeypatch):
    import shutil

    class Usage:
        free = 1000

    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage)
    cfg = RunConfig(dataset="synthetic", model="mlp", workers=2, batch=8, steps=5, hessian=False,
                    results=str(tmp_path))
    with pytest.raises(UserError, match="MB free") as e:
        run(cfg)
    assert "\n" not in str(e.value)
    assert not any((tmp_path / p).exists() for p in os.listdir(tmp_path) if not p.startswith("."))


def test_collapse_rule_thresholds():
    """Entropy and chance of the labels, by hand: 3 classes with frequencies 1/2, 1/4, 1/4 of 400."""
    y = torch.tensor([0] * 200 + [1] * 100 + [2] * 100)
    c = collapse_thresholds(y, 3)
    H = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert c["label_entropy"] == pytest.approx(H, rel=1e-12) and c["chance"] == 0.5
    assert c["loss_threshold"] == pytest.approx(H - 0.05)
    assert c["acc_threshold"] == pytest.approx(100 * (0.5 + 3 * (0.25 / 400) ** 0.5))


def test_collapse_is_a_recorded_result(tmp_path):
    """lr 0 never leaves chance: the run stops after two collapsed evaluations past the warmup."""
    cfg = RunConfig(algo="csgd", dataset="synthetic", model="mlp", workers=2, batch=8, steps=100, eval_every=10,
                    lr=1e-12, hessian=False, results=str(tmp_path))
    s = run(cfg)
    assert s["status"] == "collapsed" and s["collapsed_step"] == 20 and s["steps_done"] == 20
    assert s["collapse_rule"]["loss_threshold"] > 1.0 and s["test_acc"] is not None
    s2 = run(cfg.replace(stop_on_collapse=False, results=str(tmp_path / "b")))
    assert s2["status"] == "collapsed" and s2["steps_done"] == 100  # the final evaluation decides
    ok = run(cfg.replace(lr=0.1, results=str(tmp_path / "c")))
    assert ok["status"] == "completed"


@pytest.mark.parametrize("mode", ["kill", "hang"])
def test_dead_or_hung_rank_is_one_line(tmp_path, mode):
    """A rank killed by SIGKILL, or hung, at step 15 of 2 processes: one error line (which rank, how), a non-zero
    exit, within the timeout; the checkpoint of step 10 stays for the rerun."""
    plugins = f"{ROOT / 'tests' / 'plugins' / 'signum.py'},{ROOT / 'tests' / 'plugins' / 'crash.py'}"
    t0 = time.monotonic()
    p = cli("run", "--algo", "test-crash", "--steps", "40", *RUN, "--procs", "2", "--crash-step", "15",
            "--crash-mode", mode, "--dist-timeout", "10", "--results", tmp_path, env={"DSGDBENCH_PLUGINS": plugins})
    out, err = p.communicate(timeout=120)
    elapsed = time.monotonic() - t0
    assert p.returncode == 1, err[-2000:]
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: rank "), err[-2000:]
    assert ("SIGKILL" in lines[0]) if mode == "kill" else ("rank" in lines[0] and "--dist-timeout 10" in lines[0])
    assert "Traceback" not in err
    assert elapsed < 60 if mode == "kill" else elapsed < 10 + 50  # startup + the 10 s timeout + teardown
    assert list(tmp_path.glob("*/checkpoint.r0.pt"))
