"""CHOCO-SGD and its compressors: each compressor against an independent implementation, the CHOCO
update against the float64 formula, CHOCO(identity, gamma = 1) == D-SGD, bytes, runs.

References are written here: top-k by a full argsort, sign packing by numpy.packbits, QSGD's
unbiasedness by Monte Carlo, CHOCO's update from the formula in the docstring of algorithms/choco.py.
"""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import topologies
from algorithms.compressors import COMPRESSORS, compressor_seed
from bench.config import RunConfig
from bench.errors import UserError
from bench.models import build_model
from bench.runner import run
from bench.workers import ParamLayout
from helpers import component
from test_algorithms import cosine, do_step, grads64, make_trainer, perturb_rows, run_steps

# Float64 runs and references, as in tests/test_algorithms.py: correct code agrees to ~1e-13 relative
# after <= 10 steps; 1e-9 leaves a 1e4 margin, and a constant wrong by 1e-6 relative moves the
# parameters by far more (test_choco_steps_match_formula checks this for gamma).
EQ = dict(rtol=1e-9, atol=1e-12)
NAMES = ("identity", "top-k", "random-k", "qsgd", "sign")
SEED, STEP = 5, 3


@pytest.fixture
def tiny_cfg(tiny_cfg):
    return tiny_cfg.replace(precision="fp64")


def small_layout() -> ParamLayout:
    """Tensors of 15, 3, 6 and 2 entries: d = 26, not a multiple of 8 (sign padding)."""
    return ParamLayout(nn.Sequential(nn.Linear(5, 3), nn.Linear(3, 2)))


def compressor(name: str, layout=None, **params):
    """The compressor as the runner builds it: a component named by choco.compressor."""
    cfg = RunConfig(algo="choco", compressor=name, **params)
    return component(cfg, "choco.compressor", layout=layout or small_layout())


def rand(m: int, d: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(m, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def slots(layout):
    return [(s.start, s.stop) for s in layout.slots]


def top_k_ref(V: torch.Tensor, layout, ratio: float) -> torch.Tensor:
    """Per tensor and row: keep the k = max(1, int(d_l ratio)) entries of largest |v| (full argsort)."""
    out = torch.zeros_like(V)
    for a, b in slots(layout):
        k = max(1, int((b - a) * ratio))
        for r in range(V.shape[0]):
            keep = a + torch.argsort(V[r, a:b].abs(), descending=True)[:k]
            out[r, keep] = V[r, keep]
    return out


def payload_bytes_per_row(payload: dict) -> int:
    return sum(t[0].numel() * t.element_size() for t in payload.values())


# ----------------------------------------------------------------------------------------------
# compressors


@pytest.mark.parametrize("ratio", [0.1, 0.3, 1.0])
def test_top_k_keeps_the_k_largest_per_tensor(ratio):
    layout = small_layout()
    c = compressor("top-k", ratio=ratio)
    V = rand(3, layout.d)
    p = c.encode(V, range(3), STEP, SEED)
    assert p["indices"].dtype == torch.int64 and p["values"].dtype == V.dtype
    ks = [max(1, int((b - a) * ratio)) for a, b in slots(layout)]
    assert p["values"].shape == p["indices"].shape == (3, sum(ks))
    torch.testing.assert_close(c.decode(p), top_k_ref(V, layout, ratio), rtol=0, atol=0)
    if ratio < 1:  # the 2-entry tensor still sends one value: k_l = max(1, ...)
        assert (c.decode(p)[:, 24:] != 0).sum(1).tolist() == [1, 1, 1]


def test_random_k_sends_the_drawn_entries():
    layout = small_layout()
    c = compressor("random-k", ratio=0.4)
    ks = [max(1, int((b - a) * 0.4)) for a, b in slots(layout)]
    V = rand(4, layout.d)
    p = c.encode(V, range(4), STEP, SEED)
    idx = p["indices"]
    # the draw: torch.randperm per tensor from the generator of (seed, worker, step), tensors in order
    for w in range(4):
        gen = torch.Generator().manual_seed(compressor_seed(SEED, w, STEP))
        expect = torch.cat([torch.randperm(b - a, generator=gen)[:k] + a for (a, b), k in zip(slots(layout), ks)])
        assert torch.equal(idx[w], expect)
    # k distinct entries of each tensor; their values, unscaled, and zeros elsewhere
    off = 0
    for (a, b), k in zip(slots(layout), ks):
        block = idx[:, off:off + k]
        off += k
        assert ((block >= a) & (block < b)).all()
        assert all(len(set(row.tolist())) == k for row in block)
    dense = c.decode(p)
    mask = torch.zeros_like(V, dtype=torch.bool).scatter_(1, idx, True)
    torch.testing.assert_close(dense, torch.where(mask, V, torch.zeros_like(V)), rtol=0, atol=0)
    # rows of workers 2, 3 on a rank of their own draw the same; another step draws differently
    sub = c.encode(V[2:], range(2, 4), STEP, SEED)
    assert torch.equal(sub["indices"], idx[2:]) and torch.equal(sub["values"], p["values"][2:])
    assert not torch.equal(c.encode(V, range(4), STEP + 1, SEED)["indices"], idx)
    # unbiased: the kept entries times d_l / k_l
    u = compressor("random-k", ratio=0.4, unbiased=True)
    gain = torch.cat([torch.full((k,), (b - a) / k, dtype=torch.float64) for (a, b), k in zip(slots(layout), ks)])
    torch.testing.assert_close(u.encode(V, range(4), STEP, SEED)["values"], p["values"] * gain, rtol=1e-15, atol=0)


def test_random_k_draws_uniformly():
    """Each entry is kept with probability k_l / d_l. N = 20000 workers' draws: the binomial frequency's
    std is sqrt(p (1-p) / N) <= 0.0036; 5 std over 26 entries fails by chance with probability ~1e-5."""
    layout, N = small_layout(), 20000
    c = compressor("random-k", ratio=0.4)
    V = rand(1, layout.d).expand(N, -1)
    freq = (c.decode(c.encode(V, range(N), STEP, SEED)) != 0).double().mean(0)
    p = torch.cat([torch.full((b - a,), max(1, int((b - a) * 0.4)) / (b - a), dtype=torch.float64)
                   for a, b in slots(layout)])
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / N).sqrt() + 1e-12).all()


