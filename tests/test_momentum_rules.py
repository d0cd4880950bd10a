"""Momentum methods that survive gossip: QG-DSGDm (algorithms/qg.py) and DecentLaM (algorithms/decentlam.py).

The update rules against formulas written here in float64 (gradients from an ordinary backward of a
float64 copy of the model, W(t) from Topology.weights), the equivalences they reduce to (momentum 0:
ATC D-SGD; the complete graph: C-SGD), the bytes they send, runs through bench.runner.run and the CLI's
one-line errors when they are paired with an optimizer whose momentum they cannot apply.
"""

import copy
import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import topologies
from algorithms import RULES
from bench.errors import UserError
from bench.models import build_model
from bench.runner import run
from bench.workers import ParamLayout
from helpers import component
from test_algorithms import cosine, do_step, grads64, make_trainer, perturb_rows, run_steps

# Every run here is in float64 (precision "fp64"), and so is every reference. Error budget: float64's
# unit roundoff is 1.1e-16; a run of <= 20 steps amplifies rounding at most ~1e3-fold, and the divisions
# by lr of both rules (QG's (x - x_next)/lr, DecentLaM's (x - W psi)/lr) are undone by the next
# multiplication by lr (cosine lr >= 0.6% of its peak here), so correct code agrees to ~1e-13 relative.
# 1e-9 leaves a 1e4 margin, while a constant wrong by 1e-6 relative (the momentum, QG's beta) moves the
# parameters by more than the tolerance (test_tolerance_catches_a_wrong_constant).
EQ = dict(rtol=1e-9, atol=1e-12)
WD = 5e-4


@pytest.fixture
def tiny_cfg(tiny_cfg):
    """conftest's tiny configuration, in float64 (see EQ)."""
    return tiny_cfg.replace(precision="fp64")


# ----------------------------------------------------------------------------------------------
# references, in float64


def trajectory_inputs(cfg, data, topology: str, n: int):
    """A trainer with perturbed rows, its starting X, and the batches, lrs and W(t) of every step."""
    tr = make_trainer(cfg, data)
    X0 = perturb_rows(tr)
    topo = topologies.get_topology(topology, n)
    T = cfg.steps
    batches = [tr.batch(t) for t in range(T)]
    lrs = [cosine(t, cfg.lr, T) for t in range(T)]
    Ws = [torch.from_numpy(topo.weights(t)) for t in range(T)]
    return tr, X0, batches, lrs, Ws


def qg_reference(module, X, batches, lrs, Ws, mu, beta, nesterov):
    """QG-DSGDm: m = mu mhat + h, d = m or h + mu m, x' = W (x - lr d), mhat = (1-beta) mhat + beta (x - x')/lr."""
    mhat, out = torch.zeros_like(X), []
    for (x, y), lr, W in zip(batches, lrs, Ws):
        h = grads64(module, X, x, y) + WD * X
        m = mu * mhat + h
        d = h + mu * m if nesterov else m
        X_next = W @ (X - lr * d)
        mhat = (1 - beta) * mhat + beta * (X - X_next) / lr
        X = X_next
        out.append(X)
    return out, mhat


def decentlam_reference(module, X, batches, lrs, Ws, beta):
    """DecentLaM in its second form: x' = W (x - lr h) - lr beta m, then m = (x - x')/lr (m^0 = 0)."""
    m, out = torch.zeros_like(X), []
    for (x, y), lr, W in zip(batches, lrs, Ws):
        h = grads64(module, X, x, y) + WD * X
        X_next = W @ (X - lr * h) - lr * beta * m
        m = (X - X_next) / lr
        X = X_next
        out.append(X)
    return out, m


# ----------------------------------------------------------------------------------------------
# the update rules


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("topology,n", [("ring", 5), ("one-peer-exp", 4)])
def test_qg_steps_match_formula(tiny_cfg, synthetic, topology, n, nesterov):
    T, mu, beta = 4, 0.9, 0.1
    cfg = tiny_cfg.replace(algo="qg-dsgdm", topology=topology, workers=n, steps=T, schedule="cosine",
                           nesterov=nesterov)
    assert cfg.param("qg_beta") == beta and cfg.param("momentum") == mu
    tr, X0, batches, lrs, Ws = trajectory_inputs(cfg, synthetic, topology, n)
    ref, mhat = qg_reference(tr.workers.module, X0, batches, lrs, Ws, mu, beta, nesterov)
    for t in range(T):  # every step, the first included (mhat = 0: x^1 = W (x^0 - lr h^0))
        do_step(tr, t)
        torch.testing.assert_close(tr.workers.X, ref[t], **EQ)
    torch.testing.assert_close(tr.algo.rule.mhat, mhat, **EQ)
    assert tr.algo.optimizer.m is None  # SGD's own momentum buffer is not used
    assert (ref[-1][0] - ref[-1][1]).abs().max() > 1e-4  # the workers disagree: mixing did something


