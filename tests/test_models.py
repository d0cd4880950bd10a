"""Models and the Workers executors.

The native executor (batched_forward: batched matmuls, grouped convolutions, BatchNorm
over n*C channels) must compute, worker by worker, exactly what the loop executor
(functional_call of the one module) computes, and both must equal a plain copy of the
module that holds that worker's parameters and BatchNorm buffers.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.errors import UserError
from bench.models import build_model
from bench.workers import ParamLayout, Workers

N = 3
B = 4
K = 5
# Workers and their references run in float64 (precision "fp64"): one forward/backward of these
# models differs between kernels (grouped vs plain convolution, batched vs plain matmul) by a few
# float64 ulps on any CPU and thread count; 1e-12 keeps a 1e3 margin and is still 1e5 below the
# effect of a wrong weight, buffer or worker row (O(1e-2) here).
TOL = dict(rtol=1e-12, atol=1e-12)

BATCHED = [("mlp", (1, 16)), ("cnn1d", (1, 16)), ("cnn1d", (1, 40)), ("cnn", (1, 8, 8)), ("cnn", (3, 8, 8))]
IDS = [f"{m}-{'x'.join(map(str, s))}" for m, s in BATCHED]
WITH_BN = [(m, s) for m, s in BATCHED if m == "cnn"]
BN_IDS = [f"{m}-{'x'.join(map(str, s))}" for m, s in WITH_BN]


def make_pair(name, shape, seed=0):
    """native and loop Workers over copies of one module; every worker gets its own
    parameters (rows of X perturbed differently) and its own BatchNorm buffers."""
    torch.manual_seed(seed)
    module = build_model(name, shape, K)
    native = Workers(module, N, executor="native", precision="fp64")
    loop = Workers(copy.deepcopy(module), N, executor="loop", precision="fp64")
    assert native.executor == "native" and loop.executor == "loop"
    g = torch.Generator().manual_seed(seed + 1)
    X = native.X + 0.05 * torch.randn(native.X.shape, generator=g, dtype=torch.float64)
    assert not torch.equal(X[0], X[1])
    native.X, loop.X = X.clone(), X.clone()
    for k, v in native.buffers.items():
        if k.endswith("running_var"):
            new = 0.5 + torch.rand(v.shape, generator=g, dtype=v.dtype)
        else:
            new = 0.3 * torch.randn(v.shape, generator=g, dtype=v.dtype)
        native.buffers[k] = new.clone()
        loop.buffers[k] = new.clone()
    x = torch.randn(N, B, *shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, K, (N, B), generator=g)
    return native, loop, x, y


def worker_module(w: Workers, i: int) -> nn.Module:
    """A plain copy of the module holding worker i's parameters and buffers."""
    m = copy.deepcopy(w.module)
    w.layout.load(m, w.X[i])
    bufs = dict(m.named_buffers())
    with torch.no_grad():
        for k, v in w.buffers.items():
            bufs[k].copy_(v[i])
    return m


@pytest.mark.parametrize("mode", ["train", "frozen", "eval"])
@pytest.mark.parametrize("name,shape", BATCHED, ids=IDS)
def test_native_logits_equal_loop_and_module(name, shape, mode):
    native, loop, x, y = make_pair(name, shape)
    refs = [worker_module(native, i) for i in range(N)]
    ln = native.logits(native.X, x, mode)
    ll = loop.logits(loop.X, x, mode)
    assert ln.shape == (N, B, K)
    torch.testing.assert_close(ln, ll, **TOL)
    for i, m in enumerate(refs):
        m.train(mode != "eval")
        torch.testing.assert_close(ln[i], m(x[i]), **TOL)
    # the workers really differ (the comparison is per worker, not of one shared model)
    assert not torch.allclose(ln[0], ln[1], atol=1e-3)


@pytest.mark.parametrize("name,shape", BATCHED, ids=IDS)
def test_native_gradients_equal_loop_and_module(name, shape):
    native, loop, x, y = make_pair(name, shape)
    refs = [worker_module(native, i) for i in range(N)]
    loss_n, g_n = native.loss_and_grad(native.X, x, y, "train")
    loss_l, g_l = loop.loss_and_grad(loop.X, x, y, "train")
    assert g_n.shape == (N, native.layout.d)
    torch.testing.assert_close(loss_n, loss_l, **TOL)
    torch.testing.assert_close(g_n, g_l, **TOL)
    for i, m in enumerate(refs):
        m.train()
        loss = F.cross_entropy(m(x[i]), y[i])
        loss.backward()
        g_ref = torch.cat([p.grad.reshape(-1) for p in m.parameters()])
        torch.testing.assert_close(loss_n[i], loss.detach(), **TOL)
        torch.testing.assert_close(g_n[i], g_ref, **TOL)