@pytest.mark.parametrize("bits", [1, 2, 7])
def test_qsgd_codes_and_unbiased_in_expectation(bits):
    """Q(v)_l = ||v_l|| sign(v) xi / s, xi = floor(l) or floor(l) + 1 with P(+1) = l - floor(l), l = s|v|/||v_l||.

    E[Q] = v. Monte Carlo over N = 8000 workers' draws (fixed seed): each entry of Q is a scaled Bernoulli
    with std <= ||v_l|| / (2 s), so the mean's std is <= ||v_l|| / (2 s sqrt(N)); the tolerance is 5 of
    those (26 entries: chance failure ~1e-5). Rounding down (the biased quantizer) misses it by far.
    """
    layout, N = small_layout(), 8000
    s = 2**bits - 1
    c = compressor("qsgd", bits=bits, scale=False)  # the choco preset sets scale = True
    v = rand(1, layout.d, seed=1)
    p = c.encode(v.expand(N, -1), range(N), STEP, SEED)
    assert p["codes"].dtype == torch.int8 and p["norms"].shape == (N, 4)
    norms = torch.stack([v[0, a:b].norm() for a, b in slots(layout)])
    torch.testing.assert_close(p["norms"], norms.expand(N, -1), rtol=0, atol=0)
    level = torch.cat([s * v[0, a:b].abs() / v[0, a:b].norm() for a, b in slots(layout)])
    xi = p["codes"].abs().double()
    assert ((xi == level.floor()) | (xi == level.floor() + 1)).all() and xi.max() <= s
    sent = p["codes"] != 0
    assert (p["codes"].sign().double() == v.sign().expand(N, -1))[sent].all()
    Q = c.decode(p)
    per_entry = norms[c.layer_of]  # ||v_l|| on the entries of tensor l
    torch.testing.assert_close(Q, v.sign() * per_entry * xi / s, rtol=1e-15, atol=0)
    tol = 5 * per_entry / (2 * s * math.sqrt(N))
    assert ((Q.mean(0) - v[0]).abs() <= tol).all()
    floor_q = v[0].sign() * per_entry * level.floor() / s
    assert ((floor_q - v[0]).abs() > tol).any()
    # scale: the reference's is_biased contraction 1 / (1 + min(d_l / s^2, sqrt(d_l) / s)) per tensor
    cs = compressor("qsgd", bits=bits, scale=True)
    scale = torch.tensor([1 / (1 + min((b - a) / s**2, math.sqrt(b - a) / s)) for a, b in slots(layout)],
                         dtype=torch.float64)
    ps = cs.encode(v.expand(4, -1), range(4), STEP, SEED)
    assert torch.equal(ps["codes"], p["codes"][:4])
    torch.testing.assert_close(cs.decode(ps), Q[:4] * scale[c.layer_of], rtol=1e-15, atol=0)


