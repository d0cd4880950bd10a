"""The local-update family: AdamW, local / post-local SGD, DiLoCo, SlowMo (over local SGD and D-SGD).

References are written here in float64, independently of the code under test: gradients from
grads64 (a float64 copy of the module, ordinary backward), AdamW from torch.optim.AdamW and from
its formula, momentum as torch.optim.SGD's, averages as row means.
"""

import copy
import json
import math
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import topologies
from algorithms import PRESETS
from bench.config import RunConfig
from bench.models import build_model
from bench.runner import run
from bench.workers import ParamLayout
from helpers import component
from test_algorithms import EQ, cosine, do_step, flat, grads64, make_trainer, perturb_rows, run_steps

# EQ (rtol 1e-9, atol 1e-12) as in test_algorithms.py: every run and reference here is float64 and
# at most 12 steps long, so correct code agrees to ~1e-13; a constant wrong by 1e-6 relative moves
# the parameters by far more than the tolerance (test_tolerance_catches_a_wrong_outer_constant).
MU, WD = 0.9, 5e-4
PRESET_NAMES = ("local-sgd", "post-local-sgd", "diloco", "slowmo", "slowmo-gossip")


@pytest.fixture
def tiny_cfg(tiny_cfg):
    """conftest's tiny configuration, in float64 (see EQ)."""
    return tiny_cfg.replace(precision="fp64", schedule="cosine")


def mean_rows(X: torch.Tensor) -> torch.Tensor:
    return X.mean(0, keepdim=True).expand_as(X).clone()


class SGDRef:
    """torch.optim.SGD's momentum (dampening 0) on the rows of [n, d], one buffer per worker."""

    def __init__(self, mu=MU, wd=WD, nesterov=False):
        self.mu, self.wd, self.nesterov, self.m = mu, wd, nesterov, None

    def direction(self, X, G):
        g = G + self.wd * X
        if self.mu == 0:
            return g
        self.m = g.clone() if self.m is None else self.mu * self.m + g
        return g + self.mu * self.m if self.nesterov else self.m


class AdamWRef:
    """AdamW on the rows (decoupled form): returns x_new = x (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps)."""

    def __init__(self, betas=(0.9, 0.999), eps=1e-8, wd=0.01):
        (self.b1, self.b2), self.eps, self.wd = betas, eps, wd
        self.t, self.m, self.v = 0, 0.0, 0.0

    def update(self, X, G, lr):
        self.t += 1
        self.m = self.b1 * self.m + (1 - self.b1) * G
        self.v = self.b2 * self.v + (1 - self.b2) * G * G
        m_hat, v_hat = self.m / (1 - self.b1 ** self.t), self.v / (1 - self.b2 ** self.t)
        return X * (1 - lr * self.wd) - lr * m_hat / (v_hat.sqrt() + self.eps)


# ----------------------------------------------------------------------------------------------
# AdamW


@pytest.mark.parametrize("wd,betas", [(0.01, (0.9, 0.999)), (0.1, (0.9, 0.95)), (0.0, (0.8, 0.99))])
def test_adamw_equals_torch_adamw(wd, betas):
    """x <- x - lr U with our direction == torch.optim.AdamW, step by step, random gradients, a lr schedule."""
    torch.manual_seed(0)
    module = build_model("mlp", (1, 6), 3).double()
    cfg = RunConfig(opt="adamw", weight_decay=wd, betas=betas)
    adamw = component(cfg, "opt", layout=ParamLayout(module))
    opt = torch.optim.AdamW(module.parameters(), lr=0.05, betas=betas, eps=1e-8, weight_decay=wd)
    X = flat(module).unsqueeze(0)
    g = torch.Generator().manual_seed(1)
    for t in range(8):
        lr = cosine(t, 0.05, 8)
        G = torch.randn(X.shape, generator=g, dtype=torch.float64) * (1.0 + t)
        X = X - lr * adamw.direction(X, G)
        off = 0
        for p in module.parameters():
            p.grad = G[0, off:off + p.numel()].view_as(p).clone()
            off += p.numel()
        opt.param_groups[0]["lr"] = lr
        opt.step()
        torch.testing.assert_close(X[0], flat(module), rtol=1e-10, atol=1e-12)
    assert adamw.t == 8
    assert cfg.param("eps") == 1e-8  # torch's defaults
    assert RunConfig(opt="adamw").param("weight_decay") == 0.01 and RunConfig(opt="adamw").param("betas") == (0.9, 0.999)