def test_qg_preset_is_nesterov():
    from bench.config import RunConfig

    cfg = RunConfig(algo="qg-dsgdm")
    assert cfg.param("sgd.nesterov") is True and cfg.param("qg.qg_beta") == 0.1 and cfg.param("momentum") == 0.9


@pytest.mark.parametrize("topology,n", [("ring", 5), ("one-peer-exp", 4)])
def test_decentlam_steps_match_formula(tiny_cfg, synthetic, topology, n):
    T, beta = 4, 0.9
    cfg = tiny_cfg.replace(algo="decentlam", topology=topology, workers=n, steps=T, schedule="cosine")
    tr, X0, batches, lrs, Ws = trajectory_inputs(cfg, synthetic, topology, n)
    ref, m = decentlam_reference(tr.workers.module, X0, batches, lrs, Ws, beta)
    for t in range(T):
        do_step(tr, t)
        torch.testing.assert_close(tr.workers.X, ref[t], **EQ)
    torch.testing.assert_close(tr.algo.rule.m, m, **EQ)
    assert tr.algo.optimizer.m is None


@pytest.mark.parametrize("algo,wrong", [("qg-dsgdm", dict(qg_beta=0.1 * (1 + 1e-6))),
                                        ("qg-dsgdm", dict(momentum=0.9 * (1 + 1e-6))),
                                        ("decentlam", dict(momentum=0.9 * (1 + 1e-6)))])
def test_tolerance_catches_a_wrong_constant(tiny_cfg, synthetic, algo, wrong):
    """The formula tests above fail on a rule whose constant is off by 1e-6 relative."""
    T, n = 4, 5
    cfg = tiny_cfg.replace(algo=algo, topology="ring", workers=n, steps=T, schedule="cosine")
    _, X0, batches, lrs, Ws = trajectory_inputs(cfg, synthetic, "ring", n)
    tr = make_trainer(cfg.replace(**wrong), synthetic)
    perturb_rows(tr)
    if algo == "qg-dsgdm":
        ref, _ = qg_reference(tr.workers.module, X0, batches, lrs, Ws, 0.9, 0.1, True)
    else:
        ref, _ = decentlam_reference(tr.workers.module, X0, batches, lrs, Ws, 0.9)
    for t in range(T):
        do_step(tr, t)
    err = float(((tr.workers.X - ref[-1]).abs() / (EQ["atol"] + EQ["rtol"] * ref[-1].abs())).max())
    assert err > 100, err  # measured: 2.7e3 (qg_beta) to 5.9e4 times the tolerance
    with pytest.raises(AssertionError):
        torch.testing.assert_close(tr.workers.X, ref[-1], **EQ)


# ----------------------------------------------------------------------------------------------
# equivalences


@pytest.mark.parametrize("nesterov", [False, True])
def test_qg_momentum_zero_equals_atc_dsgd(tiny_cfg, synthetic, nesterov):
    cfg = tiny_cfg.replace(topology="ring", workers=5, steps=10, schedule="cosine", nesterov=nesterov)
    X_d = run_steps(cfg.replace(algo="dsgd", order="atc", momentum=0.0), synthetic)
    X_q = run_steps(cfg.replace(algo="qg-dsgdm", momentum=0.0), synthetic)
    torch.testing.assert_close(X_q, X_d, **EQ)
    X_q9 = run_steps(cfg.replace(algo="qg-dsgdm"), synthetic)  # with momentum it is another method
    assert (X_q9 - X_d).abs().max() > 1e-4


def test_decentlam_momentum_zero_equals_atc_dsgd(tiny_cfg, synthetic):
    cfg = tiny_cfg.replace(topology="ring", workers=5, steps=10, schedule="cosine")
    X_d = run_steps(cfg.replace(algo="dsgd", order="atc", momentum=0.0), synthetic)
    X_l = run_steps(cfg.replace(algo="decentlam", momentum=0.0), synthetic)
    torch.testing.assert_close(X_l, X_d, **EQ)
    X_l9 = run_steps(cfg.replace(algo="decentlam"), synthetic)
    assert (X_l9 - X_d).abs().max() > 1e-4