def test_sign_packs_bits_and_scales_per_tensor():
    layout = small_layout()
    c = compressor("sign")
    V = rand(3, layout.d)
    V[1, 4] = 0.0  # sign(0) is sent as +1
    p = c.encode(V, range(3), STEP, SEED)
    assert p["signs"].dtype == torch.uint8 and p["signs"].shape == (3, math.ceil(layout.d / 8))
    assert np.array_equal(p["signs"].numpy(), np.packbits((V >= 0).numpy(), axis=1))
    expect = torch.zeros_like(V)
    for a, b in slots(layout):
        sgn = torch.where(V[:, a:b] >= 0, 1.0, -1.0).double()
        expect[:, a:b] = V[:, a:b].abs().sum(1, keepdim=True) / (b - a) * sgn
    torch.testing.assert_close(c.decode(p), expect, rtol=1e-15, atol=0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_payload_rows_decode_and_bytes(name, dtype):
    """decode(encode(V)) is [m, d] in V's dtype; any subset of payload rows decodes to those rows (a rank
    decodes its received rows); message_bytes == the bytes of one row of the payload, computed in closed form."""
    layout = small_layout()
    c = compressor(name)
    V = rand(4, layout.d, dtype=dtype)
    p = c.encode(V, range(4), STEP, SEED)
    assert all(t.shape[0] == 4 for t in p.values())
    dense = c.decode(p)
    assert dense.shape == V.shape and dense.dtype == dtype
    torch.testing.assert_close(c.decode({k: t[1:3] for k, t in p.items()}), dense[1:3], rtol=0, atol=0)
    es = V.element_size()
    assert c.message_bytes(layout.d, es) == payload_bytes_per_row(p)
    k = sum(max(1, int((b - a) * 0.1)) for a, b in slots(layout))  # default ratio 0.1: 1 + 1 + 1 + 1
    expected = {"identity": 26 * es, "top-k": k * (es + 8), "random-k": k * (es + 8),
                "qsgd": 26 + 4 * es, "sign": 4 + 4 * es}[name]
    assert c.message_bytes(layout.d, es) == expected


@pytest.mark.parametrize("name", NAMES)
def test_zero_vector_is_sent_as_zero(name):
    c = compressor(name)
    Z = torch.zeros(2, 26, dtype=torch.float64)
    out = c.decode(c.encode(Z, range(2), STEP, SEED))
    assert torch.equal(out, Z)


def test_compressor_parameters_are_checked():
    for kw, flag in ((dict(compressor="qsgd", bits=8), "--bits"), (dict(compressor="qsgd", bits=0), "--bits"),
                     (dict(compressor="top-k", ratio=0.0), "--ratio"), (dict(gamma=0.0), "--gamma")):
        with pytest.raises(UserError, match=flag):
            RunConfig(algo="choco", **kw).validate()
    with pytest.raises(UserError, match="did you mean 'top-k'"):
        RunConfig(algo="choco", compressor="topk").validate()


# ----------------------------------------------------------------------------------------------
# the CHOCO update


def choco_reference(tr, X, T, gamma, hat_init, W, wd=5e-4, mu=0.9):
    """Yield (X, xhat, s) after each step: the float64 formula of algorithms/choco.py with top-k 10%."""
    xhat = X.clone() if hat_init == "x0" else torch.zeros_like(X)
    s = xhat.clone()
    m = None
    for t in range(T):
        x, y = tr.batch(t)
        g = grads64(tr.workers.module, X, x, y) + wd * X
        m = g.clone() if m is None else mu * m + g
        X = X - cosine(t, tr.cfg.lr, T) * m + gamma * (s - xhat)
        q = top_k_ref(X - xhat, tr.workers.layout, 0.1)
        xhat = xhat + q
        s = s + W @ q
        yield X, xhat, s


@pytest.mark.parametrize("hat_init", ["zero", "x0"])
def test_choco_steps_match_formula(tiny_cfg, synthetic, hat_init):
    """x^{t+1} = x^t - lr U + gamma (s - xhat); q = topk(x^{t+1} - xhat); xhat += q; s += W q (ring of 4,
    cosine lr, momentum and weight decay). "x0" starts from the common x^0 (s = W x^0 = x^0), "zero" from
    different rows (the hats are 0 whatever X is)."""
    T, gamma, n = 4, 0.4, 4
    cfg = tiny_cfg.replace(algo="choco", topology="ring", workers=n, steps=T, schedule="cosine", hat_init=hat_init)
    tr = make_trainer(cfg, synthetic)
    X = perturb_rows(tr) if hat_init == "zero" else tr.workers.X.double().clone()
    W = torch.from_numpy(topologies.get_topology("ring", n).weights(0))
    ref = choco_reference(tr, X, T, gamma, hat_init, W)
    wrong = choco_reference(tr, X, T, gamma * (1 + 1e-6), hat_init, W)  # gamma off by 1e-6 relative
    rule = tr.algo.rule
    for t in range(T):
        Xr, xhat, s = next(ref)
        Xw, _, _ = next(wrong)
        do_step(tr, t)
        torch.testing.assert_close(tr.workers.X.double(), Xr, **EQ)
        torch.testing.assert_close(rule.xhat, xhat, **EQ)
        torch.testing.assert_close(rule.s, s, **EQ)
        assert (xhat - Xr).abs().max() > 1e-3  # top-k left most of x - xhat unsent: the hats matter
    with pytest.raises(AssertionError):
        torch.testing.assert_close(Xw, Xr, **EQ)


@pytest.mark.parametrize("hat_init", ["zero", "x0"])
def test_choco_identity_gamma_one_equals_dsgd(tiny_cfg, synthetic, hat_init):
    """CHOCO with Q = identity and gamma = 1 is D-SGD (cta: x <- W x - lr U), from the common start x^0,
    without weight decay: CHOCO's local step puts SGD's weight decay at the pre-mix x (epfml's order),
    D-SGD's cta order at the mixed W x (the reference codes of D-SGD), so with wd > 0 they differ by
    lr wd (W x - x); momentum acts on the same g in both.

    Claim: after every step t >= 1, xhat^t = x^t and s^t = W xhat^t = W x^t. Then step t computes
    x^{t+1} = x^t - lr U + 1 (s^t - xhat^t) = x^t - lr U + W x^t - x^t = W x^t - lr U (D-SGD, U at x^t),
    and q = x^{t+1} - xhat^t gives xhat^{t+1} = x^{t+1}, s^{t+1} = W x^t + W q = W x^{t+1}: the claim at
    t + 1. Step 0: with hat_init "x0" the claim holds at t = 0 (xhat = x^0, s = x^0 = W x^0 since every
    row is x^0); with "zero", x^1 = x^0 - lr U + 0 = W x^0 - lr U because W x^0 = x^0, and then
    xhat^1 = 0 + x^1, s^1 = W x^1. In floating point xhat = xhat + (x - xhat) equals x up to rounding,
    hence float64 and EQ (s accumulates W q rather than recomputing W x).
    """
    cfg = tiny_cfg.replace(topology="ring", schedule="cosine", steps=10, weight_decay=0.0)
    X_d = run_steps(cfg.replace(algo="dsgd", order="cta"), synthetic)
    X_c = run_steps(cfg.replace(algo="choco", compressor="identity", gamma=1.0, hat_init=hat_init), synthetic)
    torch.testing.assert_close(X_c, X_d, **EQ)
    assert (X_d[0] - X_d[1]).abs().max() > 1e-6  # the workers differ: mixing did something
    X_g = run_steps(cfg.replace(algo="choco", compressor="identity", gamma=0.9, hat_init=hat_init), synthetic)
    assert (X_g - X_d).abs().max() > 1e-6


# ----------------------------------------------------------------------------------------------
# bytes and runs


def mlp_layout() -> ParamLayout:
    return ParamLayout(build_model("mlp", (1, 16), 4))


@pytest.mark.parametrize("topology,n", [("ring", 4), ("ring", 8), ("one-peer-exp", 8), ("complete", 4)])
@pytest.mark.parametrize("name", NAMES)
def test_bytes_per_step(topology, n, name):
    """Messages per worker per step (off-diagonal nonzeros of W(t), averaged over rows and the period)
    times one message: top-k / random-k k_l (4 + 8) bytes, qsgd d + 4 L, sign ceil(d / 8) + 4 L, identity 4 d."""
    layout = mlp_layout()
    topo = topologies.get_topology(topology, n)
    rule = component(RunConfig(algo="choco", compressor=name), "comm", layout=layout, n_local=n, topology=topo)
    sizes = [s.stop - s.start for s in layout.slots]
    d, L = sum(sizes), len(sizes)
    msg = {"identity": 4 * d, "top-k": sum(max(1, int(k * 0.1)) for k in sizes) * 12,
           "random-k": sum(max(1, int(k * 0.1)) for k in sizes) * 12,
           "qsgd": d + 4 * L, "sign": math.ceil(d / 8) + 4 * L}[name]
    sends = np.mean([((topo.weights(t) != 0).sum() - (np.diag(topo.weights(t)) != 0).sum()) / n
                     for t in range(topo.period)])
    assert rule.bytes_per_step(n, topo, d, 4) == pytest.approx(sends * msg, rel=1e-12)
    assert rule.sends_per_step(n, topo) == pytest.approx(sends * msg / (4 * d), rel=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_runs_with_each_compressor(tiny_cfg, tmp_path, name):
    params = {"choco.compressor": name} | ({"qsgd.bits": 4} if name == "qsgd" else {})
    cfg = tiny_cfg.replace(topology="ring", steps=5, precision="fp32").replace(algo="choco", **params)
    s = run(cfg, force=True)
    run_dir = tmp_path / "results" / s["run_id"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["algo"] == "choco"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["params"]["choco.compressor"] == name
    c = component(cfg, "choco.compressor", layout=mlp_layout())
    assert summary["bytes_per_step"] == pytest.approx(2 * c.message_bytes(summary["params"], 4))


def test_compressor_options_reach_the_compressor():
    """--set choco.compressor=qsgd --set qsgd.bits=3 (and the short names) build that compressor; the
    choco preset turns on the scaled (is_biased) QSGD, as the reference's example scripts do."""
    cfg = RunConfig(algo="choco", **{"choco.compressor": "qsgd", "qsgd.bits": 3})
    c = component(cfg, "choco.compressor", layout=small_layout())
    assert c.s == 7 and c.c[0] < 1
    assert RunConfig.from_dict({"algo": "choco", "choco": {"compressor": "sign"}}).param("choco.compressor") == "sign"
    r = RunConfig(algo="choco", compressor="random-k", ratio=0.5).hyper()
    assert [a.name for a in r.active] == ["plain", "sgd", "choco", "random-k"]
    assert r.values["random-k.ratio"] == 0.5
    assert COMPRESSORS.get("qsgd").param("scale").default is False


def test_rule_built_alone_uses_the_compressor_defaults():
    """tests.helpers.component builds one component with its parameters' values: a compressor name."""
    rule = component(RunConfig(algo="choco"), "comm", layout=mlp_layout(), n_local=4,
                     topology=topologies.get_topology("ring", 4))
    assert rule.compressor.name == "top-k" and rule.compressor.ks[0] == int(16 * 128 * 0.1)