def test_adamw_single_worker_run_equals_torch_adamw(tiny_cfg, synthetic):
    """--opt adamw with the all-reduce rule on one worker == torch.optim.AdamW on the same batches."""
    T, lr = 10, 0.01
    cfg = tiny_cfg.replace(algo="csgd", opt="adamw", workers=1, batch=16, steps=T, lr=lr, weight_decay=0.01)
    tr = make_trainer(cfg, synthetic)
    module = copy.deepcopy(tr.workers.module).double()
    opt = torch.optim.AdamW(module.parameters(), lr=lr)
    for t in range(T):
        x, y = tr.batch(t)
        opt.param_groups[0]["lr"] = cosine(t, lr, T)
        opt.zero_grad()
        F.cross_entropy(module(x[0].double()), y[0]).backward()
        opt.step()
        do_step(tr, t)
    torch.testing.assert_close(tr.workers.X[0], flat(module), **EQ)
    assert (flat(module) - flat(tr.workers.module).double()).abs().max() > 1e-3  # it did train


# ----------------------------------------------------------------------------------------------
# local SGD and post-local SGD


def check_local_run(tr, T, avg_steps, lr, nesterov=False):
    """Run T steps against x_i <- x_i - lr U_i (local buffers), x <- mean x after avg_steps; return the buffers."""
    X = perturb_rows(tr)
    ref = SGDRef(nesterov=nesterov)
    for t in range(T):
        x, y = tr.batch(t)
        X = X - cosine(t, lr, T) * ref.direction(X, grads64(tr.workers.module, X, x, y))
        if t in avg_steps:
            X = mean_rows(X)
        do_step(tr, t)
        torch.testing.assert_close(tr.workers.X.double(), X, **EQ)
        if t in avg_steps:
            assert (X - X[:1]).abs().max() == 0
        else:
            assert (X[0] - X[1]).abs().max() > 1e-6
    return ref.m


@pytest.mark.parametrize("nesterov", [False, True])
def test_local_sgd_matches_formula(tiny_cfg, synthetic, nesterov):
    """H = 3, 7 steps: averages after steps 2 and 5 only; momentum buffers stay local (not averaged)."""
    T, H = 7, 3
    cfg = tiny_cfg.replace(algo="local-sgd", period=H, steps=T, nesterov=nesterov)
    tr = make_trainer(cfg, synthetic)
    assert [t for t in range(T) if tr.algo.rule.averages(t)] == [2, 5]
    m = check_local_run(tr, T, {2, 5}, cfg.lr, nesterov)
    torch.testing.assert_close(tr.algo.optimizer.m, m, **EQ)
    assert (m[0] - m[1]).abs().max() > 1e-4  # the buffers were never averaged


def test_post_local_sgd_switch_point(tiny_cfg, synthetic):
    """local_start 0.5 of 8 steps = step 4: average after steps 0-3, then every H = 3 steps from 4: after 6."""
    T = 8
    cfg = tiny_cfg.replace(algo="post-local-sgd", period=3, steps=T)
    tr = make_trainer(cfg, synthetic)
    assert cfg.param("local_start") == "0.5"
    assert tr.algo.rule.t0 == 4
    assert [t for t in range(T) if tr.algo.rule.averages(t)] == [0, 1, 2, 3, 6]
    check_local_run(tr, T, {0, 1, 2, 3, 6}, cfg.lr)


