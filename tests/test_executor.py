"""Executors (bench/workers.py): vmap == loop == native through whole training runs, and the numerics options.

Every preset runs 20 steps on the same data order with each executor, from the same seed;
the final parameters of all workers and their BatchNorm running buffers must agree (float32
rounding only). Models: cnn on 3x8x8 images (BatchNorm: train/frozen modes matter, SAM's
second pass must leave the running statistics alone) and cnn1d (no BatchNorm).
bf16 autocast and channels-last are checked against the float32 / contiguous runs.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn as nn

from algorithms import PRESETS, StepContext
from bench.config import RunConfig
from bench.data import Dataset
from bench.errors import UserError
from bench.models import build_model
from bench.runner import Trainer
from bench.workers import Workers

CPU = torch.device("cpu")
PRESET_NAMES = PRESETS.names()  # every registered preset, plug-ins included
STEPS = 20
# Executors are compared in float64 (precision "fp64"). Measured on this problem: float32 runs of the
# same computation differ by up to 1.1e-5 relative after 20 steps (d-lamb: LAMB divides by
# sqrt(v) + eps), i.e. ~100 float32 ulps, and by a CPU- and thread-dependent amount; in float64 the
# same amplification leaves ~100 x 1.1e-16 ~ 1e-14 (measured: <= 2.6e-16). 1e-10 keeps a 1e4 margin
# over that and stays 1e3 below what a rule constant that is wrong by 1e-6 relative does
# (test_tolerance_catches_a_wrong_rule).
REL = 1e-10
THREADS = (1, max(2, torch.get_num_threads()))  # the reference at 1 thread, the other run at several


def images(n_train=128, n_test=32, shape=(3, 8, 8), k=4) -> Dataset:
    """A tiny uint8 image data set with learnable labels (class-dependent mean brightness)."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, k, (n_train,), generator=g)
    yt = torch.randint(0, k, (n_test,), generator=g)

    def draw(lab):
        base = (40 + 50 * lab).view(-1, 1, 1, 1).float()
        return (base + 60 * torch.rand(len(lab), *shape, generator=g)).clamp(0, 255).to(torch.uint8)

    return Dataset("synthetic", draw(y), y, draw(yt), yt, k, "cnn", lambda b: (b.float() / 255.0 - 0.5) / 0.25)


@pytest.fixture(scope="module")
def img_data():
    return images()


def make_trainer(data, model: str, algo: str, executor: str, **kw) -> Trainer:
    base = dict(dataset="synthetic", model=model, algo=algo, workers=4, batch=4, steps=STEPS, lr=0.05,
                schedule="cosine", hessian=False, executor=executor, topology="ring", rho=0.05, sigma=0.01,
                precision="fp64")
    base.update(kw)
    cfg = RunConfig(**base).resolve(len(data.y_train), model)
    return Trainer(cfg, data, CPU, run_dir=None)


@contextlib.contextmanager
def threads(k: int):
    old = torch.get_num_threads()
    torch.set_num_threads(k)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def train(tr: Trainer, steps: int = STEPS, n_threads: int | None = None) -> Trainer:
    with threads(n_threads or torch.get_num_threads()):
        for t in range(steps):
            ctx = StepContext(t, tr.lr(t), tr.cfg.lr, tr.comm, tr.cfg.seed)
            x, y = tr.batch(t)
            losses, X = tr.algo.step(tr.workers, tr.workers.X, x, y, ctx)
            assert losses.dtype == tr.workers.X.dtype and torch.isfinite(losses).all()
            tr.workers.X = X
    return tr


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def assert_same_run(a: Trainer, b: Trainer, rel: float = REL) -> None:
    assert a.workers.X.dtype == b.workers.X.dtype
    assert rel_err(a.workers.X, b.workers.X) < rel, rel_err(a.workers.X, b.workers.X)
    assert a.workers.buffers.keys() == b.workers.buffers.keys()
    for k in a.workers.buffers:
        assert rel_err(a.workers.buffers[k], b.workers.buffers[k]) < rel, k
    # the optimizer states agree too (momentum / Adam moments: the whole run, not only its end point)
    for name in ("m", "v"):
        sa, sb = getattr(a.algo.optimizer, name, None), getattr(b.algo.optimizer, name, None)
        if isinstance(sa, torch.Tensor) and isinstance(sb, torch.Tensor):
            assert rel_err(sa, sb) < 10 * rel, name


