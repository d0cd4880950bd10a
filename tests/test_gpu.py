"""GPU checks (marker `cuda`): skipped where torch.cuda.is_available() is False.

Run them with `python -m pytest -m cuda -v` (scripts/gpu_checks.sh does, with the timings).
The same equivalences as on the CPU (tests/test_executor.py, tests/test_augment.py), on
the device: vmap == loop == native, augmentation bit-identical to the CPU's, bf16 and
channels-last runs, torch.compile, a full run through the runner, a one-rank NCCL run
of the distributed backend against the simulator, and a tiny speed table.
"""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch

from algorithms import StepContext
from bench.augment import augment_batch, counter_hash, crop_flip_params
from bench.config import RunConfig
from bench.models import build_model
from bench.runner import Trainer
from bench.workers import Workers
from test_executor import REL  # float64 equality tolerance, justified there
from test_executor import images  # the tiny uint8 image set of the CPU executor tests
from test_executor import rel_err as rel

# float32 comparisons on the GPU (where float32 is the point: channels-last, compile) run with TF32
# off and deterministic cuDNN, so two kernels differ by accumulation order only: ~1e-7 relative per
# operation, amplified ~100-fold over 10-20 steps (measured on the CPU: <= 1.1e-5 for LAMB, ~1e-7 for
# SGD presets): F32 = 1e-4 keeps a 10x margin. Equality of executors and backends is tested in
# float64 (REL), where the margin is 1e4 and no machine can break it.
F32 = 1e-4

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CUDA = torch.device("cuda") if torch.cuda.is_available() else None


@contextlib.contextmanager
def exact_float32():
    """No TF32 and deterministic cuDNN: executor comparisons then differ by float32 rounding only."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) = saved


@pytest.fixture(scope="module")
def gpu_images():
    return images(256, 64, (3, 16, 16)).to(CUDA)


def make_trainer(data, model, algo, executor, device=None, **kw) -> Trainer:
    base = dict(dataset="synthetic", model=model, algo=algo, workers=4, batch=8, steps=10, lr=0.05,
                schedule="cosine", hessian=False, executor=executor, topology="ring", device="cuda")
    base.update(kw)
    cfg = RunConfig(**base).resolve(len(data.y_train), model)
    return Trainer(cfg, data, device or CUDA, run_dir=None)


def train(tr: Trainer, steps: int = 10) -> Trainer:
    for t in range(steps):
        ctx = StepContext(t, tr.lr(t), tr.cfg.lr, tr.comm, tr.cfg.seed)
        x, y = tr.batch(t)
        losses, X = tr.algo.step(tr.workers, tr.workers.X, x, y, ctx)
        assert torch.isfinite(losses).all()
        tr.workers.X = X
    torch.cuda.synchronize()
    return tr


# ----------------------------------------------------------------------------------------------
# executors on the GPU


def test_auto_picks_vmap_for_models_without_batched_forward():
    assert Workers(build_model("resnet18", (3, 32, 32), 10), 2, "auto", CUDA).executor == "vmap"
    assert Workers(build_model("cnn", (3, 32, 32), 10), 2, "auto", CUDA).executor == "native"


@pytest.mark.parametrize("algo", ["csgd", "dsgd", "sam", "ad-sam", "d-lamb"])
def test_vmap_equals_loop_and_native_on_cuda(algo):
    """20 steps of a preset with BatchNorm (3x8x8, batch 4, as tests/test_executor.py on the CPU), in float64."""
    data = images(n_train=128, n_test=32, shape=(3, 8, 8)).to(CUDA)
    with exact_float32():
        runs = {ex: train(make_trainer(data, "cnn", algo, ex, batch=4, precision="fp64"), 20)
                for ex in ("loop", "vmap", "native")}
    for ex in ("vmap", "native"):
        assert rel(runs[ex].workers.X, runs["loop"].workers.X) < REL, ex
        for k, v in runs["loop"].workers.buffers.items():
            assert rel(runs[ex].workers.buffers[k], v) < REL, (ex, k)


def float64_reference(module, n: int, X: torch.Tensor) -> Workers:
    w = Workers(copy.deepcopy(module).double(), n, "loop", CUDA)
    w.X = X.double().clone()
    return w


@pytest.mark.parametrize("name,shape,B", [("cnn", (3, 16, 16), 8), ("resnet18", (3, 32, 32), 16)])
def test_gradients_as_accurate_as_loop_on_cuda(name, shape, B):
    """Per-worker gradients (train and frozen passes) against a float64 reference: vmap (and native)
    are at least as close to it as the loop executor. (At random initialisation these nets are
    ill-conditioned: even a plain float32 module is ~1e-3 away from float64, so the executors are
    compared through the reference rather than with each other.)"""
    torch.manual_seed(0)
    module = build_model(name, shape, 10)
    exs = ["loop", "vmap"] + (["native"] if hasattr(module, "batched_forward") else [])
    g = torch.Generator(device="cuda").manual_seed(0)
    with exact_float32():
        w = {ex: Workers(copy.deepcopy(module), 4, ex, CUDA) for ex in exs}
        X = w["loop"].X + 0.01 * torch.randn(w["loop"].X.shape, generator=g, device="cuda")
        x = torch.randn(4, B, *shape, generator=g, device="cuda")
        y = torch.randint(0, 10, (4, B), generator=g, device="cuda")
        ref = float64_reference(module, 4, X)
        for mode in ("train", "frozen"):
            l64, g64 = ref.loss_and_grad(ref.X, x.double(), y, mode)
            err = {}
            for ex, ww in w.items():
                ww.X = X.clone()
                loss, grad = ww.loss_and_grad(ww.X, x, y, mode)
                assert grad.dtype == torch.float32
                # float32 is the point here: a float32 loss of O(1) is within ~1e-6 of float64's
                torch.testing.assert_close(loss.double(), l64, rtol=1e-4, atol=1e-5)
                err[ex] = rel(grad.double(), g64)
            assert err["loop"] < 1e-2, err
            for ex in exs[1:]:
                assert err[ex] <= max(1e-5, 3 * err["loop"]), (mode, err)
        for k, v in ref.buffers.items():  # one train pass: the running statistics of every worker
            for ex, ww in w.items():
                torch.testing.assert_close(ww.buffers[k].double(), v, rtol=1e-4, atol=1e-5)


def test_cuda_run_equals_cpu_run(gpu_images):
    """The same configuration on the GPU and on the CPU (same batches, same augmentation) agrees, in
    float64: different kernels (reduction orders) on the two devices, ~1e-15 per operation, 10 steps:
    1e-9 keeps a 1e3 margin over REL's budget."""
    with exact_float32():
        g = train(make_trainer(gpu_images, "cnn", "dsgd", "vmap", augment=True, precision="fp64"))
    cpu_data = images(256, 64, (3, 16, 16))
    c = train(make_trainer(cpu_data, "cnn", "dsgd", "vmap", device=torch.device("cpu"), augment=True,
                           precision="fp64"))
    assert rel(g.workers.X.cpu(), c.workers.X) < 1e-9