def test_local_start_as_epoch_and_defaults():
    def rule(**kw):
        return component(RunConfig(**kw), "comm", total_steps=100, epoch_len=10)

    r = rule(algo="local-sgd", local_start="3ep", period=5)  # epoch 3 = step 30
    assert [t for t in range(45) if r.averages(t)] == list(range(30)) + [34, 39, 44]
    r = rule(algo="local-sgd")
    assert r.t0 == 0 and r.H == 4 and [t for t in range(12) if r.averages(t)] == [3, 7, 11]
    r = rule(algo="post-local-sgd")
    assert r.t0 == 50 and r.H == 16
    with pytest.raises(Exception, match="local-start"):
        RunConfig(algo="local-sgd", local_start="1.5").validate()


@pytest.mark.parametrize("mu,nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_local_sgd_h1_equals_csgd(tiny_cfg, synthetic, mu, nesterov):
    """H = 1: x <- mean_i (x - lr U_i) == C-SGD. Without momentum by definition; with momentum too,
    because momentum is linear: the mean of the local buffers follows C-SGD's buffer exactly."""
    cfg = tiny_cfg.replace(steps=10, momentum=mu, nesterov=nesterov)
    X_c = run_steps(cfg.replace(algo="csgd"), synthetic)
    X_l = run_steps(cfg.replace(algo="local-sgd", period=1), synthetic)
    torch.testing.assert_close(X_l, X_c, **EQ)
    X_2 = run_steps(cfg.replace(algo="local-sgd", period=2), synthetic)
    assert (X_2 - X_c).abs().max() > 1e-5  # H = 2 is not C-SGD


# ----------------------------------------------------------------------------------------------
# DiLoCo


def diloco_reference(tr, T, H, lr, outer_lr, mu, nesterov, wd):
    """x_i: AdamW steps; after every H-th step D = theta - mean x, torch SGD(outer_lr, mu, nesterov) on theta."""
    X = tr.workers.X.double().clone()
    theta, b, inner = X[0].clone(), None, AdamWRef(wd=wd)
    states = []
    for t in range(T):
        x, y = tr.batch(t)
        X = inner.update(X, grads64(tr.workers.module, X, x, y), cosine(t, lr, T))
        if (t + 1) % H == 0:
            D = theta - X.mean(0)
            if mu:
                b = D.clone() if b is None else mu * b + D
                D = D + mu * b if nesterov else b
            theta = theta - outer_lr * D
            X = theta.expand_as(X).clone()
        states.append((X, theta))
    return states


@pytest.mark.parametrize("nesterov", [True, False])
def test_diloco_matches_formula(tiny_cfg, synthetic, nesterov):
    """H = 2, 5 steps, AdamW inside: outer steps after steps 1 and 3, step 4 is local again."""
    T, H, lr, wd = 5, 2, 0.01, 0.01
    cfg = tiny_cfg.replace(algo="diloco", workers=3, period=H, steps=T, lr=lr, weight_decay=wd,
                           outer_nesterov=nesterov)
    tr = make_trainer(cfg, synthetic)
    ref = diloco_reference(tr, T, H, lr, 0.7, 0.9, nesterov, wd)
    for t in range(T):
        do_step(tr, t)
        X, theta = ref[t]
        torch.testing.assert_close(tr.workers.X.double(), X, **EQ)
        torch.testing.assert_close(tr.algo.rule.theta, theta, **EQ)
        assert ((X - X[:1]).abs().max() == 0) == (t in (1, 3))
    assert tr.algo.optimizer.t == T  # the inner AdamW state is never reset


def test_tolerance_catches_a_wrong_outer_constant(tiny_cfg, synthetic):
    """The DiLoCo reference with outer_lr 0.7 (1 + 1e-6) is outside EQ of the run with 0.7."""
    T, H, lr, wd = 5, 2, 0.01, 0.01
    cfg = tiny_cfg.replace(algo="diloco", workers=3, period=H, steps=T, lr=lr, weight_decay=wd)
    tr = make_trainer(cfg, synthetic)
    wrong = diloco_reference(tr, T, H, lr, 0.7 * (1 + 1e-6), 0.9, True, wd)[-1][0]
    for t in range(T):
        do_step(tr, t)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(tr.workers.X.double(), wrong, **EQ)


@pytest.mark.parametrize("mu,nesterov", [(0.0, False), (0.9, True)])
def test_diloco_h1_outer_sgd_lr1_equals_csgd(tiny_cfg, synthetic, mu, nesterov):
    """H = 1, outer lr 1, no outer momentum, inner SGD: theta <- theta - (theta - mean_i (theta - lr U_i))
    = C-SGD (with inner momentum too: the mean of the local buffers is C-SGD's buffer)."""
    cfg = tiny_cfg.replace(steps=10, momentum=mu, nesterov=nesterov)
    X_c = run_steps(cfg.replace(algo="csgd"), synthetic)
    X_d = run_steps(cfg.replace(algo="diloco", opt="sgd", period=1, outer_lr=1.0, outer_momentum=0.0), synthetic)
    torch.testing.assert_close(X_d, X_c, **EQ)
    X_m = run_steps(cfg.replace(algo="diloco", opt="sgd", period=1, outer_lr=1.0, outer_momentum=0.5), synthetic)
    assert (X_m - X_c).abs().max() > 1e-5  # outer momentum is not C-SGD


# ----------------------------------------------------------------------------------------------
# SlowMo


def check_slowmo_run(tr, T, tau, alpha, beta, lr, base):
    """base(X, g, ref, lr_t, t) -> the base algorithm's step (ref: the SGD reference, whose direction(P, g) puts
    its weight decay at P); slow steps replace it."""
    X = tr.workers.X.double().clone()
    x0, u, ref = X[0].clone(), torch.zeros_like(X[0]), SGDRef()
    for t in range(T):
        x, y = tr.batch(t)
        lr_t = cosine(t, lr, T)
        g = grads64(tr.workers.module, X, x, y)
        if (t + 1) % tau == 0:
            U = ref.direction(X, g)
            xbar = (X - lr_t * U).mean(0)
            u = beta * u + (x0 - xbar) / lr_t
            x0 = x0 - alpha * lr_t * u
            X = x0.expand_as(X).clone()
        else:
            X = base(X, g, ref, lr_t, t)
        do_step(tr, t)
        torch.testing.assert_close(tr.workers.X.double(), X, **EQ)
    torch.testing.assert_close(tr.algo.rule.x0, x0, **EQ)
    torch.testing.assert_close(tr.algo.rule.u, u, **EQ)
    return X


@pytest.mark.parametrize("alpha,beta", [(1.0, 0.5), (0.7, 0.9)])
def test_slowmo_matches_formula(tiny_cfg, synthetic, alpha, beta):
    """local_period 2, tau 4, 9 steps: averages after 1, 5; slow steps after 3, 7 (replacing the average)."""
    T, H, tau = 9, 2, 4
    cfg = tiny_cfg.replace(algo="slowmo", local_period=H, period=tau, steps=T, slow_lr=alpha, slow_momentum=beta)
    tr = make_trainer(cfg, synthetic)

    def base(X, g, ref, lr_t, t):
        X = X - lr_t * ref.direction(X, g)
        return mean_rows(X) if (t + 1) % H == 0 else X

    check_slowmo_run(tr, T, tau, alpha, beta, cfg.lr, base)


@pytest.mark.parametrize("order", ["cta", "atc"])
def test_slowmo_gossip_matches_formula(tiny_cfg, synthetic, order):
    """D-SGD (cta: z = W x, x <- z - lr U(z, g); atc: W (x - lr U(x, g))) every step but after steps 2 and 5:
    slow steps (tau = 3)."""
    T, tau, n = 7, 3, 4
    cfg = tiny_cfg.replace(algo="slowmo-gossip", topology="ring", workers=n, period=tau, steps=T, order=order)
    tr = make_trainer(cfg, synthetic)
    W = torch.from_numpy(topologies.get_topology("ring", n).weights(0))

    def base(X, g, ref, lr_t, t):
        if order == "cta":
            Z = W @ X
            return Z - lr_t * ref.direction(Z, g)
        return W @ (X - lr_t * ref.direction(X, g))

    check_slowmo_run(tr, T, tau, 1.0, 0.5, cfg.lr, base)


def test_slowmo_alpha1_beta0_equals_local_sgd(tiny_cfg, synthetic):
    """alpha = 1, beta = 0: x0 <- xbar, i.e. the plain average: SlowMo == its base local SGD when H divides tau."""
    cfg = tiny_cfg.replace(steps=12, slow_lr=1.0, slow_momentum=0.0)
    X_l = run_steps(cfg.replace(algo="local-sgd", period=2), synthetic)
    X_s = run_steps(cfg.replace(algo="slowmo", local_period=2, period=4), synthetic)
    torch.testing.assert_close(X_s, X_l, **EQ)
    X_odd = run_steps(cfg.replace(algo="slowmo", local_period=2, period=3), synthetic)  # extra averages
    assert (X_odd - X_l).abs().max() > 1e-5
    X_mom = run_steps(cfg.replace(algo="slowmo", local_period=2, period=4, slow_momentum=0.5), synthetic)
    assert (X_mom - X_l).abs().max() > 1e-5


# ----------------------------------------------------------------------------------------------
# state, messages, runs


@pytest.mark.parametrize("algo,extra", [("diloco", dict(period=2, lr=0.01)), ("slowmo", dict(period=3)),
                                        ("post-local-sgd", dict(period=2))])
def test_state_dict_resumes_exactly(tiny_cfg, synthetic, algo, extra):
    """Stop after 4 steps, rebuild, load X and the algorithm's state: the next 4 steps equal an unbroken run."""
    cfg = tiny_cfg.replace(algo=algo, steps=8, **extra)
    a = make_trainer(cfg, synthetic)
    for t in range(8):
        do_step(a, t)
    b = make_trainer(cfg, synthetic)
    for t in range(4):
        do_step(b, t)
    state, X = copy.deepcopy(b.algo.state_dict()), b.workers.X.clone()
    c = make_trainer(cfg, synthetic)
    c.algo.load_state_dict(state)
    c.workers.X = X
    for t in range(4, 8):
        do_step(c, t)
    torch.testing.assert_close(c.workers.X, a.workers.X, rtol=0, atol=0)


class CountingComm:
    """The simulator, counting what each step sends: all-reduces and the off-diagonal entries of W(t)."""

    def __init__(self, comm, n, topology):
        self.comm, self.n, self.topology, self.sent = comm, n, topology, 0.0

    def __getattr__(self, k):
        return getattr(self.comm, k)

    def allreduce_mean(self, G):
        self.sent += 2 * (self.n - 1) / self.n
        return self.comm.allreduce_mean(G)

    def mix(self, X, t):
        W = self.topology.weights(t)
        self.sent += float((W != 0).sum() - (np.diag(W) != 0).sum()) / self.n  # one message per off-diagonal entry
        return self.comm.mix(X, t)


@pytest.mark.parametrize("algo,extra,expected", [
    ("local-sgd", dict(period=3), 1.5 * 3 / 10),                         # averages after 2, 5, 8
    ("post-local-sgd", dict(period=3), 1.5 * 6 / 10),                    # 0-4, then 7
    ("diloco", dict(period=4, lr=0.01), 1.5 * 2 / 10),                   # rounds end at 3, 7
    ("slowmo", dict(period=4, local_period=3), 1.5 * 5 / 10),            # averages after 2, 5, 8; slow 3, 7
    ("slowmo-gossip", dict(period=4), (8 * 2 + 2 * 1.5) / 10),           # ring: 2 messages/step, slow at 3, 7
])
def test_bytes_per_step_counted_exactly(tiny_cfg, synthetic, algo, extra, expected):
    """sends_per_step == the messages a counting comm sees over the whole run == the hand count."""
    T, n = 10, 4
    cfg = tiny_cfg.replace(algo=algo, topology="ring", workers=n, steps=T, **extra)
    tr = make_trainer(cfg, synthetic)
    topo = tr.topology
    tr.comm = CountingComm(tr.comm, n, topo)
    for t in range(T):
        do_step(tr, t)
    rule = tr.algo.rule
    assert rule.sends_per_step(n, topo) == pytest.approx(tr.comm.sent / T, rel=1e-12)
    assert rule.sends_per_step(n, topo) == pytest.approx(expected, rel=1e-12)
    d = tr.workers.layout.d
    assert rule.bytes_per_step(n, topo, d, 4) == pytest.approx(expected * d * 4, rel=1e-12)
    assert tr.bytes_per_step == pytest.approx(expected * d * 8, rel=1e-12)  # float64 run


@pytest.mark.parametrize("algo", PRESET_NAMES)
def test_every_local_preset_runs(tiny_cfg, tmp_path, algo):
    """Each preset through bench.runner.run (diloco with its AdamW at an Adam-sized lr); slowmo with tau = 4."""
    extra = dict(lr=0.003) if algo == "diloco" else dict(period=4) if algo.startswith("slowmo") else {}
    cfg = tiny_cfg.replace(algo=algo, topology="ring", steps=10, eval_every=5, precision="fp32", **extra)
    s = run(cfg, force=True)
    on_disk = json.loads((tmp_path / "results" / s["run_id"] / "summary.json").read_text())
    assert on_disk["status"] == "completed" and on_disk["steps"] == 10 and on_disk["algo"] == algo
    assert math.isfinite(on_disk["test_acc"]) and on_disk["test_acc"] > 50  # 4 classes: it learned
    topo = topologies.get_topology("ring", 4) if cfg.needs_topology() else None
    assert cfg.needs_topology() == (algo == "slowmo-gossip")
    rule = component(cfg, "comm", layout=ParamLayout(build_model("mlp", (1, 16), 4)), n_local=4, total_steps=10,
                     topology=topo)
    assert on_disk["bytes_per_step"] == pytest.approx(rule.bytes_per_step(4, topo, on_disk["params"], 4))


def test_presets_registered():
    for name in PRESET_NAMES:
        assert name in PRESETS
    assert PRESETS.get("diloco").opt == "adamw" and PRESETS.get("slowmo").comm == "slowmo"


# ----------------------------------------------------------------------------------------------
# torch.distributed (gloo, 2 ranks) == simulator with the outer steps inside a 10-step run
# (tests/test_distributed.py runs every preset at its defaults, where SlowMo's tau = 48 never fires)


DIST_JOBS = [dict(algo="slowmo", period=4), dict(algo="slowmo-gossip", period=4, topology="one-peer-exp"),
             dict(algo="diloco", period=3, lr=0.01), dict(algo="post-local-sgd", period=3)]


def _dist_cfg(job: dict, results: str, **kw) -> RunConfig:
    base = dict(dataset="synthetic", model="mlp", workers=4, batch=8, steps=10, lr=0.1, schedule="cosine",
                hessian=False, eval_every=10, device="cpu", dist_timeout=60.0, precision="fp64", topology="ring")
    return RunConfig(**{**base, **job, "results": results, **kw})


def _dist_worker(rank: int, P: int, port: int, out_dir: str) -> None:
    import datetime

    import torch.distributed as dist

    from bench.distributed import make_comm
    from test_distributed import set_env

    set_env(rank, P, port)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    for job in DIST_JOBS:
        cfg = _dist_cfg(job, str(Path(out_dir, "dist")), backend="dist", procs=P)
        run(cfg, None, True, comm=make_comm(cfg))
    dist.destroy_process_group()


def test_outer_steps_distributed_equal_simulator(tmp_path):
    from test_distributed import REL, _flat, free_port, join

    P = 2
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_dist_worker, args=(r, P, port, str(tmp_path)), daemon=True) for r in range(P)]
    for p in procs:
        p.start()
    t0 = time.monotonic()
    sims = [run(_dist_cfg(job, str(tmp_path / "sim")), None, True) for job in DIST_JOBS]
    assert join(procs, timeout=max(60.0, 300 - (time.monotonic() - t0))) == [0] * P
    for s in sims:
        a = _flat(tmp_path / "dist" / s["run_id"] / "model.pt")
        b = _flat(tmp_path / "sim" / s["run_id"] / "model.pt")
        assert float((a - b).norm() / b.norm()) < REL, s["run_id"]