@pytest.mark.parametrize("algo", PRESET_NAMES)
def test_vmap_equals_loop_and_native_with_batchnorm(img_data, algo):
    runs = {ex: train(make_trainer(img_data, "cnn", algo, ex), n_threads=k)
            for ex, k in (("loop", THREADS[0]), ("vmap", THREADS[1]), ("native", THREADS[1]))}
    assert {ex: r.workers.executor for ex, r in runs.items()} == {"loop": "loop", "vmap": "vmap", "native": "native"}
    assert runs["loop"].workers.buffers, "cnn has BatchNorm buffers"
    assert_same_run(runs["vmap"], runs["loop"])
    assert_same_run(runs["native"], runs["vmap"])
    # training moved the parameters and (train passes) the running statistics
    fresh = make_trainer(img_data, "cnn", algo, "loop")
    assert rel_err(runs["vmap"].workers.X, fresh.workers.X) > 1e-3
    for k, v in runs["vmap"].workers.buffers.items():
        if k.endswith("running_mean"):
            assert not torch.allclose(v, fresh.workers.buffers[k])
    if runs["vmap"].cfg.needs_topology():  # gossip: workers differ, so the comparison is per worker
        assert (runs["vmap"].workers.X[0] - runs["vmap"].workers.X[1]).abs().max() > 1e-6


@pytest.mark.parametrize("algo", PRESET_NAMES)
def test_vmap_equals_loop_and_native_without_batchnorm(synthetic, algo):
    runs = {ex: train(make_trainer(synthetic, "cnn1d", algo, ex), n_threads=k)
            for ex, k in (("loop", THREADS[0]), ("vmap", THREADS[1]), ("native", THREADS[1]))}
    assert not runs["loop"].workers.buffers
    assert_same_run(runs["vmap"], runs["loop"])
    assert_same_run(runs["native"], runs["vmap"])


def test_sam_second_pass_leaves_bn_statistics_alone_under_vmap(img_data):
    """SAM with vmap: after one step the running statistics are those of ONE train pass (plain SGD's)."""
    sam = train(make_trainer(img_data, "cnn", "sam", "vmap"), 1)
    sgd = train(make_trainer(img_data, "cnn", "csgd", "vmap"), 1)
    for k in sam.workers.buffers:
        torch.testing.assert_close(sam.workers.buffers[k], sgd.workers.buffers[k], rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["train", "frozen", "eval"])
