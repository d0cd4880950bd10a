"""Speed: a simulated D-SGD step vs a plain PyTorch step, and the executors against each other.

Every simulated step is the harness's own (executor, SGD with momentum, ring gossip on the
[n, d] buffer); the plain step is one module on the total batch n*B with torch.optim.SGD.
Both do the same arithmetic, so their time ratio is the simulator's overhead. All variants
of one table are built first, then timed interleaved in one process (A, B, C, A, B, C, ...)
and reported as medians, so that a drift of the machine (clocks, other jobs) hits them alike.

  speed_report(...)     the CPU report: the overhead rows (cnn1d, cnn) and loop vs vectorized
                        executors for the default model (cnn1d on MNIST-1D's 1x40)
  gpu_report(...)       the CUDA report: resnet18 on 32x32, 16 workers, local batch 64 and 512,
                        fp32 and bf16, NCHW and channels-last; loop vs vmap (vs native where the
                        model has one) vs the single model; and the projected time of the
                        zhu2023-fig1 run at total batch 8192
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import topologies
from algorithms import StepContext
from algorithms.base import build as build_algorithm
from bench.spec import BuildContext
from bench.comm import SimulatedComm
from bench.config import RunConfig
from bench.models import build_model
from bench.workers import Workers

K = 10  # classes of the synthetic labels
ZHU_STEPS = 6000  # zhu2023-fig1: 6000 steps at local batch 512 x 16 workers = total batch 8192


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _time(fn, device) -> float:
    dev = torch.device(device)
    _sync(dev)
    t = time.perf_counter()
    fn()
    _sync(dev)
    return time.perf_counter() - t


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def _free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# the two kinds of step


def plain_step(model: str, input_shape: tuple, x: torch.Tensor, y: torch.Tensor, precision: str = "fp32",
               channels_last: bool = False, compile: bool = False):
    """A closure doing one plain SGD step of one module on the whole batch x [n, B, ...] (flattened).

    If the total batch does not fit (CUDA out of memory), the step accumulates gradients over
    micro-batches (closure.micro tells how many): the same arithmetic, run in pieces.
    """
    dev = x.device
    n, B = x.shape[:2]
    torch.manual_seed(0)
    single = build_model(model, input_shape, K).to(dev)
    image = x.dim() == 5
    if channels_last and image:
        single = single.to(memory_format=torch.channels_last)
    fwd = torch.compile(single) if compile else single
    opt = torch.optim.SGD(single.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    xs, ys = x.reshape(n * B, *input_shape), y.reshape(-1)
    if channels_last and image:
        xs = xs.contiguous(memory_format=torch.channels_last)
    ctx = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if precision == "bf16" else None

    def step():
        opt.zero_grad(set_to_none=True)
        m = step.micro
        for xc, yc in zip(xs.chunk(m), ys.chunk(m)):
            if ctx is None:
                loss = F.cross_entropy(fwd(xc), yc)
            else:
                with ctx():
                    loss = F.cross_entropy(fwd(xc).float(), yc)
            (loss * (len(yc) / len(ys))).backward()
        opt.step()

    step.micro = 1
    return step


def simulated_step(model: str, input_shape: tuple, x: torch.Tensor, y: torch.Tensor, executor: str = "auto",
                   precision: str = "fp32", channels_last: bool = False, compile: bool = False):
    """A closure doing one simulated D-SGD step (ring, n = x.shape[0] workers); closure.workers is the Workers."""
    dev = x.device
    n, B = x.shape[:2]
    cfg = RunConfig(algo="dsgd", workers=n, batch=B, lr=0.01, steps=1).resolve(n * B, model)
    comm = SimulatedComm(n, topologies.get_topology("ring", n), dev)
    torch.manual_seed(0)
    w = Workers(build_model(model, input_shape, K), n, executor, dev, precision=precision,
                channels_last=channels_last, compile=compile, log=lambda m: None)
    topo = comm.mixer.topology
    algo = build_algorithm(cfg.hyper(), BuildContext(layout=w.layout, n_local=n, n=n, device=dev, dtype=w.dtype,
                                                     total_steps=1, epoch_len=1, warmup=0, lr_at=lambda t: 0.01,
                                                     seed=0, topology=topo))
    state = {"t": 0}

    def step():
        ctx = StepContext(state["t"], 0.01, 0.01, comm, 0)
        _, w.X = algo.step(w, w.X, x, y, ctx)
        state["t"] += 1

    step.workers = w
    return step


def _warm(fn, dev: torch.device, warmup: int) -> Optional[str]:
    """Run fn warmup times; on CUDA out of memory let it shrink (plain: micro-batches) and retry."""
    while True:
        try:
            for _ in range(warmup):
                fn()
            _sync(dev)
            return None
        except Exception as e:
            if not _is_oom(e):
                raise
        _free(dev)  # outside the except block, whose traceback holds the failed step's tensors
        micro = getattr(fn, "micro", None)
        if micro is None or micro >= 64:
            return "out of memory"
        fn.micro = micro * 2


def interleaved(fns: dict[str, Callable], dev: torch.device, repeats: int, warmup: int = 3) -> dict[str, dict]:
    """Median seconds per call of each fn, timed A, B, C, A, B, C, ... after warmup calls of each."""
    errors = {}
    for name, fn in fns.items():
        err = _warm(fn, dev, warmup)
        if err:
            errors[name] = err
    live = {k: f for k, f in fns.items() if k not in errors}
    times = {k: [] for k in live}
    for _ in range(repeats):
        for k, f in live.items():
            times[k].append(_time(f, dev))
    out = {k: {"s": statistics.median(v), "min": min(v), "max": max(v), "error": None} for k, v in times.items()}
    out.update({k: {"s": None, "min": None, "max": None, "error": e} for k, e in errors.items()})
    return out


def machine_load() -> Optional[float]:
    """The 1-minute load average per core (above ~1 other work is competing for the cores)."""
    try:
        import os

        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        return None


BUSY = 0.5  # load per core above which timings are flagged (a quiet machine is ~0 before timing starts)


# ----------------------------------------------------------------------------------------------
# tables


def measure(model: str, input_shape: tuple, n: int, B: int, device: str, repeats: int, executor: str = "auto"):
    """One overhead row: the simulated D-SGD step (executor) vs the single model at the same total batch."""
    dev = torch.device(device)
    torch.manual_seed(0)
    x = torch.randn(n, B, *input_shape, device=dev)
    y = torch.randint(0, K, (n, B), device=dev)
    sim = simulated_step(model, input_shape, x, y, executor)
    res = interleaved({"plain": plain_step(model, input_shape, x, y), "simulated": sim}, dev, repeats, warmup=5)
    ta, tb = res["plain"]["s"], res["simulated"]["s"]
    return {"model": model, "input": "x".join(map(str, input_shape)), "workers": n, "local batch": B,
            "executor": sim.workers.executor, "single ms": ta * 1e3,
            "single min-max": f"{res['plain']['min'] * 1e3:.2f}-{res['plain']['max'] * 1e3:.2f}",
            "simulated ms": tb * 1e3,
            "simulated min-max": f"{res['simulated']['min'] * 1e3:.2f}-{res['simulated']['max'] * 1e3:.2f}",
            "ratio": tb / ta}


def executor_table(model: str, input_shape: tuple, n: int, B: int, device: str, repeats: int,
                   executors=("loop", "vmap", "native"), precision: str = "fp32", channels_last: bool = False,
                   compile: bool = False, warmup: int = 3, log=print) -> list[dict]:
    """Rows: the single-model step and one simulated D-SGD step per executor, timed interleaved.

    Executors the model cannot use (native without batched_forward) are left out; a variant
    that runs out of memory gets a row saying so. "vs single" = step time / single-model step
    time (1.0 = no overhead); "vs loop" = loop time / this time (> 1: faster than the loop).
    """
    dev = torch.device(device)
    torch.manual_seed(0)
    x = torch.randn(n, B, *input_shape, device=dev)
    y = torch.randint(0, K, (n, B), device=dev)
    fns: dict[str, Callable] = {"single": plain_step(model, input_shape, x, y, precision, channels_last, compile)}
    for ex in executors:
        if ex == "native" and not hasattr(build_model(model, input_shape, K), "batched_forward"):
            continue
        fns[ex] = simulated_step(model, input_shape, x, y, ex, precision, channels_last, compile)
    layout = "nhwc" if channels_last and len(input_shape) == 3 else "nchw" if len(input_shape) == 3 else "-"
    log(f"timing {model} {'x'.join(map(str, input_shape))} n={n} B={B} {precision} {layout}: "
        f"{', '.join(fns)} ...")
    res = interleaved(fns, dev, repeats, warmup)
    single, loop = res["single"]["s"], res.get("loop", {}).get("s")
    rows = []
    for name, fn in fns.items():
        r, s = res[name], res[name]["s"]
        if name == "single":
            what = "single model" + (f" ({fn.micro} micro-batches)" if fn.micro > 1 else "")
        else:
            w = fn.workers
            what = f"D-SGD {w.executor}" + (f" ({w.chunk} workers/call)" if w.chunk and w.chunk < n else "")
        rows.append({"model": model, "input": "x".join(map(str, input_shape)), "workers": n, "local batch": B,
                     "precision": precision, "layout": layout, "step": what,
                     "ms": s * 1e3 if s else None,
                     "min-max ms": f"{r['min'] * 1e3:.2f}-{r['max'] * 1e3:.2f}" if s else None,
                     "steps/s": 1.0 / s if s else None,
                     "vs single": s / single if s and single else None,
                     "vs loop": loop / s if s and loop and name != "single" else None,
                     "note": r["error"] or ""})
    timed = {name: res[name]["s"] for name in fns if name != "single" and res[name]["s"]}
    if timed:
        from bench.workers import auto_executor

        auto = auto_executor(build_model(model, input_shape, K), dev)
        best = min(timed, key=timed.get)
        if auto in timed and best != auto and timed[auto] > 1.1 * timed[best]:
            log(f"note: auto picks {auto} for {model} on {dev.type}, but {best} was {timed[auto] / timed[best]:.2f}x "
                f"faster here (bench/workers.py AUTO_EXECUTOR)")
    del fns
    _free(dev)
    return rows


def speed_report(device: str, n: int, repeats: int, threads: int = 0, log=print) -> list[dict]:
    """The overhead rows (cnn1d on 1x40, cnn on 3x32x32; executor auto), as before."""
    if threads:
        torch.set_num_threads(threads)
    rows = []
    for model, shape, B in (("cnn1d", (1, 40), 32), ("cnn", (3, 32, 32), 32)):
        log(f"timing {model} on {shape} ...")
        rows.append(measure(model, shape, n, B, device, repeats))
    return rows


def cpu_report(n: int = 16, repeats: int = 50, threads: int = 0, log=print,
               executors=("loop", "vmap", "native")) -> dict[str, list[dict]]:
    """`dsgdbench speed`: the overhead rows, and loop vs vectorized for the default model (cnn1d, 1x40)."""
    tables = {f"simulated D-SGD (ring, n={n}) vs single-model SGD, same total batch, cpu":
              speed_report("cpu", n, repeats, threads, log)}
    tables[f"executors: cnn1d on 1x40 (MNIST-1D), n={n}, local batch 32, cpu"] = executor_table(
        "cnn1d", (1, 40), n, 32, "cpu", repeats, executors, log=log)
    return tables


SCALE_N = (16, 64, 256, 1024, 4096)


def scale_report(ns=SCALE_N, B: int = 8, repeats: int = 5, log=print) -> dict[str, list[dict]]:
    """`dsgdbench speed --scale`: how the simulator's cost grows with the number of workers.

    Per n (cnn1d on 1x40, local batch B, ring, the native executor): the single-model SGD step at the
    total batch n*B and the simulated D-SGD step, timed interleaved; their ratio; the cost per
    sample; and the mixing step alone (W X on the [n, d] buffer) for the ring and the exponential
    graph. Each n in its own interleaved measurement; medians and min-max.
    """
    from bench.comm import Mixer

    rows = []
    for n in ns:
        log(f"timing n={n} (local batch {B}, total {n * B}) ...")
        torch.manual_seed(0)
        x = torch.randn(n, B, 1, 40)
        y = torch.randint(0, K, (n, B))
        sim = simulated_step("cnn1d", (1, 40), x, y, "native")
        X = sim.workers.X.clone()
        mix = {name: Mixer(topologies.get_topology(name, n), "cpu") for name in ("ring", "exponential")}
        fns = {"single": plain_step("cnn1d", (1, 40), x, y), "simulated": sim,
               "mix ring": lambda: mix["ring"](X, 0), "mix exponential": lambda: mix["exponential"](X, 0)}
        res = interleaved(fns, torch.device("cpu"), repeats, warmup=2)
        single, step = res["single"]["s"], res["simulated"]["s"]
        rows.append({"workers": n, "local batch": B, "params": sim.workers.layout.d,
                     "single ms": single * 1e3, "simulated ms": step * 1e3,
                     "simulated min-max": f"{res['simulated']['min'] * 1e3:.1f}-{res['simulated']['max'] * 1e3:.1f}",
                     "ratio": step / single, "us/sample single": single / (n * B) * 1e6,
                     "us/sample simulated": step / (n * B) * 1e6,
                     "mix ring ms": res["mix ring"]["s"] * 1e3, "mix exponential ms": res["mix exponential"]["s"] * 1e3,
                     "load/core": machine_load()})
        del fns, sim, X
        _free(torch.device("cpu"))
    return {f"scaling: cnn1d on 1x40, local batch {B}, ring, native executor, cpu ({torch.get_num_threads()} threads)":
            rows}


def gpu_report(models=("resnet18",), batches=(64, 512), precisions=("fp32", "bf16"), layouts=("nchw", "nhwc"),
               n: int = 16, repeats: int = 10, warmup: int = 3, executors=("loop", "vmap", "native"),
               compile: bool = False, device: str = "cuda", log=print) -> dict[str, list[dict]]:
    """`dsgdbench speed --device cuda`: every (model, local batch, precision, layout) as one interleaved table."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the same for every variant: each gets its fastest kernels
    tables: dict[str, list[dict]] = {}
    for model in models:
        shape = (3, 32, 32)
        for B in batches:
            for prec in precisions:
                for lay in layouts:
                    title = f"{model} 3x32x32, n={n}, local batch {B} (total {n * B}), {prec}, {lay}, {dev.type}"
                    tables[title] = executor_table(model, shape, n, B, device, repeats, executors, prec,
                                                   lay == "nhwc", compile, warmup, log)
    tables["projection"] = projection([r for rows in tables.values() for r in rows], n)
    return tables


