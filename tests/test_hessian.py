"""Sharpness metrics: exact Hessians on tiny models, HVP methods agree, nothing is changed; landscapes."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from bench import metrics, results
from bench.data import Dataset
from bench.errors import UserError
from bench.hessian import HVP, ScaledHVP, hessian_subset, hessian_trace, measure_sharpness, top_eigenvalue
from bench.landscape import (ALPHA_LABEL, load_run_model, loss_curve, loss_surface, plot_landscape,
                             random_direction)
from bench.models import MODELS, build_model
from bench.workers import ParamLayout

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_data(shape, n=96, k=4, seed=0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, k, (n,), generator=g)
    return Dataset("fake", x, y, x[:16].clone(), y[:16].clone(), k, "mlp")


# ---------------------------------------------------------------------------------------------
# A model small enough to form its Hessian


def tiny_problem():
    """A tanh MLP (6-12-4, 136 parameters) in float64, trained a little, with its exact Hessian."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(80, 6, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    opt = torch.optim.SGD(module.parameters(), lr=0.5)
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(module(x), y).backward()
        opt.step()
    module.zero_grad(set_to_none=True)
    layout = ParamLayout(module)

    def loss_of(flat):
        return F.cross_entropy(functional_call(module, layout.row_views(flat), (x,)), y)

    H = torch.autograd.functional.hessian(loss_of, layout.flatten(module).clone(), vectorize=True)
    H = 0.5 * (H + H.T)
    return module, x, y, H


@pytest.fixture(scope="module")
def tiny():
    return tiny_problem()