@pytest.mark.parametrize("executor", ["vmap", "loop", "native"])
def test_bf16_run_on_cuda(gpu_images, executor):
    fp32 = train(make_trainer(gpu_images, "cnn", "sam", executor))
    bf16 = train(make_trainer(gpu_images, "cnn", "sam", executor, precision="bf16"))
    assert bf16.workers.X.dtype == torch.float32 and torch.isfinite(bf16.workers.X).all()
    assert 0 < rel(bf16.workers.X, fp32.workers.X) < 0.05


def test_bf16_resnet18_vmap_as_accurate_as_autocast_loop():
    """vmap casts to bfloat16 by hand what autocast casts in the loop: the same accuracy against float64."""
    torch.manual_seed(0)
    module = build_model("resnet18", (3, 32, 32), 10)
    g = torch.Generator(device="cuda").manual_seed(0)
    w = {ex: Workers(copy.deepcopy(module), 4, ex, CUDA, precision="bf16") for ex in ("vmap", "loop")}
    X = w["loop"].X + 0.01 * torch.randn(w["loop"].X.shape, generator=g, device="cuda")
    x = torch.randn(4, 16, 3, 32, 32, generator=g, device="cuda")
    y = torch.randint(0, 10, (4, 16), generator=g, device="cuda")
    ref = float64_reference(module, 4, X)
    _, g64 = ref.loss_and_grad(ref.X, x.double(), y)
    err = {}
    for ex, ww in w.items():
        ww.X = X.clone()
        loss, grad = ww.loss_and_grad(ww.X, x, y)
        assert loss.dtype == grad.dtype == torch.float32 and torch.isfinite(grad).all()
        err[ex] = rel(grad.double(), g64)
    assert err["vmap"] > 1e-3, err  # really computed in bfloat16
    assert err["vmap"] <= 1.5 * err["loop"] + 1e-3, err