@pytest.mark.parametrize("name,shape", WITH_BN, ids=BN_IDS)
def test_train_pass_updates_bn_buffers_like_module(name, shape):
    native, loop, x, y = make_pair(name, shape)
    refs = [worker_module(native, i) for i in range(N)]
    before = {k: v.clone() for k, v in native.buffers.items()}
    assert before, "cnn has BatchNorm buffers"
    native.loss_and_grad(native.X, x, y, "train")
    loop.loss_and_grad(loop.X, x, y, "train")
    for k in before:
        torch.testing.assert_close(native.buffers[k], loop.buffers[k], **TOL)
        assert not torch.allclose(native.buffers[k], before[k]), f"{k} was not updated by a train pass"
    for i, m in enumerate(refs):
        m.train()
        m(x[i])
        mb = dict(m.named_buffers())
        for k in before:
            torch.testing.assert_close(native.buffers[k][i], mb[k], **TOL)


@pytest.mark.parametrize("executor", ["native", "loop"])
@pytest.mark.parametrize("name,shape", WITH_BN, ids=BN_IDS)
def test_frozen_and_eval_leave_bn_buffers_alone(name, shape, executor):
    native, loop, x, y = make_pair(name, shape)
    w = native if executor == "native" else loop
    before = {k: v.clone() for k, v in w.buffers.items()}
    w.loss_and_grad(w.X, x, y, "frozen")
    w.logits(w.X, x, "eval")
    for k in before:
        assert torch.equal(w.buffers[k], before[k]), k


def test_native_rejected_without_batched_forward():
    module = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))  # any nn.Module without batched_forward
    with pytest.raises(UserError, match="loop"):
        Workers(module, 2, executor="native")
    assert Workers(module, 2, executor="auto").executor == "loop"
    assert Workers(build_model("mlp", (1, 4), 2), 2, executor="auto").executor == "native"


def test_load_average_holds_mean_parameters_and_buffers():
    native, _, _, _ = make_pair("cnn", (1, 8, 8))
    m = native.load_average(native.average())
    assert m is native.eval_module and m is not native.module
    torch.testing.assert_close(torch.cat([p.detach().reshape(-1) for p in m.parameters()]),
                               native.X.mean(0), rtol=0, atol=0)
    mb = dict(m.named_buffers())
    for k, v in native.buffers.items():
        torch.testing.assert_close(mb[k], v.mean(0), rtol=0, atol=0)
    # the training module keeps its own (initial) parameters
    assert not torch.equal(native.layout.flatten(native.module), native.X.mean(0))


# ----------------------------------------------------------------------------------------------
# ParamLayout


def _cnn():
    torch.manual_seed(0)
    return build_model("cnn", (3, 8, 8), K)


def test_layout_flatten_load_round_trip():
    m = _cnn()
    layout = ParamLayout(m)
    params = list(m.parameters())
    assert layout.d == sum(p.numel() for p in params)
    x = layout.flatten(m)
    torch.testing.assert_close(x, torch.cat([p.detach().reshape(-1) for p in params]), rtol=0, atol=0)
    z = torch.randn(layout.d)
    other = copy.deepcopy(m)
    layout.load(other, z)
    assert torch.equal(layout.flatten(other), z)
    # slot by slot: the slice [start, stop) of z is that parameter, in named_parameters order
    named = dict(other.named_parameters())
    for s in layout.slots:
        assert torch.equal(named[s.name].detach(), z[s.start:s.stop].view(s.shape))
    # the original module is untouched
    assert torch.equal(layout.flatten(m), x)


def test_layout_views_share_storage_with_X():
    m = _cnn()
    layout = ParamLayout(m)
    X = torch.randn(3, layout.d)
    views = layout.views(X)
    for s in layout.slots:
        v = views[s.name]
        assert v.shape == (3, *s.shape)
        assert torch.equal(v[1].reshape(-1), X[1, s.start:s.stop])
    views["conv2.weight"][2, 0, 0, 0, 0] = 123.0
    assert X[2, layout.slots[[s.name for s in layout.slots].index("conv2.weight")].start] == 123.0
    X[0].zero_()
    assert all(float(v[0].abs().sum()) == 0.0 for v in views.values())
    rv = layout.row_views(X[1])
    rv["fc.bias"].fill_(7.0)
    fc_bias = next(s for s in layout.slots if s.name == "fc.bias")
    assert torch.all(X[1, fc_bias.start:fc_bias.stop] == 7.0)


def test_layout_filter_ids_and_one_d_mask():
    m = _cnn()
    layout = ParamLayout(m)
    ids, count = layout.filter_ids()
    expected_ids, nxt, expected_1d = [], 0, []
    for _, p in m.named_parameters():
        if p.dim() >= 2:
            rows = torch.arange(p.shape[0]).view(-1, *([1] * (p.dim() - 1))).expand(p.shape)
            expected_ids.append(rows.reshape(-1) + nxt)
            nxt += p.shape[0]
        else:
            expected_ids.append(torch.arange(p.numel()) + nxt)
            nxt += p.numel()
        expected_1d.append(torch.full((p.numel(),), p.dim() <= 1))
    assert count == nxt
    # conv1 32 + bn1 2*32 + conv2 64 + bn2 2*64 + conv3 64 + bn3 2*64 + fc 5 (rows) + 5 (bias)
    assert count == 32 + 64 + 64 + 128 + 64 + 128 + K + K
    assert torch.equal(ids, torch.cat(expected_ids))
    sizes = torch.bincount(ids, minlength=count)
    assert sizes[:32].eq(3 * 3 * 3).all()  # conv1: 3 input channels x 3 x 3 per filter
    assert sizes[32:96].eq(1).all()  # bn1 weight and bias entries are their own filters
    assert torch.equal(layout.one_d_mask(), torch.cat(expected_1d))


