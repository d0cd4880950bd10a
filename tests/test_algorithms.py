"""Algorithms: exact update rules on tiny problems, equivalences between presets, and runs.

Reference computations are written here independently of the code under test:
gradients come from a float64 copy of the module (ordinary backward), mixing
matrices from Topology.weights(t), optimizers from torch.optim / timm or from the
formulas in ../shared/DESIGN.md.
"""

import copy
import csv
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import topologies
from algorithms import PRESETS, StepContext
from algorithms.adsam import noise_seed
from bench.comm import SimulatedComm
from bench.config import RunConfig
from bench.errors import UserError
from bench.models import build_model
from bench.runner import Trainer, run
from bench.workers import ParamLayout, Workers
from helpers import component

CPU = torch.device("cpu")
# Every run here is in float64 (precision "fp64"), and so is every reference. Error budget: float64's
# unit roundoff is 1.1e-16; a run of <= 20 steps amplifies rounding at most ~1e3-fold (measured worst
# case: LAMB's division by sqrt(v) + eps, 100-fold in float32), so correct code agrees to ~1e-13
# relative on any CPU and thread count. 1e-9 leaves a 1e4 margin, while a wrong constant of relative
# size 1e-6 anywhere in a rule moves the parameters by ~1e-7 relative (test_tolerance_catches_*).
EQ = dict(rtol=1e-9, atol=1e-12)


@pytest.fixture
def tiny_cfg(tiny_cfg):
    """conftest's tiny configuration, in float64 (see EQ)."""
    return tiny_cfg.replace(precision="fp64")


# ----------------------------------------------------------------------------------------------
# helpers


def make_trainer(cfg: RunConfig, data) -> Trainer:
    """Trainer for cfg (resolved, NOT validated, so that tests may build oracles such as rho = 0)."""
    cfg = cfg.resolve(len(data.y_train), data.default_model)
    return Trainer(cfg, data, CPU, run_dir=None)


def do_step(tr: Trainer, t: int, lr: float | None = None, lr_max: float | None = None) -> StepContext:
    """One step of the trainer's algorithm on its batch of step t (the runner's loop body, untimed)."""
    ctx = StepContext(t, tr.lr(t) if lr is None else lr, tr.cfg.lr if lr_max is None else lr_max,
                      tr.comm, tr.cfg.seed)
    x, y = tr.batch(t)
    _, X = tr.algo.step(tr.workers, tr.workers.X, x, y, ctx)
    tr.workers.X = X
    return ctx


def run_steps(cfg: RunConfig, data) -> torch.Tensor:
    tr = make_trainer(cfg, data)
    for t in range(tr.cfg.steps):
        do_step(tr, t)
    return tr.workers.X.clone()


def cosine(t: int, base: float, total: int) -> float:
    return base * 0.5 * (1.0 + math.cos(math.pi * t / total))


def flat(module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def set_flat(module, x: torch.Tensor) -> None:
    off = 0
    with torch.no_grad():
        for p in module.parameters():
            k = p.numel()
            p.copy_(x[off:off + k].view_as(p))
            off += k
    assert off == x.numel()


def grads64(module, X: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-worker gradients [n, d] (float64) of worker i's mean cross-entropy on (x[i], y[i]) at X[i]."""
    m = copy.deepcopy(module).double().train()
    rows = []
    for i in range(X.shape[0]):
        set_flat(m, X[i].double())
        m.zero_grad(set_to_none=True)
        F.cross_entropy(m(x[i].double()), y[i]).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in m.parameters()]))
    return torch.stack(rows)


def perturb_rows(tr: Trainer, scale: float = 0.05, seed: int = 3) -> torch.Tensor:
    """Give every worker different parameters (so that mixing does something)."""
    g = torch.Generator().manual_seed(seed)
    tr.workers.X = tr.workers.X + scale * torch.randn(tr.workers.X.shape, generator=g)
    return tr.workers.X.double().clone()


def torch_sgd_reference(module, batches, lrs, momentum, wd, nesterov):
    """Plain single-model torch.optim.SGD (float64) on the given batches; returns the flat parameters."""
    m = copy.deepcopy(module).double().train()
    opt = torch.optim.SGD(m.parameters(), lr=lrs[0], momentum=momentum, weight_decay=wd, nesterov=nesterov)
    for (x, y), lr in zip(batches, lrs):
        opt.param_groups[0]["lr"] = lr
        opt.zero_grad()
        F.cross_entropy(m(x.double()), y).backward()
        opt.step()
    return flat(m)


# ----------------------------------------------------------------------------------------------
# equivalences between presets