def test_tiny_hvp_matches_exact_hessian(tiny):
    module, x, y, H = tiny
    hvp = HVP(module, x, y, chunk=32)  # three chunks of 32, 32, 16: the weighting must be exact
    v = torch.randn(hvp.d, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(hvp(v), H @ v, rtol=1e-9, atol=1e-12)
    assert hvp.count == 1


def test_top_eigenvalue_matches_exact(tiny):
    module, x, y, H = tiny
    exact = torch.linalg.eigvalsh(H)
    lam_max = exact[-1].item()
    assert lam_max > 0 and lam_max > abs(exact[0].item())  # power iteration finds the largest magnitude
    hvp = HVP(module, x, y)
    lz = top_eigenvalue(hvp, hvp.d, method="lanczos")
    pw = top_eigenvalue(hvp, hvp.d, method="power")
    assert lz["top_eig"] == pytest.approx(lam_max, rel=1e-2)
    assert pw["top_eig"] == pytest.approx(lam_max, rel=1e-2)
    # hvps counts every product, including Lanczos's one extra product for the residual.
    assert lz["hvps"] - 1 <= 30
    assert pw["hvps"] <= 100
    assert hvp.count == lz["hvps"] + pw["hvps"]
    assert lz["residual"] < 1e-2 and lz["converged"]
    assert set(lz) >= {"top_eig", "method", "hvps", "residual", "seconds"}


def test_trace_within_three_stderr(tiny):
    module, x, y, H = tiny
    hvp = HVP(module, x, y)
    tr = hessian_trace(hvp, hvp.d, probes=100, seed=0)
    assert tr["probes"] == 100 and tr["hvps"] == 100 and tr["stderr"] > 0
    assert abs(tr["trace"] - torch.trace(H).item()) < 3 * tr["stderr"]
    assert hessian_trace(hvp, hvp.d, probes=100, seed=0)["trace"] == tr["trace"]  # seeded


def test_quadratic_known_spectrum():
    d = 60
    rng = np.random.default_rng(5)
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    spectrum = np.concatenate([np.linspace(-3.0, 4.0, d - 2), [6.0, 10.0]])
    A = torch.from_numpy(Q @ np.diag(spectrum) @ Q.T)
    hvp = lambda v: A @ v  # noqa: E731  (the Hessian of 0.5 x^T A x)
    for method in ("lanczos", "power"):
        r = top_eigenvalue(hvp, d, method=method, tol=1e-6, max_iter=200)
        assert r["top_eig"] == pytest.approx(10.0, rel=1e-3), method
        assert r["residual"] < 0.05
    tr = hessian_trace(hvp, d, probes=400)
    assert abs(tr["trace"] - spectrum.sum()) < 4 * tr["stderr"]
    # Lanczos finds the algebraically largest eigenvalue even when a negative one is larger in magnitude.
    B = torch.from_numpy(Q @ np.diag(np.concatenate([[-20.0], np.linspace(-1.0, 5.0, d - 1)])) @ Q.T)
    assert top_eigenvalue(lambda v: B @ v, d, method="lanczos")["top_eig"] == pytest.approx(5.0, rel=1e-3)


def close_top_pair(d=20, c1=0.3, c2=0.6, seed=0):
    """A symmetric A (float64) with eigenvalues 10 and 9.9 on top, the rest in [0, 5], whose
    eigenvectors are placed so that top_eigenvalue's start vector (default_rng(seed), normalised)
    has components c1 on the top eigenvector and c2 > c1 on the second: the trap for power iteration."""
    v0 = np.random.default_rng(seed).standard_normal(d)
    v0 /= np.linalg.norm(v0)

    def reflect(a):  # the Householder reflection that swaps e1 and the unit vector a (symmetric, orthogonal)
        u = np.eye(d)[0] - a
        return np.eye(d) - 2 * np.outer(u, u) / (u @ u)

    c = np.concatenate([[c1, c2], np.full(d - 2, np.sqrt((1 - c1 ** 2 - c2 ** 2) / (d - 2)))])
    U = reflect(v0) @ reflect(c)  # U^T v0 = reflect(c) e1 = c
    spectrum = np.concatenate([[10.0, 9.9], np.linspace(0.0, 5.0, d - 2)])
    A = U @ np.diag(spectrum) @ U.T
    np.testing.assert_allclose(U.T @ v0, c, atol=1e-12)
    return torch.from_numpy(0.5 * (A + A.T)), v0


def test_power_iteration_close_top_pair():
    A, v0 = close_top_pair()
    lam_max, tol = 10.0, 1e-3
    # The old rule (stop when lambda changes by < tol relative), inline as the reference: lambda
    # plateaus while the mix of the top two eigenvectors shifts by ~1% per product, so it stops
    # after a handful of products, near 9.9 and well over tol below lambda_max.
    v = torch.from_numpy(v0)
    hv = A @ v
    lam, k = torch.dot(v, hv).item(), 1
    while True:
        prev, v = lam, hv / hv.norm()
        hv, k = A @ v, k + 1
        lam = torch.dot(v, hv).item()
        if abs(lam - prev) < tol * abs(lam):
            break
    assert k < 20 and 9.9 < lam < lam_max - 5 * tol * lam_max
    # The residual rule may only claim convergence within tol |lambda| of lambda_max. The bound
    # relied on: for unit v = alpha u1 + beta u2 (+ decayed rest), ||Av - lambda v|| ~ |alpha beta| * 0.1
    # and lambda_max - lambda ~ beta^2 * 0.1. Power iteration multiplies alpha / beta (0.5 at the
    # start) by 10 / 9.9 per product, so the residual test (|alpha beta| <= ~0.1) is first met at
    # alpha / beta >= ~10, where lambda_max - lambda <= ~1e-3 < tol |lambda|. (From a start with
    # alpha / beta < 0.1 it would pass near 9.9 instead: see the module docstring.)
    short = top_eigenvalue(lambda x: A @ x, 20, method="power", tol=tol, max_iter=100)
    long = top_eigenvalue(lambda x: A @ x, 20, method="power", tol=tol, max_iter=1000)
    for r in (short, long):
        assert not r["converged"] or abs(r["top_eig"] - lam_max) <= tol * abs(r["top_eig"])
    # Deterministic here: the ratio of the top two components grows by 10/9.9 per product, from 0.5
    # to the ~10 the residual needs in ~300 products; 100 are not enough and say so.
    assert not short["converged"] and short["hvps"] == 100 and short["residual"] > tol
    assert long["converged"] and long["hvps"] < 1000 and long["residual"] <= tol
    # Lanczos's Krylov space separates the pair at once.
    lz = top_eigenvalue(lambda x: A @ x, 20, method="lanczos")
    assert lz["converged"] and lz["top_eig"] == pytest.approx(lam_max, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Adaptive sharpness: the top eigenvalue of diag(|w|) H diag(|w|)


def test_adaptive_matches_exact(tiny):
    module, x, y, H = tiny
    data = Dataset("tiny", x, y, x[:8], y[:8], 4, "mlp")
    out = measure_sharpness(module, data, torch.arange(len(y)))
    t = ParamLayout(module).flatten(module).abs()
    exact = torch.linalg.eigvalsh(t[:, None] * H * t[None, :])
    lam1, lam2 = exact[-1].item(), exact[-2].item()
    theta, r = out["adaptive_top_eig"], out["adaptive_hessian_residual"] * abs(out["adaptive_top_eig"])
    # The tolerance is the a-posteriori bound on a Ritz value: theta is a Rayleigh quotient, so
    # theta <= lambda_1, and by Kato-Temple lambda_1 - theta <= ||r||^2 / (theta - lambda_2) when
    # theta > lambda_2 (here ~7e-11, measured error ~2e-11), plus float64 rounding of the two sides.
    slack = 1e-12 * abs(lam1)
    assert lam2 < theta <= lam1 + slack
    assert lam1 - theta <= r ** 2 / (theta - lam2) + slack
    assert out["adaptive_hessian_hvps"] > 0 and out["adaptive_hessian_seconds"] > 0
    # The same operator by hand: ScaledHVP is v -> |w| * H (|w| * v).
    v = torch.randn(len(t), dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(ScaledHVP(HVP(module, x, y), t)(v), t * (H @ (t * v)), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("a", [4.0, 3.0])  # 4 is exact in binary floating point; 3 adds rounding
def test_adaptive_invariant_to_layer_rescaling(a):
    torch.manual_seed(0)
    m1 = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4)).double()
    m2 = copy.deepcopy(m1)
    with torch.no_grad():  # relu(a z) = a relu(z): layer 1 (weight and bias) x a, layer 2's weight / a
        m2[0].weight.mul_(a)
        m2[0].bias.mul_(a)
        m2[2].weight.div_(a)  # layer 2's bias stays: its pre-activation scale is a * (1/a) = 1
    data = make_data((6,), n=64)
    x = data.x_train.double()
    torch.testing.assert_close(m2(x), m1(x), rtol=1e-12, atol=1e-12)  # the same function
    idx = hessian_subset(len(data.y_train))
    s1, s2 = measure_sharpness(m1, data, idx), measure_sharpness(m2, data, idx)
    ratio = s2["top_eig"] / s1["top_eig"]
    assert ratio > 4 or ratio < 1 / 4  # the plain sharpness is not a property of the function
    assert s2["adaptive_top_eig"] == pytest.approx(s1["adaptive_top_eig"], rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Both HVP methods, every registered model

MODEL_INPUTS = {"mlp": (1, 16), "cnn1d": (1, 40), "cnn": (3, 8, 8), "resnet18": (3, 8, 8),
                "wrn16_4": (3, 8, 8), "wrn28_10": (3, 8, 8)}
BIG = ("resnet18", "wrn28_10")  # millions of parameters: float32 and two samples keep each to seconds


@pytest.mark.parametrize("name", MODELS.names())
def test_hvp_methods_agree(name):
    shape = MODEL_INPUTS.get(name)
    if shape is None:
        pytest.skip(f"no small input for model {name!r}; add it to MODEL_INPUTS")
    big = name in BIG
    dtype = torch.float32 if big else torch.float64
    torch.manual_seed(0)
    module = build_model(name, shape, 5).to(dtype)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for b in module.buffers():
            if b.is_floating_point():
                b.copy_(0.5 + torch.rand(b.shape, generator=g, dtype=b.dtype))
    n = 2 if big else 12
    x = torch.randn(n, *shape, generator=g, dtype=dtype)
    y = torch.randint(0, 5, (n,), generator=g)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    db = HVP(module, x, y, chunk=max(1, n // 2))
    fr = HVP(module, x, y, chunk=max(1, n // 2), method="forward-over-reverse")
    v = torch.randn(db.d, generator=g, dtype=dtype)
    a, b = db(v), fr(v)
    assert a.shape == (db.d,) and torch.isfinite(a).all()
    assert a.norm() > 0
    rtol, atol = (1e-4, 1e-5) if big else (1e-7, 1e-9)
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol * a.abs().max().item())
    for k, t in module.state_dict().items():
        assert torch.equal(t, before[k]), k
    assert all(p.grad is None for p in module.parameters())


# ---------------------------------------------------------------------------------------------
# The protocol: subsets, and measuring changes nothing


def test_hessian_subset_rules():
    assert torch.equal(hessian_subset(4000), torch.arange(4000))
    assert torch.equal(hessian_subset(5000), torch.arange(5000))
    big = hessian_subset(50000)
    assert big.dtype == torch.int64 and len(big) == 2048 and len(set(big.tolist())) == 2048
    assert torch.equal(big, torch.sort(big).values) and int(big.max()) < 50000
    assert torch.equal(big, hessian_subset(50000))  # the same for every algorithm of a comparison
    assert not torch.equal(big, hessian_subset(50000, seed=1))
    assert len(hessian_subset(4000, samples=100)) == 100
    assert len(hessian_subset(100, samples=500)) == 100
    with pytest.raises(UserError):
        hessian_subset(100, samples=-1)


def test_measure_sharpness_changes_nothing():
    torch.manual_seed(0)
    data = make_data((1, 8, 8), n=64)
    module = build_model("cnn", data.input_shape, data.num_classes)
    idx = hessian_subset(len(data.y_train))
    metrics.recalibrate_bn(module, data, idx, 16)
    module.train()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    out = measure_sharpness(module, data, idx, trace=True, probes=4)
    assert module.training
    after = module.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert all(p.grad is None for p in module.parameters())
    adaptive_keys = {"adaptive_top_eig", "adaptive_hessian_hvps", "adaptive_hessian_residual",
                     "adaptive_hessian_seconds"}
    assert set(out) == {"top_eig", "hessian_method", "hessian_hvps", "hessian_residual", "hessian_seconds",
                        "hessian_samples", "hessian_trace", "hessian_trace_stderr"} | adaptive_keys
    assert out["hessian_samples"] == 64 and out["top_eig"] > 0 and out["hessian_method"] == "lanczos"
    assert out["adaptive_top_eig"] > 0
    module.eval()
    again = measure_sharpness(module, data, idx, method="power")
    assert not module.training
    assert "hessian_trace" not in again
    assert again["top_eig"] == pytest.approx(out["top_eig"], rel=2e-2)
    assert again["adaptive_top_eig"] == pytest.approx(out["adaptive_top_eig"], rel=2e-2)
    assert not adaptive_keys & set(measure_sharpness(module, data, idx, adaptive=False))
    for k, t in module.state_dict().items():
        assert torch.equal(t, before[k]), k
    assert all(p.grad is None for p in module.parameters())


# ---------------------------------------------------------------------------------------------
# Landscapes


@pytest.fixture(scope="module")
def bn_run():
    torch.manual_seed(0)
    data = make_data((1, 8, 8), n=48)
    module = build_model("cnn", data.input_shape, data.num_classes)
    idx = hessian_subset(len(data.y_train))
    metrics.recalibrate_bn(module, data, idx, 16)
    return module, data, idx


def test_direction_is_filter_normalised(bn_run):
    module, _, _ = bn_run
    d = random_direction(module, seed=0)
    params = dict(module.named_parameters())
    assert d.keys() == params.keys()
    for name, p in params.items():
        assert d[name].shape == p.shape and d[name].dtype == p.dtype
        if p.dim() <= 1:
            assert torch.count_nonzero(d[name]) == 0, name
        else:
            torch.testing.assert_close(d[name].flatten(1).norm(dim=1), p.detach().flatten(1).norm(dim=1),
                                       rtol=1e-5, atol=1e-7)
    for name, t in random_direction(module, seed=0).items():
        assert torch.equal(t, d[name])


def test_plot_landscape_1d(bn_run, tmp_path):
    module, data, idx = bn_run
    before = {k: v.clone() for k, v in module.state_dict().items()}
    other = build_model("cnn", data.input_shape, data.num_classes)
    metrics.recalibrate_bn(other, data, idx, 16)
    out = tmp_path / "one.png"
    res = plot_landscape([("a", module, data, idx), ("b", other, data, idx)], dim=1, points=9, out=str(out))
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert res["labels"] == ["a", "b"] and len(res["losses"]) == 2
    alphas = res["alphas"]
    assert len(alphas) == 9 and alphas[4] == 0.0 and alphas[0] == -1.0 and alphas[-1] == 1.0
    _, loss = metrics.evaluate(module, data, data.x_train[idx], data.y_train[idx])
    assert res["losses"][0][4] == pytest.approx(loss, rel=1e-6)
    assert res["losses"][0].max() > loss
    for k, t in module.state_dict().items():
        assert torch.equal(t, before[k]), k
    assert ALPHA_LABEL.startswith("alpha")


def test_loss_curve_and_surface_restore(bn_run):
    module, data, idx = bn_run
    module.train()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    d1, d2 = random_direction(module, 0), random_direction(module, 1)
    curve = loss_curve(module, data, idx, d1, [0.0, 0.5])
    surf = loss_surface(module, data, idx, d1, d2, [-0.5, 0.0, 0.5], [0.0, 0.25])
    assert surf.shape == (3, 2)
    assert surf[1, 0] == pytest.approx(curve[0], rel=1e-6) and surf[2, 0] == pytest.approx(curve[1], rel=1e-6)
    assert module.training
    for k, t in module.state_dict().items():
        assert torch.equal(t, before[k]), k


def test_plot_landscape_2d(bn_run, tmp_path):
    module, data, idx = bn_run
    out = tmp_path / "sub" / "two.png"
    res = plot_landscape([("a", module, data, idx)], dim=2, points=5, span=0.5, out=str(out))
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert res["surface"].shape == (5, 5)
    _, loss = metrics.evaluate(module, data, data.x_train[idx], data.y_train[idx])
    assert res["surface"][2, 2] == pytest.approx(loss, rel=1e-6)
    with pytest.raises(UserError):
        plot_landscape([("a", module, data, idx)], dim=3)


def test_load_run_model(tmp_path):
    torch.manual_seed(0)
    run = tmp_path / "run"
    run.mkdir()
    cfg = {"dataset": "synthetic", "model": "mlp", "data_dir": None, "val_fraction": 0.25, "hessian_samples": 0}
    (run / "config.json").write_text(json.dumps(cfg))
    ref = build_model("mlp", (1, 16), 4)
    results.save_model(run / "model.pt", ref.state_dict())
    module, data, idx = load_run_model(run)
    assert len(data.y_train) == 384 and torch.equal(idx, torch.arange(384))
    for k, t in ref.state_dict().items():
        assert torch.equal(module.state_dict()[k], t)
    assert not module.training

    with pytest.raises(UserError, match="does not exist"):
        load_run_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="config.json"):
        load_run_model(tmp_path / "empty")
    (run / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="model.pt") as e:
        load_run_model(run)
    assert "\n" not in str(e.value)
    (run / "model.pt").unlink()
    with pytest.raises(UserError, match="no model.pt"):
        load_run_model(run)
    (run / "config.json").write_text("{broken")
    with pytest.raises(UserError, match="corrupt"):
        load_run_model(run)