def projection(rows: list[dict], n: int = 16, B: int = 512, steps: int = ZHU_STEPS) -> list[dict]:
    """Projected training time of the zhu2023-fig1 ring run at total batch n*B from the measured step times.

    steps x (D-SGD step time at local batch B), per precision/layout with the fastest executor;
    the single model at the same total batch beside it (what C-SGD on one device would cost).
    Evaluation is excluded: about 10 evaluations of x_bar (10k test + 2k train images and a
    BatchNorm recalibration each) and the final Hessian add minutes, not hours.
    """
    out = []
    keys = sorted({(r["model"], r["precision"], r["layout"]) for r in rows
                   if r["local batch"] == B and r["workers"] == n})
    for model, prec, lay in keys:
        sel = [r for r in rows if (r["model"], r["precision"], r["layout"], r["local batch"], r["workers"])
               == (model, prec, lay, B, n) and r["ms"]]
        sims = [r for r in sel if r["step"].startswith("D-SGD")]
        single = [r for r in sel if r["step"].startswith("single")]
        if not sims:
            continue
        best = min(sims, key=lambda r: r["ms"])
        out.append({"run": f"zhu2023-fig1 ring, {model}, total batch {n * B}", "precision": prec, "layout": lay,
                    "executor": best["step"][len("D-SGD "):], "ms/step": best["ms"], "steps": steps,
                    "hours": steps * best["ms"] / 1e3 / 3600,
                    "single-model hours": steps * single[0]["ms"] / 1e3 / 3600 if single else None,
                    "note": "training only; evaluation excluded"})
    return out


def cell(v) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def to_markdown(tables: dict[str, list[dict]]) -> str:
    """The tables as GitHub markdown, one section per table, every column."""
    parts = []
    for title, rows in tables.items():
        if rows:
            cols = list(rows[0])
            parts.append(f"### {title}\n\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
                         + "".join("| " + " | ".join(cell(r[c]) for c in cols) + " |\n" for r in rows))
    return "\n".join(parts)