@pytest.mark.parametrize("nesterov", [False, True])
def test_dsgd_atc_on_complete_equals_csgd(tiny_cfg, synthetic, nesterov):
    cfg = tiny_cfg.replace(schedule="cosine", steps=12, nesterov=nesterov)
    X_c = run_steps(cfg.replace(algo="csgd"), synthetic)
    X_d = run_steps(cfg.replace(algo="dsgd", topology="complete", order="atc"), synthetic)
    torch.testing.assert_close(X_d, X_c, **EQ)
    # every worker holds the one C-SGD model
    torch.testing.assert_close(X_d, X_d[:1].expand_as(X_d), rtol=0, atol=1e-12)
    # the default order (mix, then the local step) is NOT C-SGD: workers drift apart
    X_cta = run_steps(cfg.replace(algo="dsgd", topology="complete", order="cta"), synthetic)
    assert (X_cta - X_c).abs().max() > 1e-4
    assert (X_cta[0] - X_cta[1]).abs().max() > 1e-5


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("algo,topology", [("csgd", "ring"), ("dsgd", "ring"), ("dsgd", "complete")])
def test_single_worker_equals_torch_sgd(tiny_cfg, synthetic, algo, topology, nesterov):
    T = 12
    cfg = tiny_cfg.replace(algo=algo, topology=topology, workers=1, batch=16, steps=T, schedule="cosine",
                           nesterov=nesterov)
    tr = make_trainer(cfg, synthetic)
    batches = []
    for t in range(T):
        x, y = tr.batch(t)
        batches.append((x[0], y[0]))
        do_step(tr, t)
    lrs = [cosine(t, cfg.lr, T) for t in range(T)]
    ref = torch_sgd_reference(tr.workers.module, batches, lrs, 0.9, 5e-4, nesterov)
    torch.testing.assert_close(tr.workers.X[0].double(), ref, **EQ)
    assert (ref - flat(tr.workers.module).double()).abs().max() > 1e-3  # it did train