@pytest.mark.parametrize("executor", ["vmap", "loop", "native"])
def test_channels_last_on_cuda(gpu_images, executor):
    with exact_float32():
        a = train(make_trainer(gpu_images, "cnn", "dsgd", executor))
        b = train(make_trainer(gpu_images, "cnn", "dsgd", executor, channels_last=True))
    assert rel(b.workers.X, a.workers.X) < F32


def test_compile_vmap_on_cuda(gpu_images):
    with exact_float32():
        a = make_trainer(gpu_images, "cnn", "dsgd", "vmap", compile=True)
        logs = []
        a.workers._log = logs.append
        b = make_trainer(gpu_images, "cnn", "dsgd", "vmap")
        train(a, 5)
        train(b, 5)
    if logs:
        pytest.xfail(f"torch.compile fell back to eager here: {logs[0]}")
    assert rel(a.workers.X, b.workers.X) < F32


# ----------------------------------------------------------------------------------------------
# augmentation


def test_augmentation_cpu_equals_cuda():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 32, 3, 32, 32), dtype=torch.uint8, generator=g)
    for seed, step in ((0, 0), (3, 12345), (2**31, 2**40)):
        h_cpu = counter_hash(seed, torch.arange(6), step, 32)
        h_gpu = counter_hash(seed, torch.arange(6, device="cuda"), step, 32)
        assert torch.equal(h_cpu, h_gpu.cpu())
        a = augment_batch(x, seed, range(6), step)
        b = augment_batch(x.cuda(), seed, range(6), step)
        assert b.device.type == "cuda" and torch.equal(a, b.cpu())
    oy, ox, flip = crop_flip_params(0, range(6), 0, 32, device="cuda")
    assert oy.device.type == "cuda"


# ----------------------------------------------------------------------------------------------
# the runner and the distributed backend


def test_full_run_on_cuda_vmap_bf16_augment(gpu_images, tmp_path):
    tr = make_trainer(gpu_images, "resnet18", "dsgd", "vmap", precision="bf16", augment=True, channels_last=True,
                      steps=6, eval_every=3, results=str(tmp_path))
    tr.run_dir = tmp_path / "run"
    tr.run_dir.mkdir()
    s = tr.train()
    assert s["status"] == "completed" and s["executor"] == "vmap" and s["device"].startswith("cuda")
    assert math.isfinite(s["test_loss"]) and (tmp_path / "run" / "summary.json").exists()


def test_one_rank_nccl_run_equals_simulator(tmp_path):
    """bench.distributed.launch with one process on the GPU (NCCL) gives the simulator's numbers."""
    from bench.distributed import launch
    from bench.runner import run

    base = dict(dataset="synthetic", model="mlp", workers=4, batch=8, steps=10, lr=0.1, hessian=False,
                eval_every=5, device="cuda", dist_timeout=120.0, precision="fp64")
    dist = launch(RunConfig(results=str(tmp_path / "dist"), **base), 1, progress=False)
    sim = run(RunConfig(results=str(tmp_path / "sim"), **base))
    assert dist["backend"] == "dist" and dist["world_size"] == 1
    assert dist["status"] == sim["status"] == "completed"
    assert dist["test_acc"] == sim["test_acc"]
    assert dist["test_loss"] == pytest.approx(sim["test_loss"], rel=REL)
    assert dist["consensus_distance"] == pytest.approx(sim["consensus_distance"], rel=1e-6, abs=1e-14)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_rank_nccl_run_equals_simulator(tmp_path):
    from bench.distributed import launch
    from bench.runner import run

    base = dict(dataset="synthetic", model="mlp", workers=4, batch=8, steps=10, lr=0.1, hessian=False,
                eval_every=5, device="cuda", topology="ring", dist_timeout=120.0, precision="fp64")
    dist = launch(RunConfig(results=str(tmp_path / "dist"), **base), 2, progress=False)
    sim = run(RunConfig(results=str(tmp_path / "sim"), **base))
    assert dist["test_loss"] == pytest.approx(sim["test_loss"], rel=REL)


def test_speed_table_on_cuda():
    from bench.speed import gpu_report

    tables = gpu_report(models=("cnn",), batches=(8,), precisions=("fp32", "bf16"), layouts=("nchw",), n=4,
                        repeats=2, warmup=1, log=lambda m: None)
    rows = [r for t, rs in tables.items() if t != "projection" for r in rs]
    steps = {r["step"].split(" (")[0] for r in rows}
    assert {"single model", "D-SGD loop", "D-SGD vmap", "D-SGD native"} <= steps
    assert all(r["ms"] and r["ms"] > 0 for r in rows)