def test_decentlam_on_complete_equals_csgd(tiny_cfg, synthetic):
    """W = J and identical workers: gt = mean h, m = beta m + mean h (first m = mean h), x <- x - lr m:
    C-SGD with torch heavy-ball momentum (torch's first buffer is g, the same)."""
    cfg = tiny_cfg.replace(schedule="cosine", steps=12)
    X_c = run_steps(cfg.replace(algo="csgd"), synthetic)
    X_l = run_steps(cfg.replace(algo="decentlam", topology="complete"), synthetic)
    torch.testing.assert_close(X_l, X_c, **EQ)
    torch.testing.assert_close(X_l, X_l[:1].expand_as(X_l), rtol=0, atol=1e-12)
    # on a ring it is not C-SGD
    assert (run_steps(cfg.replace(algo="decentlam", topology="ring"), synthetic) - X_c).abs().max() > 1e-4


def test_qg_beta_one_on_complete_equals_csgd(tiny_cfg, synthetic):
    """W = J, identical workers, heavy ball: mhat' = (1 - beta) mhat + beta d with d = mu mhat + mean h.
    With beta = 1, mhat' = d, so d' = mu d + h': torch heavy ball (first d = h, as torch). Nesterov has
    no such reduction (mhat' = h + mu m, not m), and neither has beta < 1 (test below)."""
    cfg = tiny_cfg.replace(schedule="cosine", steps=12)
    X_c = run_steps(cfg.replace(algo="csgd"), synthetic)
    X_q = run_steps(cfg.replace(algo="qg-dsgdm", topology="complete", nesterov=False, qg_beta=1.0), synthetic)
    torch.testing.assert_close(X_q, X_c, **EQ)
    torch.testing.assert_close(X_q, X_q[:1].expand_as(X_q), rtol=0, atol=1e-12)
    X_cn = run_steps(cfg.replace(algo="csgd", nesterov=True), synthetic)
    X_qn = run_steps(cfg.replace(algo="qg-dsgdm", topology="complete", qg_beta=1.0), synthetic)
    assert (X_qn - X_cn).abs().max() > 1e-5


def test_qg_on_complete_is_qhm(tiny_cfg, synthetic):
    """W = J, heavy ball, any beta: one model with d = h + mu/(1 - mu) e, then e <- a e + (1 - a) h,
    a = 1 - beta (1 - mu), e^0 = 0 (e = (1 - mu) mhat). That is quasi-hyperbolic momentum (QHM: buffer
    decay a, nu = mu / a, lr / (1 - mu)), not torch's heavy ball unless beta = 1."""
    T, mu, beta = 8, 0.9, 0.1
    cfg = tiny_cfg.replace(algo="qg-dsgdm", topology="complete", nesterov=False, steps=T, schedule="cosine")
    tr = make_trainer(cfg, synthetic)
    x = tr.workers.X[0].clone()
    assert torch.equal(tr.workers.X, x.expand_as(tr.workers.X))
    a, e = 1 - beta * (1 - mu), torch.zeros_like(x)
    for t in range(T):
        xb, yb = tr.batch(t)
        h = grads64(tr.workers.module, x.expand(cfg.workers, -1), xb, yb).mean(0) + WD * x
        x = x - cosine(t, cfg.lr, T) * (h + mu / (1 - mu) * e)
        e = a * e + (1 - a) * h
        do_step(tr, t)
    torch.testing.assert_close(tr.workers.X, x.expand_as(tr.workers.X), **EQ)


# ----------------------------------------------------------------------------------------------
# state, communication, runs


@pytest.mark.parametrize("algo", ["qg-dsgdm", "decentlam"])
def test_state_dict_resumes_exactly(tiny_cfg, synthetic, algo):
    """state_keys hold all that changes: a run restarted from the state after step 3 ends where one run does."""
    cfg = tiny_cfg.replace(algo=algo, topology="ring", workers=4, steps=6, schedule="cosine")
    whole = make_trainer(cfg, synthetic)
    for t in range(6):
        do_step(whole, t)
    first = make_trainer(cfg, synthetic)
    for t in range(3):
        do_step(first, t)
    state, X = copy.deepcopy(first.algo.state_dict()), first.workers.X.clone()
    second = make_trainer(cfg, synthetic)
    second.algo.load_state_dict(state)
    second.workers.X = X
    for t in range(3, 6):
        do_step(second, t)
    torch.testing.assert_close(second.workers.X, whole.workers.X, rtol=0, atol=0)