def test_vmap_bn_modes_match_loop(img_data, mode):
    tr = {ex: make_trainer(img_data, "cnn", "dsgd", ex) for ex in ("loop", "vmap")}
    g = torch.Generator().manual_seed(1)
    X = tr["loop"].workers.X + 0.05 * torch.randn(tr["loop"].workers.X.shape, generator=g, dtype=torch.float64)
    bufs = {k: (0.5 + torch.rand(v.shape, generator=g, dtype=v.dtype)) if "var" in k
            else 0.3 * torch.randn(v.shape, generator=g, dtype=v.dtype)
            for k, v in tr["loop"].workers.buffers.items()}
    x, y = tr["loop"].batch(0)
    out = {}
    for ex, t in tr.items():
        t.workers.X = X.clone()
        t.workers.buffers = {k: v.clone() for k, v in bufs.items()}
        out[ex] = t.workers.loss_and_grad(t.workers.X, x, y, mode)
    # one float64 forward/backward: a few ulps (1e-12 leaves a 1e3 margin)
    torch.testing.assert_close(out["vmap"][0], out["loop"][0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out["vmap"][1], out["loop"][1], rtol=1e-12, atol=1e-14)
    for k in bufs:
        torch.testing.assert_close(tr["vmap"].workers.buffers[k], tr["loop"].workers.buffers[k], rtol=1e-12,
                                   atol=1e-14)
        changed = not torch.equal(tr["vmap"].workers.buffers[k], bufs[k])
        assert changed == (mode == "train"), (k, mode)


# ----------------------------------------------------------------------------------------------
# numerics options


@pytest.mark.parametrize("executor", ["vmap", "loop", "native"])
def test_bf16_run_finishes_close_to_fp32(img_data, executor):
    fp32 = train(make_trainer(img_data, "cnn", "sam", executor, precision="fp32"))
    bf16 = train(make_trainer(img_data, "cnn", "sam", executor, precision="bf16"))
    assert bf16.workers.X.dtype == torch.float32  # parameters and optimizer state stay float32
    assert all(v.dtype == torch.float32 for v in bf16.workers.buffers.values())
    assert torch.isfinite(bf16.workers.X).all()
    X0 = make_trainer(img_data, "cnn", "sam", executor, precision="fp32").workers.X
    moved = (fp32.workers.X - X0).norm()
    d = float((bf16.workers.X - fp32.workers.X).norm() / moved)
    # The same training path up to bfloat16 rounding: 20 SAM steps at batch 4 amplify a per-step
    # gradient error of a few percent to ~16% of the distance travelled (equally for every
    # executor, autocast or not), i.e. ~2.5% of the parameters.
    assert 0 < d < 0.3, d
    assert 0 < rel_err(bf16.workers.X, fp32.workers.X) < 0.05
    x, y = bf16.batch(0)
    losses, G = bf16.workers.loss_and_grad(bf16.workers.X, x, y, "eval")
    assert losses.dtype == torch.float32 and G.dtype == torch.float32


def test_bf16_vmap_close_to_bf16_loop(img_data):
    """Both executors compute in bfloat16 (vmap casts by hand what autocast casts in the loop)."""
    a = make_trainer(img_data, "cnn", "dsgd", "vmap", precision="bf16")
    b = make_trainer(img_data, "cnn", "dsgd", "loop", precision="bf16")
    ref = make_trainer(img_data, "cnn", "dsgd", "loop", precision="fp32")
    x, y = a.batch(0)
    ga = a.workers.loss_and_grad(a.workers.X, x, y)[1]
    gb = b.workers.loss_and_grad(b.workers.X, x, y)[1]
    g32 = ref.workers.loss_and_grad(ref.workers.X, x, y)[1]
    assert rel_err(ga, g32) > 1e-4  # really in bfloat16 (autocast does not reach convolutions under vmap)
    assert rel_err(ga, gb) < 0.5 * rel_err(ga, g32) + 1e-3


@pytest.mark.parametrize("executor", ["vmap", "loop", "native"])
def test_channels_last_equals_contiguous(img_data, executor):
    a = train(make_trainer(img_data, "cnn", "dsgd", executor), 10, n_threads=THREADS[0])
    b = train(make_trainer(img_data, "cnn", "dsgd", executor, channels_last=True), 10, n_threads=THREADS[1])
    assert b.workers.channels_last
    assert rel_err(b.workers.X, a.workers.X) < REL
    for k in a.workers.buffers:
        assert rel_err(b.workers.buffers[k], a.workers.buffers[k]) < REL


def test_channels_last_input_layout():
    from bench.workers import channels_last_input

    x = torch.randn(3, 2, 4, 5, 6)
    for ex in ("loop", "vmap", "native"):
        y = channels_last_input(x, ex)
        assert torch.equal(y, x)
    y = channels_last_input(x, "loop")
    assert y[1].is_contiguous(memory_format=torch.channels_last)
    y = channels_last_input(x, "vmap")
    packed = y.transpose(0, 1).reshape(2, 12, 5, 6)  # what the grouped convolution reads: a view
    assert packed.data_ptr() == y.data_ptr() and packed.is_contiguous(memory_format=torch.channels_last)


def test_non_semantic_options_keep_the_run_id():
    base = RunConfig(dataset="synthetic").resolve(512, "mlp")
    for kw in (dict(executor="vmap"), dict(channels_last=True), dict(compile=True)):
        assert base.replace(**kw).run_id() == base.run_id()
    assert base.replace(precision="bf16").resolve(512, "mlp").run_id() != base.run_id()


# ----------------------------------------------------------------------------------------------
# torch.compile


def compiled_and_eager(data, model: str, steps: int = 3):
    """D-SGD with the vmap executor, once with --compile (its log lines collected) and once eager."""
    a = make_trainer(data, model, "dsgd", "vmap", compile=True)
    logs = []
    a.workers._log = logs.append
    b = make_trainer(data, model, "dsgd", "vmap")
    return train(a, steps), train(b, steps), logs


def test_compile_failure_falls_back_with_one_warning(img_data, monkeypatch):
    def broken_compile(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("backend exploded\nsecond line")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    a, b, logs = compiled_and_eager(img_data, "cnn")
    assert len(logs) == 1 and "--compile" in logs[0] and "backend exploded" in logs[0] and "\n" not in logs[0]
    assert_same_run(a, b)


def test_compile_vmap_equals_eager(synthetic):
    """A real torch.compile of the vmapped forward (mlp: compiles in seconds) gives the eager run."""
    a, b, logs = compiled_and_eager(synthetic, "mlp")
    assert logs == [] or all("--compile" in m for m in logs)
    assert_same_run(a, b)


# ----------------------------------------------------------------------------------------------
# choosing the executor


class ItemNet(nn.Module):
    """A module vmap cannot run (.item() on a batched tensor), with BatchNorm before the failure."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = self.bn(self.conv(x))
        scale = 1.0 if h.abs().max().item() > 0 else 0.0
        return self.fc(h.mean((2, 3))) * scale


def test_auto_choice():
    from bench.workers import AUTO_EXECUTOR

    assert Workers(build_model("cnn", (3, 8, 8), 4), 2, "auto").executor == AUTO_EXECUTOR[("cpu", "CNN")] == "loop"
    assert Workers(build_model("cnn1d", (1, 40), 4), 2, "auto").executor == "native"
    assert Workers(build_model("resnet18", (3, 8, 8), 4), 2, "auto").executor == "loop"  # CPU: loop
    assert Workers(build_model("resnet18", (3, 8, 8), 4), 2, "vmap").executor == "vmap"
    assert Workers(build_model("mlp", (1, 8), 4), 2, "vmap").executor == "vmap"
    with pytest.raises(UserError, match="vmap or loop"):
        Workers(ItemNet(), 2, "native")
    with pytest.raises(UserError, match="valid"):
        Workers(ItemNet(), 2, "threads")


def test_auto_vmap_falls_back_to_loop_restoring_bn_buffers():
    torch.manual_seed(0)
    w = Workers(ItemNet(), 2, "auto")
    ref = Workers(ItemNet(), 2, "loop")
    ref.X = w.X.clone()
    w.executor = "vmap"  # what auto picks on CUDA
    logs = []
    w._log = logs.append
    x = torch.randn(2, 3, 3, 5, 5)
    y = torch.randint(0, 2, (2, 3))
    la, ga = w.loss_and_grad(w.X, x, y)
    lb, gb = ref.loss_and_grad(ref.X, x, y)
    assert w.executor == "loop" and len(logs) == 1 and "loop" in logs[0]
    torch.testing.assert_close(la, lb)
    torch.testing.assert_close(ga, gb)
    for k in ref.buffers:  # one train pass worth of statistics, not two
        torch.testing.assert_close(w.buffers[k], ref.buffers[k], rtol=0, atol=0)
    with pytest.raises(RuntimeError):  # an explicit --executor vmap fails loudly instead
        v = Workers(ItemNet(), 2, "vmap")
        v.loss_and_grad(v.X, x, y)


def test_vmap_runs_resnet18_like_loop():
    """resnet18 (no batched_forward): one vmap train pass equals the loop's, loss, gradient and BN
    buffers, in float64 (a few ulps: 1e-12)."""
    import copy

    torch.manual_seed(0)
    module = build_model("resnet18", (3, 8, 8), 4)
    w = {ex: Workers(copy.deepcopy(module), 2, ex, precision="fp64") for ex in ("vmap", "loop")}
    g = torch.Generator().manual_seed(0)
    X = w["loop"].X + 0.01 * torch.randn(w["loop"].X.shape, generator=g, dtype=torch.float64)
    x = torch.randn(2, 4, 3, 8, 8, generator=g)
    y = torch.randint(0, 4, (2, 4), generator=g)
    out = {}
    for (ex, ww), k in zip(w.items(), THREADS):
        ww.X = X.clone()
        with threads(k):
            out[ex] = ww.loss_and_grad(ww.X, x, y)
    torch.testing.assert_close(out["vmap"][0], out["loop"][0], rtol=1e-12, atol=1e-14)
    assert rel_err(out["vmap"][1], out["loop"][1]) < 1e-12
    for k in w["loop"].buffers:
        torch.testing.assert_close(w["vmap"].buffers[k], w["loop"].buffers[k], rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------------------------
# chunks of workers (memory): the same numbers


@pytest.mark.parametrize("executor", ["vmap", "native", "loop"])
def test_chunked_workers_equal_one_call(img_data, executor):
    a = make_trainer(img_data, "cnn", "sam", executor)
    b = make_trainer(img_data, "cnn", "sam", executor)
    b.workers.chunk = 3  # 4 workers: chunks of 3 and 1
    train(a, 5)
    train(b, 5)
    assert_same_run(a, b)


def test_out_of_memory_halves_the_chunk_and_retries(img_data, monkeypatch):
    """On CUDA out of memory the step is retried with half the workers per call, BN buffers restored."""
    a = make_trainer(img_data, "cnn", "dsgd", "vmap")
    ref = make_trainer(img_data, "cnn", "dsgd", "vmap")
    w = a.workers
    w.device = torch.device("cuda")  # only the out-of-memory guard looks at it; nothing runs on a GPU
    real = w._logits
    calls = []

    def logits(pv, x, mode, rows):
        out = real(pv, x, mode, rows)  # BN buffers of these rows are updated before the failure
        calls.append(x.shape[0])
        if x.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        return out

    monkeypatch.setattr(w, "_logits", logits)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    logs = []
    w._log = logs.append
    train(a, 3)
    train(ref, 3)
    assert calls[:3] == [4, 2, 2] and w.chunk == 2
    assert len(logs) == 1 and "out of memory" in logs[0] and "using 2" in logs[0]
    assert_same_run(a, ref)


# ----------------------------------------------------------------------------------------------
# the tolerance has power: rules that are wrong by 1e-6 fail it


def _wrong_mixing(tr: Trainer, eps: float = 1e-6) -> Trainer:
    """Move eps of worker 0's self-weight to its first neighbour (W stays row-stochastic)."""
    kind, idx, w, _slots = tr.comm.mixer.plan(0, torch.float64)
    w[0, 0] -= eps
    w[0, 1] += eps
    return tr


@pytest.mark.parametrize("mutant", ["lr", "mixing", "momentum", "no_wd_1d"])
def test_tolerance_catches_a_wrong_rule(img_data, mutant):
    """The executor comparisons above would fail on a rule whose constants are off by 1e-6 relative
    (lr, a mixing weight, the momentum), or that drops one term (weight decay on 1-D parameters)."""
    ref = train(make_trainer(img_data, "cnn", "dsgd", "loop"), n_threads=THREADS[0])
    kw = {"lr": dict(lr=0.05 * (1 + 1e-6)), "momentum": dict(momentum=0.9 * (1 + 1e-6)),
          "no_wd_1d": dict(wd_1d=False), "mixing": {}}[mutant]
    wrong = make_trainer(img_data, "cnn", "dsgd", "vmap", **kw)
    if mutant == "mixing":
        _wrong_mixing(wrong)
    train(wrong, n_threads=THREADS[1])
    err = rel_err(wrong.workers.X, ref.workers.X)
    assert err > 100 * REL, (mutant, err)
    with pytest.raises(AssertionError):
        assert_same_run(wrong, ref)
