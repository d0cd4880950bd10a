"""Sharpness metrics: exact Hessians on tiny models, HVP methods agree, nothing is changed; landscapes."""

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
from bench.hessian import HVP, hessian_subset, hessian_trace, measure_sharpness, top_eigenvalue
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
    assert set(out) == {"top_eig", "hessian_method", "hessian_hvps", "hessian_residual", "hessian_seconds",
                        "hessian_samples", "hessian_trace", "hessian_trace_stderr"}
    assert out["hessian_samples"] == 64 and out["top_eig"] > 0 and out["hessian_method"] == "lanczos"
    module.eval()
    again = measure_sharpness(module, data, idx, method="power")
    assert not module.training
    assert "hessian_trace" not in again
    assert again["top_eig"] == pytest.approx(out["top_eig"], rel=2e-2)


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