@pytest.mark.parametrize("algo", ["qg-dsgdm", "decentlam"])
@pytest.mark.parametrize("topology,n", [("ring", 5), ("one-peer-exp", 8), ("star", 4), ("torus", 9)])
def test_bytes_per_step(tiny_cfg, algo, topology, n):
    """One model-sized message per neighbour per step: the off-diagonal nonzeros of W(t), averaged over
    workers and one period."""
    topo = topologies.get_topology(topology, n)
    layout = ParamLayout(build_model("mlp", (1, 16), 4))
    rule = component(tiny_cfg.replace(algo=algo), "comm", layout=layout, n_local=n, topology=topo)
    d = layout.d
    sends = np.mean([((topo.weights(t) != 0) & ~np.eye(n, dtype=bool)).sum() / n for t in range(topo.period)])
    assert rule.bytes_per_step(n, topo, d, 4) == pytest.approx(sends * d * 4, rel=1e-12)
    assert rule.bytes_per_step(n, topo, d, 8) == pytest.approx(sends * d * 8, rel=1e-12)
    if topology == "ring":
        assert rule.bytes_per_step(n, topo, d, 4) == 2 * d * 4
    if topology == "one-peer-exp":
        assert rule.bytes_per_step(n, topo, d, 4) == d * 4


@pytest.mark.parametrize("algo", ["qg-dsgdm", "decentlam"])
def test_preset_runs_through_the_runner(tiny_cfg, tmp_path, algo):
    cfg = tiny_cfg.replace(algo=algo, topology="ring", workers=4, steps=5, eval_every=1, precision="fp32",
                           schedule="cosine")
    s = run(cfg, force=True)
    run_dir = tmp_path / "results" / s["run_id"]
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["status"] == "completed" and on_disk["algo"] == algo and on_disk["steps"] == 5
    for k in ("test_acc", "train_loss", "consensus_distance"):
        assert math.isfinite(on_disk[k])
    assert on_disk["consensus_distance"] > 0  # decentralized: the workers differ
    assert on_disk["bytes_per_step"] == 2 * on_disk["params"] * 4  # ring: 2 neighbours, float32
    assert (run_dir / "metrics.csv").read_text().count("\n") == 1 + 5


# ----------------------------------------------------------------------------------------------
# the optimizer they need


def _cli(*args):
    from dsgdbench import app

    return CliRunner(env={"COLUMNS": "250"}).invoke(app, [str(a) for a in args])


def _one_line_error(res) -> str:
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert res.exit_code == 2, f"exit {res.exit_code}\n{res.output}"
    assert "Traceback" not in res.output
    try:
        err = res.stderr
    except ValueError:  # click < 8.2: stderr mixed into output
        err = res.output
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    return lines[0]


@pytest.mark.parametrize("args,needles", [
    (["--algo", "qg-dsgdm", "--opt", "lamb"], ("qg", "--opt sgd")),
    (["--algo", "decentlam", "--opt", "lamb"], ("decentlam", "--opt sgd")),
    (["--algo", "decentlam", "--nesterov"], ("decentlam", "nesterov")),
    (["--algo", "qg-dsgdm", "--qg-beta", "1.5"], ("--qg-beta", "[0, 1]")),
])
def test_cli_refuses_in_one_line(tmp_path, args, needles):
    res = _cli("run", "--dataset", "synthetic", "--batch", "8", "--steps", "5", *args,
               "--results", tmp_path / "results")
    line = _one_line_error(res)
    for s in needles:
        assert s.lower() in line.lower(), (s, line)
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").rglob("summary.json"))


@pytest.mark.parametrize("rule", ["qg", "decentlam"])
def test_check_run_wants_sgd(rule):
    """LAMB already fails the generic `needs` check (no decayed()); check_run also refuses any other
    optimizer that has decayed() but not SGD's momentum."""
    cls = RULES.get(rule)
    with pytest.raises(UserError, match="--opt sgd"):
        cls.check_run({"lamb.eps": 1e-6, "lamb.weight_decay": 0.0})
    cls.check_run({"sgd.momentum": 0.9, "sgd.nesterov": rule == "qg"})  # accepted