# ----------------------------------------------------------------------------------------------
# Models without batched_forward: the loop executor


@pytest.mark.parametrize("name", ["resnet18", "timm:test_resnet"])
def test_large_models_run_with_loop_executor(name):
    """No batched_forward: the loop executor runs them, worker by worker, exactly as the module would.
    (resnet18 is checked forward only, in train mode, to keep the test fast on a CPU.)"""
    if name.startswith("timm:"):
        timm = pytest.importorskip("timm")
        assert name[5:] in timm.list_models()
    torch.manual_seed(0)
    module = build_model(name, (3, 32, 32), 10)
    w = Workers(module, 2, executor="auto", precision="fp64")
    assert w.executor == "loop"
    assert w.buffers, "both models have BatchNorm"
    g = torch.Generator().manual_seed(0)
    w.X = w.X + 0.01 * torch.randn(w.X.shape, generator=g, dtype=torch.float64)
    x = torch.randn(2, 2, 3, 32, 32, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (2, 2), generator=g)
    ref = worker_module(w, 1).train()
    if name == "resnet18":
        with torch.no_grad():
            out = w.logits(w.X, x, "train")
            expect = ref(x[1])
        assert out.shape == (2, 2, 10)
        torch.testing.assert_close(out[1], expect, **TOL)
    else:
        losses, G = w.loss_and_grad(w.X, x, y, "train")
        assert losses.shape == (2,) and G.shape == (2, w.layout.d)
        assert torch.isfinite(G).all() and G.abs().sum() > 0
        loss = F.cross_entropy(ref(x[1]), y[1])
        loss.backward()
        torch.testing.assert_close(losses[1], loss.detach(), **TOL)
        g_ref = torch.cat([p.grad.reshape(-1) for p in ref.parameters()])
        torch.testing.assert_close(G[1], g_ref, **TOL)
    # the train pass updated worker 1's running statistics exactly as the module's own pass did
    mb = dict(ref.named_buffers())
    for k, v in w.buffers.items():
        torch.testing.assert_close(v[1], mb[k], **TOL)


def test_build_model_errors():
    with pytest.raises(UserError, match="images"):
        build_model("cnn", (1, 16), 4)
    with pytest.raises(UserError, match="1-D"):
        build_model("cnn1d", (1, 8, 8), 4)
    with pytest.raises(UserError, match="timm"):
        build_model("timm:not_a_model_xyz", (3, 32, 32), 4)


def test_wide_resnet_sizes_and_shapes():
    """Parameter counts of the CIFAR WideResNets (Zagoruyko & Komodakis report 36.5M for WRN-28-10)."""
    def count(m):
        return sum(p.numel() for p in m.parameters())

    assert round(count(build_model("wrn28_10", (3, 32, 32), 10)) / 1e6, 1) == 36.5
    torch.manual_seed(0)
    m = build_model("wrn16_4", (3, 32, 32), 10)
    assert round(count(m) / 1e6, 1) == 2.7
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(UserError, match="images"):
        build_model("wrn16_4", (1, 40), 10)


def test_load_init_copies_matching_tensors(tmp_path):
    from bench.models import load_init

    torch.manual_seed(0)
    src = build_model("cnn", (3, 8, 8), 10)
    sd = src.state_dict()
    sd["fc.weight"] = torch.zeros(1000, 64)  # a head of another size is skipped, as an ImageNet head would be
    sd["fc.bias"] = torch.zeros(1000)
    torch.save(sd, tmp_path / "w.pt")
    torch.manual_seed(1)
    dst = build_model("cnn", (3, 8, 8), 10)
    head = dst.fc.weight.detach().clone()
    info = load_init(dst, str(tmp_path / "w.pt"))
    assert info == {"init_loaded": len(sd) - 2, "init_skipped": 2}
    assert torch.equal(dst.conv1.weight, src.conv1.weight) and torch.equal(dst.bn1.running_mean, src.bn1.running_mean)
    assert torch.equal(dst.fc.weight, head)
    (tmp_path / "bad.pt").write_text("not a checkpoint")
    with pytest.raises(UserError, match="--init"):
        load_init(dst, str(tmp_path / "bad.pt"))
    torch.save({"other": torch.zeros(3)}, tmp_path / "none.pt")
    with pytest.raises(UserError, match="no tensor matches"):
        load_init(dst, str(tmp_path / "none.pt"))
