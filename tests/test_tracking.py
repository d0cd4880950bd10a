"""Gradient tracking (DSGT) and D^2 / Exact Diffusion: exact updates, equivalences, costs, runs.

The references are written here in float64 from the formulas in the docstrings of
algorithms/dsgt.py and algorithms/d2.py: gradients from grads64 (an ordinary backward of a
float64 copy of the module), mixing matrices from Topology.weights(t). The tolerance EQ and the
helpers come from tests/test_algorithms.py (EQ's error budget is justified there; each formula
test below also shows that a constant wrong by 1e-6 relative breaks it).
"""

import copy
import json

import numpy as np
import pytest
import torch

import topologies
from algorithms import RULES
from bench.config import RunConfig
from bench.errors import UserError
from bench.models import build_model
from bench.runner import run
from bench.workers import ParamLayout
from helpers import component
from test_algorithms import EQ, cosine, do_step, grads64, make_trainer, perturb_rows, run_steps

WD = 0.05  # large enough that folding it into the tracked gradient matters at EQ


@pytest.fixture
def tiny_cfg(tiny_cfg):
    """conftest's tiny configuration in float64 (see EQ)."""
    return tiny_cfg.replace(precision="fp64")


def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when a and b are NOT equal within EQ (what a wrong rule must produce)."""
    try:
        torch.testing.assert_close(a, b, **EQ)
    except AssertionError:
        return True
    return False


# ----------------------------------------------------------------------------------------------
# DSGT


def dsgt_reference(tr, X, topo, T, lr_at, mu, nesterov, order, wd=WD):
    """The DSGT recursion in float64; yields (X^{t+1}, y^t, h^t) after each step t."""
    y = wy = h_prev = m = None
    for t in range(T):
        x, yb = tr.batch(t)
        h = grads64(tr.workers.module, X, x, yb) + wd * X
        y = h.clone() if y is None else wy + h - h_prev
        W = torch.from_numpy(topo.weights(t))
        wy, h_prev = W @ y, h
        g = y if order == "cta" else wy
        if mu:
            m = g.clone() if m is None else mu * m + g
            g = g + mu * m if nesterov else m
        X = W @ X - lr_at(t) * g
        yield X, y, h


@pytest.mark.parametrize("order", ["cta", "atc"])
@pytest.mark.parametrize("mu,nesterov", [(0.9, False), (0.0, False), (0.9, True)])
@pytest.mark.parametrize("topology,n", [("ring", 5), ("one-peer-exp", 4)])
def test_dsgt_steps_match_formula(tiny_cfg, synthetic, topology, n, mu, nesterov, order):
    """y^0 = h^0, y^t = W y^{t-1} + h^t - h^{t-1}, x^{t+1} = W x^t - lr_t SGDm(y^t or W y^t), h = g + wd x."""
    T = 4
    cfg = tiny_cfg.replace(algo="dsgt", topology=topology, workers=n, steps=T, schedule="cosine", momentum=mu,
                           nesterov=nesterov, weight_decay=WD, order=order)
    tr = make_trainer(cfg, synthetic)
    X0 = perturb_rows(tr)
    topo = topologies.get_topology(topology, n)
    lr_at = lambda t: cosine(t, cfg.lr, T)  # noqa: E731
    for t, (X, y, h) in enumerate(dsgt_reference(tr, X0, topo, T, lr_at, mu, nesterov, order)):
        do_step(tr, t)
        torch.testing.assert_close(tr.workers.X, X, **EQ)
        torch.testing.assert_close(tr.algo.rule.y, y, **EQ)
        # tracking: mixing keeps the mean, so mean y^t = mean h^t
        torch.testing.assert_close(y.mean(0), h.mean(0), **EQ)
    assert (tr.workers.X[0] - tr.workers.X[1]).abs().max() > 1e-5  # the workers disagree: mixing mattered


def test_dsgt_tolerance_catches_a_wrong_rule(tiny_cfg, synthetic):
    """The formula test fails on a rule wrong by 1e-6 relative: the lr, the weight decay, the tracker's
    correction h^t - h^{t-1}, or the order (cta / atc)."""
    T, n = 4, 5
    cfg = tiny_cfg.replace(algo="dsgt", topology="ring", workers=n, steps=T, schedule="cosine", weight_decay=WD)
    tr = make_trainer(cfg, synthetic)
    X0 = perturb_rows(tr)
    for t in range(T):
        do_step(tr, t)
    topo = topologies.get_topology("ring", n)
    lr_at = lambda t: cosine(t, cfg.lr, T)  # noqa: E731

    def final(**kw):
        args = dict(lr_at=lr_at, mu=0.9, nesterov=False, order="cta", wd=WD) | kw
        return list(dsgt_reference(tr, X0, topo, T, **args))[-1][0]

    torch.testing.assert_close(tr.workers.X, final(), **EQ)
    assert differs(tr.workers.X, final(lr_at=lambda t: lr_at(t) * (1 + 1e-6)))
    assert differs(tr.workers.X, final(wd=WD * (1 + 1e-6)))
    assert differs(tr.workers.X, final(order="atc"))


@pytest.mark.parametrize("mu,nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_dsgt_atc_on_complete_equals_csgd(tiny_cfg, synthetic, mu, nesterov):
    """W = J: W y^t = mean h^t on every worker (tracking), so x^{t+1} = mean x^t - lr SGDm(mean h^t): C-SGD.

    The default order (cta, epfml's code) feeds the un-mixed y^t = h^t + mean h^{t-1} - h^{t-1} to the
    momentum: on the complete graph the workers differ, and it is not C-SGD.
    """
    cfg = tiny_cfg.replace(topology="complete", schedule="cosine", steps=8, momentum=mu, nesterov=nesterov,
                           weight_decay=WD)
    X_c = run_steps(cfg.replace(algo="csgd"), synthetic)
    X_t = run_steps(cfg.replace(algo="dsgt", order="atc"), synthetic)
    torch.testing.assert_close(X_t, X_c, **EQ)
    torch.testing.assert_close(X_t, X_t[:1].expand_as(X_t), rtol=0, atol=1e-12)  # one model
    X_cta = run_steps(cfg.replace(algo="dsgt", order="cta"), synthetic)
    assert (X_cta - X_c).abs().max() > 1e-5
    assert (X_cta[0] - X_cta[1]).abs().max() > 1e-5


# ----------------------------------------------------------------------------------------------
# D^2 and Exact Diffusion


def d2_reference(tr, X, M_at, T, lr_at, lr_form, wd=WD):
    """x^{1/2} = x^0 - lr_0 h^0; later the lr_form's step; x^{t+1} = M(t) x^{t+1/2}. Yields X^{t+1}."""
    X_prev = h_prev = None
    for t in range(T):
        x, yb = tr.batch(t)
        h = grads64(tr.workers.module, X, x, yb) + wd * X
        lr = lr_at(t)
        if t == 0:
            Z = X - lr * h
        elif lr_form == "current":  # epfml decentralized_d2
            Z = 2 * X - X_prev - lr * (h - h_prev)
        elif lr_form == "previous":  # Exact Diffusion's psi form: psi^t = x^{t-1} - lr_{t-1} h^{t-1}
            psi, psi_prev = X - lr * h, X_prev - lr_at(t - 1) * h_prev
            Z = psi + X - psi_prev
        else:  # epfml decentralized_d2_v1: p = (x^{t-1} - x^t) / lr_{t-1}
            Z = X - lr * ((X_prev - X) / lr_at(t - 1) + h - h_prev)
        X_prev, h_prev = X, h
        X = M_at(t) @ Z
        yield X


def mixing(rule: str, topo):
    """M(t) = W(t) for d2, (I + W(t)) / 2 for exact diffusion."""
    I = torch.eye(topo.n, dtype=torch.float64)  # noqa: E741
    W = lambda t: torch.from_numpy(topo.weights(t))  # noqa: E731
    return W if rule == "d2" else (lambda t: (I + W(t)) / 2)


@pytest.mark.parametrize("lr_form", ["current", "previous", "ratio"])
@pytest.mark.parametrize("rule", ["d2", "exact-diffusion"])
@pytest.mark.parametrize("topology,n", [("ring", 5), ("one-peer-exp", 4)])
def test_d2_steps_match_formula(tiny_cfg, synthetic, rule, lr_form, topology, n):
    """First step x^1 = M(x^0 - lr_0 h^0), then the D^2 step; cosine lr; momentum 0 (the presets')."""
    T = 4
    cfg = tiny_cfg.replace(algo=rule, topology=topology, workers=n, steps=T, schedule="cosine", momentum=0.0,
                           weight_decay=WD, lr_form=lr_form)
    cfg.validate()
    tr = make_trainer(cfg, synthetic)
    X0 = perturb_rows(tr)
    topo = topologies.get_topology(topology, n)
    lr_at = lambda t: cosine(t, cfg.lr, T)  # noqa: E731
    for t, X in enumerate(d2_reference(tr, X0, mixing(rule, topo), T, lr_at, lr_form)):
        do_step(tr, t)
        torch.testing.assert_close(tr.workers.X, X, **EQ)
    assert (tr.workers.X[0] - tr.workers.X[1]).abs().max() > 1e-5


def test_d2_tolerance_catches_a_wrong_rule(tiny_cfg, synthetic):
    """The formula test fails on a rule wrong by 1e-6 relative, and tells the lr conventions and the
    two mixing matrices apart (all differ from the run by more than EQ under a cosine lr)."""
    T, n = 4, 5
    cfg = tiny_cfg.replace(algo="d2", topology="ring", workers=n, steps=T, schedule="cosine", momentum=0.0,
                           weight_decay=WD)
    tr = make_trainer(cfg, synthetic)
    X0 = perturb_rows(tr)
    for t in range(T):
        do_step(tr, t)
    topo = topologies.get_topology("ring", n)
    lr_at = lambda t: cosine(t, cfg.lr, T)  # noqa: E731

    def final(rule="d2", lr_at=lr_at, lr_form="current", wd=WD):
        return list(d2_reference(tr, X0, mixing(rule, topo), T, lr_at, lr_form, wd))[-1]

    torch.testing.assert_close(tr.workers.X, final(), **EQ)
    assert differs(tr.workers.X, final(lr_at=lambda t: lr_at(t) * (1 + 1e-6)))
    assert differs(tr.workers.X, final(wd=WD * (1 + 1e-6)))
    assert differs(tr.workers.X, final(lr_form="previous"))
    assert differs(tr.workers.X, final(lr_form="ratio"))
    assert differs(tr.workers.X, final(rule="exact-diffusion"))


@pytest.mark.parametrize("rule", ["d2", "exact-diffusion"])
def test_d2_is_d2_not_gossip(tiny_cfg, synthetic, rule):
    """From the second step on the correction matters: D^2 differs from ATC D-SGD (same first step)."""
    cfg = tiny_cfg.replace(topology="ring", workers=5, steps=2, momentum=0.0)
    tr_d, tr_g = make_trainer(cfg.replace(algo=rule), synthetic), make_trainer(cfg.replace(algo="dsgd", order="atc"),
                                                                              synthetic)
    for tr in (tr_d, tr_g):
        perturb_rows(tr)
        do_step(tr, 0)
    if rule == "d2":  # first step: x^1 = W (x^0 - lr h^0), ATC D-SGD's step
        torch.testing.assert_close(tr_d.workers.X, tr_g.workers.X, **EQ)
    do_step(tr_d, 1)
    do_step(tr_g, 1)
    assert (tr_d.workers.X - tr_g.workers.X).abs().max() > 1e-6


def test_d2_on_complete_equals_csgd(tiny_cfg, synthetic):
    """W = J and an identical start: every x^t is one model, and the mean of D^2 obeys
    x^{t+1} - x^t = x^t - x^{t-1} - lr_t (h_bar^t - h_bar^{t-1}), x^1 - x^0 = -lr_0 h_bar^0, so
    x^{t+1} - x^t = -lr_t h_bar^t (C-SGD without momentum) when lr_{t-1} h_bar^{t-1} is what the
    step subtracts back: always for "previous" and "ratio", for "current" only at a constant lr."""
    base = tiny_cfg.replace(topology="complete", steps=8, momentum=0.0, weight_decay=WD)
    for schedule, forms in (("constant", ("current", "previous", "ratio")), ("cosine", ("previous", "ratio"))):
        cfg = base.replace(schedule=schedule)
        X_c = run_steps(cfg.replace(algo="csgd"), synthetic)
        for form in forms:
            X_d = run_steps(cfg.replace(algo="d2", lr_form=form), synthetic)
            torch.testing.assert_close(X_d, X_c, **EQ)
            torch.testing.assert_close(X_d, X_d[:1].expand_as(X_d), rtol=0, atol=1e-12)
    # epfml's "current" under a schedule: the mean carries sum_s (lr_{s+1} - lr_s) h_bar^s along
    cfg = base.replace(schedule="cosine")
    X_c = run_steps(cfg.replace(algo="csgd"), synthetic)
    assert (run_steps(cfg.replace(algo="d2"), synthetic) - X_c).abs().max() > 1e-5
    # Exact Diffusion on the complete graph mixes with (I + J)/2, not J: not C-SGD
    X_e = run_steps(base.replace(algo="exact-diffusion"), synthetic)
    assert (X_e - run_steps(base.replace(algo="csgd"), synthetic)).abs().max() > 1e-5


@pytest.mark.parametrize("lr_form", ["current", "previous"])
def test_exact_diffusion_equals_d2_over_lazy_matrix(tiny_cfg, synthetic, tmp_path, lr_form):
    """Exact Diffusion over W == D^2 over the file topology holding (I + W)/2 (Bluefog's use_Abar)."""
    n = 5
    W = topologies.get_topology("ring", n).weights(0)
    path = tmp_path / "half_ring.npy"
    np.save(path, (np.eye(n) + W) / 2)
    cfg = tiny_cfg.replace(workers=n, steps=8, schedule="cosine", momentum=0.0, weight_decay=WD, lr_form=lr_form)
    X_e = run_steps(cfg.replace(algo="exact-diffusion", topology="ring"), synthetic)
    X_d = run_steps(cfg.replace(algo="d2", topology=f"file:{path}"), synthetic)
    torch.testing.assert_close(X_d, X_e, **EQ)
    assert (run_steps(cfg.replace(algo="d2", topology="ring"), synthetic) - X_e).abs().max() > 1e-5


# ----------------------------------------------------------------------------------------------
# state, costs, runs, errors


@pytest.mark.parametrize("algo,kw", [("dsgt", {}), ("dsgt", {"order": "atc"}), ("d2", {"lr_form": "ratio"}),
                                     ("exact-diffusion", {"lr_form": "previous"})])
def test_state_dict_resumes_exactly(tiny_cfg, synthetic, algo, kw):
    """state_keys hold everything that changes: 3 steps, a fresh trainer loaded with the state, 3 more
    steps == 6 steps in one go."""
    cfg = tiny_cfg.replace(algo=algo, topology="ring", workers=5, steps=6, schedule="cosine", weight_decay=WD,
                           **({} if algo == "dsgt" else {"momentum": 0.0}), **kw)
    whole = run_steps(cfg, synthetic)
    tr = make_trainer(cfg, synthetic)
    for t in range(3):
        do_step(tr, t)
    state, X = copy.deepcopy(tr.algo.state_dict()), tr.workers.X.clone()
    tr2 = make_trainer(cfg, synthetic)
    tr2.algo.load_state_dict(state)
    tr2.workers.X = X
    for t in range(3, 6):
        do_step(tr2, t)
    torch.testing.assert_close(tr2.workers.X, whole, rtol=0, atol=0)


def messages_per_step(topo) -> float:
    """Model-sized messages one worker sends per step in plain gossip: nonzero off-diagonal entries of
    W(t) (column j: who receives x_j), averaged over workers and one period."""
    mats = [topo.weights(t) for t in range(topo.period)]
    return sum(int(((W != 0) & ~np.eye(topo.n, dtype=bool)).sum()) for W in mats) / (topo.n * len(mats))


@pytest.mark.parametrize("topology,n,msgs", [("ring", 5, 2.0), ("one-peer-exp", 8, 1.0), ("torus", 9, 4.0)])
def test_bytes_per_step(topology, n, msgs):
    """DSGT sends [x, y] (2 models) per neighbour, D^2 and Exact Diffusion x^{t+1/2} (1), as gossip."""
    topo = topologies.get_topology(topology, n)
    assert messages_per_step(topo) == msgs
    layout = ParamLayout(build_model("mlp", (1, 16), 4))
    d, es = layout.d, 4

    def rule(algo, **kw):
        return component(RunConfig(algo=algo, workers=n, **kw), "comm", layout=layout, n_local=n, topology=topo)

    gossip = rule("dsgd").bytes_per_step(n, topo, d, es)
    assert rule("dsgt").bytes_per_step(n, topo, d, es) == pytest.approx(2 * msgs * d * es) == 2 * gossip
    assert rule("dsgt", order="atc").bytes_per_step(n, topo, d, es) == pytest.approx(2 * msgs * d * es)
    for algo in ("d2", "exact-diffusion"):
        assert rule(algo).bytes_per_step(n, topo, d, es) == pytest.approx(msgs * d * es) == gossip


@pytest.mark.parametrize("algo", ["dsgt", "d2", "exact-diffusion"])
def test_preset_runs(tmp_path, algo):
    """Each preset through bench.runner.run (its own momentum: the presets' values, no user override)."""
    n = 4
    cfg = RunConfig(dataset="synthetic", model="mlp", algo=algo, topology="ring", workers=n, batch=8, steps=5,
                    lr=0.1, schedule="cosine", hessian=False, eval_every=1, device="cpu",
                    results=str(tmp_path / "results"))
    s = run(cfg, force=True)
    on_disk = json.loads((tmp_path / "results" / s["run_id"] / "summary.json").read_text())
    assert on_disk["status"] == "completed" and on_disk["steps"] == 5 and on_disk["algo"] == algo
    assert on_disk["test_acc"] is not None and on_disk["consensus_distance"] > 0
    msgs = 2.0 * (2 if algo == "dsgt" else 1)  # ring: 2 neighbours
    assert on_disk["bytes_per_step"] == pytest.approx(msgs * on_disk["params"] * 4)
    assert RunConfig(algo=algo).param("momentum") == (0.9 if algo == "dsgt" else 0.0)


@pytest.mark.parametrize("algo,needle", [("d2", "epfml's decentralized_d2"), ("exact-diffusion", "exact_diffusion")])
def test_momentum_rejected(algo, needle, tmp_path):
    """D^2 and Exact Diffusion apply no momentum: --momentum 0.9 is a one-line user error (exit 2)."""
    from typer.testing import CliRunner

    from dsgdbench import app

    with pytest.raises(UserError, match="applies no momentum"):
        RunConfig(algo=algo, momentum=0.9).validate()
    RunConfig(algo=algo, momentum=0.0).validate()
    res = CliRunner().invoke(app, ["run", "--dataset", "synthetic", "--algo", algo, "--momentum", "0.9",
                                   "--workers", "4", "--batch", "8", "--steps", "2", "--results",
                                   str(tmp_path / "results")])
    assert res.exit_code == 2, res.output
    try:
        err = res.stderr
    except ValueError:  # click < 8.2: stderr is mixed into output
        err = res.output
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert f"{algo} applies no momentum" in lines[0] and needle in lines[0] and "--momentum 0" in lines[0]
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").rglob("summary.json"))


def test_rules_registered_with_their_needs():
    assert RULES.get("dsgt").needs == ("decayed", "momentum")
    assert RULES.get("d2").needs == RULES.get("exact-diffusion").needs == ("decayed",)
    for name in ("dsgt", "d2", "exact-diffusion"):
        assert RULES.get(name).needs_topology
    with pytest.raises(UserError, match="needs a local optimizer"):
        RunConfig(algo="dsgt", opt="lamb").validate()