def test_no_weight_decay_on_1d_parameters(tiny_cfg, synthetic):
    """--no-wd-1d equals torch.optim.SGD with biases in a parameter group without weight decay."""
    T, wd = 8, 0.05
    cfg = tiny_cfg.replace(algo="csgd", workers=1, batch=16, steps=T, weight_decay=wd, wd_1d=False)
    tr = make_trainer(cfg, synthetic)
    batches = []
    for t in range(T):
        x, y = tr.batch(t)
        batches.append((x[0], y[0]))
        do_step(tr, t)
    m = copy.deepcopy(tr.workers.module).double()
    opt = torch.optim.SGD([{"params": [p for p in m.parameters() if p.dim() >= 2], "weight_decay": wd},
                           {"params": [p for p in m.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                          lr=cfg.lr, momentum=0.9)
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(m(x.double()), y).backward()
        opt.step()
    torch.testing.assert_close(tr.workers.X[0].double(), flat(m), **EQ)
    everywhere = torch_sgd_reference(tr.workers.module, batches, [cfg.lr] * T, 0.9, wd, False)
    assert (everywhere - flat(m)).abs().max() > 1e-5


def test_gamma_zero_every_worker_runs_its_own_sgd(tiny_cfg, synthetic):
    """DSGD-AC with gamma_t = 0 (W_t = I): each worker is an independent torch SGD on its own batches.

    The start is step 0 at the full lr; a multistep milestone at step 1 divides the lr by 10, and
    p = 400 makes (lr_t / lr_start)^p = 1e-400, exactly 0.0 in floating point, from step 1 on. At
    step 0 gamma = 1, but every worker holds the same x^0, so mixing changes nothing then.
    """
    T = 8
    cfg = tiny_cfg.replace(algo="dsgd-ac", topology="ring", workers=4, steps=T, schedule="multistep",
                           milestones=(1 / T,), p=400.0, gamma_min=0.0, ac_start="0")
    cfg.validate()
    tr = make_trainer(cfg, synthetic)
    per_worker = [[] for _ in range(4)]
    for t in range(T):
        x, y = tr.batch(t)
        for i in range(4):
            per_worker[i].append((x[i], y[i]))
        ctx = do_step(tr, t)
        assert tr.algo.rule.gamma(ctx) == (1.0 if t == 0 else 0.0)
    lrs = [cfg.lr] + [0.1 * cfg.lr] * (T - 1)
    for i in range(4):
        ref = torch_sgd_reference(tr.workers.module, per_worker[i], lrs, 0.9, 5e-4, False)
        torch.testing.assert_close(tr.workers.X[i].double(), ref, **EQ)
    assert (tr.workers.X[0] - tr.workers.X[1]).abs().max() > 1e-4  # the workers did not agree


@pytest.mark.parametrize("order", ["cta", "atc"])
@pytest.mark.parametrize("topology,n", [("ring", 5), ("one-peer-exp", 4), ("star", 4)])
def test_dsgd_steps_match_formula(tiny_cfg, synthetic, topology, n, order):
    """cta: z = W x, x <- z - lr U(z, g) ; atc: x <- W (x - lr U(x, g)); g at the pre-mix x;
    U from SGD with momentum 0.9 and its weight decay at the point it steps from (first step: U = g + wd x)."""
    T, mu, wd = 3, 0.9, 5e-4
    cfg = tiny_cfg.replace(algo="dsgd", topology=topology, workers=n, steps=T, schedule="cosine", order=order)
    tr = make_trainer(cfg, synthetic)
    X = perturb_rows(tr)
    topo = topologies.get_topology(topology, n)
    m = None
    for t in range(T):
        x, y = tr.batch(t)
        W = torch.from_numpy(topo.weights(t))
        Z = W @ X if order == "cta" else X  # where the optimizer steps from (its weight decay acts there)
        g = grads64(tr.workers.module, X, x, y) + wd * Z
        m = g.clone() if m is None else mu * m + g
        lr = cosine(t, cfg.lr, T)
        X = Z - lr * m if order == "cta" else W @ (X - lr * m)
        do_step(tr, t)
        torch.testing.assert_close(tr.workers.X.double(), X, **EQ)


def test_dsgd_ac_never_started_equals_dsgd(tiny_cfg, synthetic):
    cfg = tiny_cfg.replace(topology="ring", schedule="cosine", steps=10)
    X_d = run_steps(cfg.replace(algo="dsgd"), synthetic)
    X_ac = run_steps(cfg.replace(algo="dsgd-ac", ac_start="1"), synthetic)
    torch.testing.assert_close(X_ac, X_d, rtol=0, atol=0)
    X_on = run_steps(cfg.replace(algo="dsgd-ac", ac_start="0"), synthetic)  # gamma_t < 1 from step 1 on
    assert (X_on - X_d).abs().max() > 1e-6


@pytest.mark.parametrize("gamma_min,expected", [(0.0, 0.3), (0.5, 0.65)])
def test_dsgd_ac_step_matches_formula(tiny_cfg, synthetic, gamma_min, expected):
    """z = x + gamma (W x - x), x <- z - lr U(z, g), gamma = gamma_min + (1 - gamma_min) (lr / lr_start)^p,
    lr_start the lr at the start step (step 0 here: the constant schedule's 0.1)."""
    wd, p, lr_max = 5e-4, 2.0, 0.1
    lr = lr_max * math.sqrt(0.3)
    cfg = tiny_cfg.replace(algo="dsgd-ac", topology="ring", workers=4, steps=5, p=p, gamma_min=gamma_min)
    tr = make_trainer(cfg, synthetic)
    X = perturb_rows(tr)
    x, y = tr.batch(0)
    ctx = do_step(tr, 0, lr=lr, lr_max=lr_max)
    gamma = gamma_min + (1 - gamma_min) * (lr / lr_max) ** p
    assert tr.algo.rule.gamma(ctx) == pytest.approx(expected, rel=1e-12)
    assert gamma == pytest.approx(expected, rel=1e-12)
    W = torch.from_numpy(topologies.get_topology("ring", 4).weights(0))
    Z = X + gamma * (W @ X - X)
    expect = Z - lr * (grads64(tr.workers.module, X, x, y) + wd * Z)
    torch.testing.assert_close(tr.workers.X.double(), expect, **EQ)


def test_dsgd_ac_gamma_start_and_warmup():

    def rule(**kw):  # tests.helpers.component: a constant schedule at lr 0.1, so lr_start = 0.1
        return component(RunConfig(algo="dsgd-ac", lr=0.1, **kw), "comm", total_steps=100, epoch_len=10)

    ctx = lambda t, lr: StepContext(t, lr, 0.1, None, 0)  # noqa: E731
    r = rule(ac_start="0.2", p=3.0)
    assert r.start == 20 and r.lr_start == 0.1
    assert r.gamma(ctx(19, 0.05)) == 1.0
    assert r.gamma(ctx(20, 0.05)) == pytest.approx(0.5 ** 3)
    r = rule(ac_start="3ep", p=2.0)  # epoch 3 = step 30 with 10 steps per epoch
    assert r.gamma(ctx(29, 0.05)) == 1.0 and r.gamma(ctx(30, 0.05)) == pytest.approx(0.25)
    r = rule(ac_start="0", warmup=5, p=3.0)  # never before the warmup ends
    assert r.gamma(ctx(4, 0.01)) == 1.0 and r.gamma(ctx(5, 0.01)) == pytest.approx(0.001)
    r = rule(ac_start="0.5", p=2.0, gamma_min=0.2)
    assert r.gamma(ctx(60, 0.05)) == pytest.approx(0.2 + 0.8 * 0.25)


def test_dsgd_ac_gamma_is_continuous_at_the_start(tiny_cfg, synthetic):
    """gamma = 1 up to and at the start step, whatever the lr there (the reference's lr_start): on a
    cosine schedule starting halfway, gamma moves from 1 by (lr_{t+1} / lr_t)^p, not in a jump."""
    T = 40
    cfg = tiny_cfg.replace(algo="dsgd-ac", steps=T, schedule="cosine", ac_start="0.5", p=3.0)
    tr = make_trainer(cfg, synthetic)
    gam = [tr.algo.rule.gamma(StepContext(t, tr.lr(t), cfg.lr, None, 0)) for t in range(T)]
    assert gam[:21] == [1.0] * 21
    assert gam[21] == pytest.approx((tr.lr(21) / tr.lr(20)) ** 3, rel=1e-12) and gam[21] > 0.75
    assert (tr.lr(21) / cfg.lr) ** 3 < 0.15  # the peak-lr form would have jumped from 1 to ~0.1 here
    assert all(a >= b for a, b in zip(gam, gam[1:])) and gam[-1] < 1e-3


# ----------------------------------------------------------------------------------------------
# SAM and AD-SAM


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_step_matches_formula(tiny_cfg, synthetic, adaptive):
    """eps_i = rho g_i/||g_i|| (ASAM: rho |x|^2 g_i / || |x| g_i ||); x <- x - lr (mean_i g_i(x + eps_i) + wd x)."""
    rho, wd, n = 0.05, 5e-4, 3
    cfg = tiny_cfg.replace(algo="sam", workers=n, steps=5, rho=rho, adaptive=adaptive)
    tr = make_trainer(cfg, synthetic)
    X = tr.workers.X.double().clone()
    x, y = tr.batch(0)
    g = grads64(tr.workers.module, X, x, y)
    if adaptive:
        eps = rho * X.abs() ** 2 * g / (X.abs() * g).norm(dim=1, keepdim=True)
    else:
        eps = rho * g / g.norm(dim=1, keepdim=True)
    G = grads64(tr.workers.module, X + eps, x, y)
    expect = X - cfg.lr * (G.mean(0, keepdim=True) + wd * X)
    do_step(tr, 0)
    torch.testing.assert_close(tr.workers.X.double(), expect, **EQ)
    # the perturbation matters at this tolerance
    plain = X - cfg.lr * (g.mean(0, keepdim=True) + wd * X)
    assert (plain - expect).abs().max() > 1e-5


def test_sam_with_rho_zero_equals_csgd(tiny_cfg, synthetic):
    with pytest.raises(UserError, match="rho"):
        tiny_cfg.replace(algo="sam", rho=0.0).validate()
    cfg = tiny_cfg.replace(schedule="cosine")
    X_c = run_steps(cfg.replace(algo="csgd"), synthetic)
    X_s = run_steps(cfg.replace(algo="sam", rho=0.0), synthetic)  # replace() does not validate
    torch.testing.assert_close(X_s, X_c, **EQ)
    X_s1 = run_steps(cfg.replace(algo="sam", rho=0.05), synthetic)
    assert (X_s1 - X_c).abs().max() > 1e-5


def test_adsam_sigma_zero_equals_csgd(tiny_cfg, synthetic):
    cfg = tiny_cfg.replace(schedule="cosine")
    X_c = run_steps(cfg.replace(algo="csgd"), synthetic)
    X_a = run_steps(cfg.replace(algo="ad-sam", sigma=0.0), synthetic)
    torch.testing.assert_close(X_a, X_c, **EQ)


def filter_scale64(module, xrow: torch.Tensor) -> torch.Tensor:
    """||filter|| per entry: slices along dim 0 of >= 2-D weights; 1-D entries are their own filter (|w|)."""
    out, off = [], 0
    for p in module.parameters():
        w = xrow[off:off + p.numel()].view(p.shape)
        off += p.numel()
        if p.dim() >= 2:
            norms = w.reshape(p.shape[0], -1).norm(dim=1)
            out.append(norms.view(-1, *([1] * (p.dim() - 1))).expand(p.shape).reshape(-1))
        else:
            out.append(w.abs().reshape(-1))
    return torch.cat(out)


@pytest.mark.parametrize("mode,samples", [("filter", 1), ("filter", 3), ("absolute", 1)])
def test_adsam_step_matches_formula(tiny_cfg, synthetic, mode, samples):
    """G_i = (1/M) sum_m grad f(x_i + s_i * z_im), z_im from the generator seeded with noise_seed(seed, i, t, m)."""
    sigma, wd, n, t, seed = 0.05, 5e-4, 2, 2, 7
    cfg = tiny_cfg.replace(algo="ad-sam", workers=n, steps=5, sigma=sigma, sigma_mode=mode, samples=samples,
                           seed=seed, momentum=0.0)
    tr = make_trainer(cfg, synthetic)
    assert tr.algo.oracle.grad_evals == samples
    X = tr.workers.X.double().clone()
    x, y = tr.batch(t)
    d = X.shape[1]
    G = torch.zeros_like(X)
    for mm in range(samples):
        Z = torch.stack([torch.empty(d).normal_(generator=torch.Generator().manual_seed(noise_seed(seed, i, t, mm)))
                         for i in range(n)]).double()
        if mode == "filter":
            S = sigma * torch.stack([filter_scale64(tr.workers.module, X[i]) for i in range(n)])
        else:
            S = torch.full_like(X, sigma)
        G += grads64(tr.workers.module, X + S * Z, x, y) / samples
    expect = X - cfg.lr * (G.mean(0, keepdim=True) + wd * X)
    do_step(tr, t, lr=cfg.lr)
    torch.testing.assert_close(tr.workers.X.double(), expect, **EQ)
    g0 = grads64(tr.workers.module, X, x, y)
    assert (X - cfg.lr * (g0.mean(0, keepdim=True) + wd * X) - expect).abs().max() > 1e-6


def _image_workers(n=2, seed=0):
    torch.manual_seed(seed)
    module = build_model("cnn", (1, 8, 8), 4)
    w = Workers(module, n, "native")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 1, 8, 8, generator=g)
    y = torch.randint(0, 4, (n, 4), generator=g)
    return w, x, y


@pytest.mark.parametrize("algo", ["sam", "ad-sam"])
def test_two_pass_oracles_update_bn_statistics_once(algo):
    """SAM's perturbed pass (and AD-SAM's extra samples) leave BatchNorm running statistics alone."""
    cfg = RunConfig(algo=algo, rho=0.05, sigma=0.05, samples=3, seed=1)
    w, x, y = _image_workers()
    ref = copy.deepcopy(w)
    oracle = component(cfg, "grad", layout=w.layout, n_local=2)
    ctx = StepContext(0, 0.1, 0.1, SimulatedComm(2, None, CPU), cfg.seed)
    oracle(w, w.X, x, y, ctx)
    # reference: exactly one train pass, at x (SAM) or at the first noisy point (AD-SAM)
    P = ref.X if algo == "sam" else ref.X + oracle.scale(ref.X) * oracle.noise(ref.X, ctx, 0)
    ref.loss_and_grad(P, x, y, "train")
    for k in w.buffers:
        torch.testing.assert_close(w.buffers[k], ref.buffers[k], rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# LAMB and D-LAMB


class LambRef:
    """Independent per-worker LAMB in float64 (state: moments per layer, step count)."""

    def __init__(self, module, betas, eps, wd, clip=0.0):
        self.shapes = [p.shape for p in module.parameters()]
        self.b1, self.b2 = betas
        self.eps, self.wd, self.clip, self.t = eps, wd, clip, 0
        self.m = [torch.zeros(s, dtype=torch.float64) for s in self.shapes]
        self.v = [torch.zeros(s, dtype=torch.float64) for s in self.shapes]

    def direction(self, x: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        b1, b2 = self.b1, self.b2
        if self.clip > 0:
            G = G * min(1.0, self.clip / float(G.norm()))
        self.t += 1
        out, off = [], 0
        for shape, m, v in zip(self.shapes, self.m, self.v):
            k = math.prod(shape)
            g, w = G[off:off + k].view(shape), x[off:off + k].view(shape)
            off += k
            m.mul_(b1).add_((1 - b1) * g)
            v.mul_(b2).add_((1 - b2) * g * g)
            r = (m / (1 - b1 ** self.t)) / ((v / (1 - b2 ** self.t)).sqrt() + self.eps)
            if len(shape) >= 2:
                u = r + self.wd * w
                wn, un = float(w.norm()), float(u.norm())
                phi = wn / un if wn > 0 and un > 0 else 1.0
            else:  # biases: no weight decay, no trust ratio
                u, phi = r, 1.0
            out.append((phi * u).reshape(-1))
        return torch.cat(out)


@pytest.mark.parametrize("clip", [0.0, 0.5, 100.0])
def test_lamb_steps_match_reference(tiny_cfg, synthetic, clip):
    """LAMB preset (all-reduced gradients): x <- x - lr * phi * (m_hat / (sqrt(v_hat) + eps) + wd x)."""
    T, lr, wd, n = 3, 0.01, 0.01, 2
    cfg = tiny_cfg.replace(algo="lamb", workers=n, steps=T, lr=lr, weight_decay=wd, clip=clip)
    tr = make_trainer(cfg, synthetic)
    X = tr.workers.X.double().clone()
    ref = LambRef(tr.workers.module, cfg.param("betas"), cfg.param("eps"), wd, clip)
    for t in range(T):
        x, y = tr.batch(t)
        G = grads64(tr.workers.module, X, x, y).mean(0)
        if clip:
            assert (float(G.norm()) > clip) == (clip == 0.5)  # clipping active at 0.5, not at 100
        X = X - lr * ref.direction(X[0], G)
        do_step(tr, t)
        torch.testing.assert_close(tr.workers.X.double(), X.expand(n, -1), **EQ)


def test_d_lamb_steps_match_formula(tiny_cfg, synthetic):
    """D-LAMB: z = W x, x_i <- z_i - lr U_i, U_i = worker i's own LAMB direction from z_i (gradient at x_i)."""
    T, lr, wd, n = 3, 0.01, 0.01, 4
    cfg = tiny_cfg.replace(algo="d-lamb", topology="ring", workers=n, steps=T, lr=lr, weight_decay=wd)
    tr = make_trainer(cfg, synthetic)
    X = perturb_rows(tr)
    refs = [LambRef(tr.workers.module, cfg.param("betas"), cfg.param("eps"), wd) for _ in range(n)]
    W = torch.from_numpy(topologies.get_topology("ring", n).weights(0))
    for t in range(T):
        x, y = tr.batch(t)
        G = grads64(tr.workers.module, X, x, y)
        Z = W @ X  # LAMB steps from the mixed parameters (its trust ratio and weight decay see them)
        U = torch.stack([refs[i].direction(Z[i], G[i]) for i in range(n)])
        X = Z - lr * U
        do_step(tr, t)
        torch.testing.assert_close(tr.workers.X.double(), X, **EQ)


def _timm_lamb(module, lr, betas, eps, wd, always_adapt_2d=False):
    from timm.optim import Lamb

    big = [p for p in module.parameters() if p.dim() >= 2]
    small = [p for p in module.parameters() if p.dim() < 2]
    return Lamb([{"params": big, "weight_decay": wd, "always_adapt": always_adapt_2d},
                 {"params": small, "weight_decay": 0.0}],
                lr=lr, betas=betas, eps=eps, weight_decay=wd, max_grad_norm=None, bias_correction=True,
                grad_averaging=True, trust_clip=False, always_adapt=False)


@pytest.mark.parametrize("wd", [0.01, 0.0])
def test_lamb_equals_timm_lamb(wd):
    """Our LAMB direction + x <- x - lr U equals timm.optim.Lamb (1-D params in a no-decay group),
    float64, on a sequence of random gradients. With wd = 0 our >= 2-D layers still adapt (the
    docstring's phi per layer); timm needs always_adapt for that group."""
    pytest.importorskip("timm")
    torch.manual_seed(0)
    module = build_model("mlp", (1, 6), 3).double()
    cfg = RunConfig(opt="lamb", weight_decay=wd, betas=(0.9, 0.99), eps=1e-6)
    w = Workers(copy.deepcopy(module), 1, "native")
    lamb = component(cfg, "opt", layout=w.layout)
    opt = _timm_lamb(module, 0.02, cfg.param("betas"), cfg.param("eps"), wd, always_adapt_2d=(wd == 0))
    X = flat(module).unsqueeze(0)
    g = torch.Generator().manual_seed(1)
    for t in range(6):
        G = torch.randn(X.shape, generator=g, dtype=torch.float64) * (1.0 + t)
        X = X - 0.02 * lamb.direction(X, G)
        off = 0
        for p in module.parameters():
            p.grad = G[0, off:off + p.numel()].view_as(p).clone()
            off += p.numel()
        opt.step()
        torch.testing.assert_close(X[0], flat(module), rtol=1e-10, atol=1e-12)


def test_lamb_preset_single_worker_equals_timm_lamb(tiny_cfg, synthetic):
    pytest.importorskip("timm")
    T, lr, wd = 10, 0.01, 0.01
    cfg = tiny_cfg.replace(algo="lamb", workers=1, batch=16, steps=T, lr=lr, weight_decay=wd, schedule="cosine")
    tr = make_trainer(cfg, synthetic)
    module = copy.deepcopy(tr.workers.module)
    opt = _timm_lamb(module, lr, cfg.param("betas"), cfg.param("eps"), wd)
    for t in range(T):
        x, y = tr.batch(t)
        opt.param_groups[0]["lr"] = opt.param_groups[1]["lr"] = cosine(t, lr, T)
        opt.zero_grad()
        F.cross_entropy(module(x[0].double()), y[0]).backward()
        opt.step()
        do_step(tr, t)
    torch.testing.assert_close(tr.workers.X[0], flat(module), **EQ)


def test_d_lamb_single_worker_on_complete_equals_lamb(tiny_cfg, synthetic):
    cfg = tiny_cfg.replace(workers=1, batch=16, lr=0.01, weight_decay=0.01, schedule="cosine")
    X_l = run_steps(cfg.replace(algo="lamb"), synthetic)
    X_d = run_steps(cfg.replace(algo="d-lamb", topology="complete"), synthetic)
    torch.testing.assert_close(X_d, X_l, **EQ)


# ----------------------------------------------------------------------------------------------
# mixing


def _families():
    return [name for name in topologies.TOPOLOGIES.names() if name != "file"]


@pytest.mark.parametrize("n", [8, 16])
@pytest.mark.parametrize("name", _families())
def test_simulated_mix_equals_dense_product(name, n):
    topo = topologies.get_topology(name, n)
    comm = SimulatedComm(n, topo, CPU)
    g = torch.Generator().manual_seed(n)
    for t in range(2 * topo.period + 1):
        X = torch.randn(n, 7, generator=g, dtype=torch.float64)
        expect = torch.from_numpy(topo.weights(t)) @ X
        # at most n products of O(1) numbers summed: a few ulps of float64
        torch.testing.assert_close(comm.mix(X, t), expect, rtol=1e-12, atol=1e-14)
        # float32 rows are mixed with the same weights rounded to float32: ~1e-7
        torch.testing.assert_close(comm.mix(X.float(), t), expect.float(), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# full runs through bench.runner.run


def _read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_run_is_reproducible(tiny_cfg, tmp_path):
    cfg = tiny_cfg.replace(algo="dsgd", grad="adsam", sigma=0.05, topology="ring", steps=6, schedule="cosine",
                           eval_every=2)
    outs = []
    for folder, seed in (("a", 0), ("b", 0), ("c", 1)):
        s = run(cfg.replace(results=str(tmp_path / folder), seed=seed), force=True)
        assert s["status"] == "completed"
        outs.append(s)
    models = [torch.load(f"{s['run_dir']}/model.pt") for s in outs]
    assert models[0].keys() == models[1].keys()
    for k in models[0]:
        assert torch.equal(models[0][k], models[1][k]), k
    assert any(not torch.equal(models[0][k], models[2][k]) for k in models[0])  # the seed matters
    rows = [_read_csv(f"{s['run_dir']}/metrics.csv") for s in outs]
    assert len(rows[0]) == 3
    # wall-clock times are the only columns allowed to differ
    strip = lambda rs: [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in rs]  # noqa: E731
    assert "train_seconds" in rows[0][0] and "test_acc" in rows[0][0]
    assert strip(rows[0]) == strip(rows[1])
    assert strip(rows[0]) != strip(rows[2])


def _mlp_flops(batch: int, d_in: int = 16, width: int = 128, k: int = 4) -> int:
    """Matmul FLOPs of one forward + backward of the MLP (the input needs no gradient)."""
    fwd = 2 * batch * (d_in * width + width * width + width * k)
    grad_w = fwd
    grad_in = 2 * batch * (width * width + width * k)
    return fwd + grad_w + grad_in


@pytest.mark.parametrize("algo", PRESETS.names())
def test_every_preset_runs_and_reports_costs(tiny_cfg, tmp_path, algo):
    n, samples = 4, 3
    cfg = tiny_cfg.replace(algo=algo, topology="ring", workers=n, steps=5, samples=samples, eval_every=1,
                           lr=0.01 if "lamb" in algo else 0.1, precision="fp32", stop_on_collapse=False)
    s = run(cfg, force=True)
    on_disk = json.loads((tmp_path / "results" / s["run_id"] / "summary.json").read_text())
    # 5 steps may still be at chance (collapsed, a result like any other): the costs are what is tested
    assert on_disk["status"] in ("completed", "collapsed") and on_disk["steps"] == 5 and on_disk["algo"] == algo
    for k in ("test_acc", "test_loss", "train_loss", "consensus_distance"):
        assert on_disk[k] is not None and math.isfinite(on_disk[k])
    # expectations from the components themselves: gradient evaluations, messages per step
    evals = component(cfg, "grad", layout=ParamLayout(build_model("mlp", (1, 16), 4))).grad_evals
    assert on_disk["grad_evals_per_step"] == evals
    assert on_disk["flops_per_step"] > 0
    assert on_disk["flops_per_step"] == evals * _mlp_flops(cfg.batch)
    d = on_disk["params"]
    assert d == 16 * 128 + 128 + 128 * 128 + 128 + 128 * 4 + 4
    topo = topologies.get_topology("ring", n) if cfg.needs_topology() else None
    rule = component(cfg, "comm", layout=ParamLayout(build_model("mlp", (1, 16), 4)), n_local=n, total_steps=5,
                     topology=topo)
    assert on_disk["bytes_per_step"] == pytest.approx(rule.bytes_per_step(n, topo, d, 4))
    # the messages the run really sent through the simulated backend (counted per call, as if every worker
    # were its own process) are what the rule predicts
    assert on_disk["bytes_sent_per_worker_step"] == pytest.approx(on_disk["bytes_per_step"], rel=1e-12)
    assert len(_read_csv(tmp_path / "results" / s["run_id"] / "metrics.csv")) == 5


def test_divergence_is_a_result(tiny_cfg, tmp_path):
    # (stop_on_collapse off: at lr 1e6 the first evaluations are also at chance, which would end it first)
    s = run(tiny_cfg.replace(algo="dsgd", topology="ring", lr=1e6, steps=10, eval_every=1, stop_on_collapse=False),
            force=True)
    run_dir = tmp_path / "results" / s["run_id"]
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["status"] == "diverged"
    assert isinstance(on_disk["diverged_step"], int) and 0 <= on_disk["diverged_step"] < 10
    assert on_disk["test_acc"] is None
    assert not (run_dir / "model.pt").exists()
    assert len(_read_csv(run_dir / "metrics.csv")) == on_disk["diverged_step"]  # one row per finished step


# ----------------------------------------------------------------------------------------------
# every registered component honours the contract of bench/spec.py


def _all_components():
    from algorithms.base import registries

    return [(reg, name) for reg in registries() for name in reg]


@pytest.mark.parametrize("reg,name", _all_components(), ids=lambda v: getattr(v, "kind", v))
def test_component_contract(reg, name):
    from bench.spec import Component, LocalOptimizer, Oracle, Rule

    cls = reg.get(name)
    assert issubclass(cls, Component) and cls.name == name and reg.help(name)
    names = [p.name for p in cls.params]
    assert len(names) == len(set(names)), "a parameter declared twice"
    for p in cls.params:
        assert p.help and p.name.isidentifier()
        p.validate(p.default, f"{name}.{p.name}")  # the default passes its own check
        assert p.coerce(p.default, p.name) == p.default
    protocol = {"gradient oracle": Oracle, "local optimizer": LocalOptimizer, "communication rule": Rule}.get(reg.kind)
    if protocol is None:
        return
    kind = {"gradient oracle": "grad", "local optimizer": "opt", "communication rule": "comm"}[reg.kind]
    cfg = RunConfig(dataset="synthetic", model="mlp", workers=4, **{kind: name})
    module = build_model("mlp", (1, 16), 4)
    obj = component(cfg, kind, layout=ParamLayout(module), n_local=4,
                    topology=topologies.get_topology("ring", 4) if kind == "comm" else None)
    assert isinstance(obj, protocol)
    if kind == "grad":
        assert isinstance(obj.grad_evals, int) and obj.grad_evals >= 1
    if kind == "comm":
        topo = topologies.get_topology("ring", 4) if obj.needs_topology else None
        assert obj.sends_per_step(4, topo) >= 0
    state = obj.state_dict()
    assert set(state) == set(cls.state_keys)
    obj.load_state_dict(state)


@pytest.mark.parametrize("order", ["cta", "atc"])
def test_gossip_rounds_mix_with_the_matrix_power(tiny_cfg, synthetic, tmp_path, order):
    """gossip.rounds = k mixes with W^k: D-SGD with 2 rounds on a ring == D-SGD over the file topology W^2;
    rounds = 1 is D-SGD itself (the same run id as the default); the bytes sent double."""
    n = 5
    W = topologies.get_topology("ring", n).weights(0)
    path = tmp_path / "ring_squared.npy"
    np.save(path, W @ W)
    cfg = tiny_cfg.replace(algo="dsgd", workers=n, steps=6, order=order)
    X2 = run_steps(cfg.replace(topology="ring", **{"gossip.rounds": 2}), synthetic)
    torch.testing.assert_close(X2, run_steps(cfg.replace(topology=f"file:{path}"), synthetic), **EQ)
    X1 = run_steps(cfg.replace(topology="ring"), synthetic)
    assert (X2 - X1).abs().max() > 1e-6
    n_train = len(synthetic.y_train)
    one = cfg.replace(topology="ring", **{"gossip.rounds": 1}).validate().resolve(n_train, "mlp")
    assert one.run_id() == cfg.replace(topology="ring").validate().resolve(n_train, "mlp").run_id()
    topo = topologies.get_topology("ring", n)
    assert component(cfg.replace(**{"gossip.rounds": 2}), "comm").bytes_per_step(n, topo, 100, 4) == \
        2 * component(cfg, "comm").bytes_per_step(n, topo, 100, 4)
