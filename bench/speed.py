"""Simulator overhead benchmark: one simulated D-SGD step vs one plain PyTorch step.

Both do the same arithmetic: n workers x local batch B through the model, one
SGD-with-momentum update. The plain step is one module on a batch of n*B with
torch.optim.SGD; the simulated step is the harness's own (executor, optimizer,
ring gossip on the [n, d] buffer). Their time ratio is the simulator's overhead.
Measured interleaved in one process (A, B, A, B, ...) and reported as medians.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from algorithms import StepContext, build_algorithm
from bench.comm import SimulatedComm
from bench.config import RunConfig
from bench.models import build_model
from bench.workers import Workers
import topologies


def _time(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def measure(model: str, input_shape: tuple, n: int, B: int, device: str, repeats: int, executor: str = "auto"):
    dev = torch.device(device)
    K = 10
    torch.manual_seed(0)
    x = torch.randn(n, B, *input_shape, device=dev)
    y = torch.randint(0, K, (n, B), device=dev)
    # plain single model, total batch n*B
    single = build_model(model, input_shape, K).to(dev)
    opt = torch.optim.SGD(single.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    xs, ys = x.reshape(n * B, *input_shape), y.reshape(-1)

    def plain():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(single(xs), ys).backward()
        opt.step()

    cfg = RunConfig(algo="dsgd", workers=n, batch=B, lr=0.01, steps=1).resolve(n * B, model)
    topo = topologies.get_topology("ring", n)
    comm = SimulatedComm(n, topo, dev)
    torch.manual_seed(0)
    w = Workers(build_model(model, input_shape, K), n, executor, dev)
    algo = build_algorithm(cfg, w.layout, n, dev, 1, 1)
    state = {"t": 0}

    def simulated():
        ctx = StepContext(state["t"], 0.01, 0.01, comm, 0)
        _, w.X = algo.step(w, w.X, x, y, ctx)
        state["t"] += 1

    for _ in range(5):
        plain()
        simulated()
    a, b = [], []
    for _ in range(repeats):
        a.append(_time(plain, dev))
        b.append(_time(simulated, dev))
    ta, tb = statistics.median(a), statistics.median(b)
    return {"model": model, "input": "x".join(map(str, input_shape)), "workers": n, "local batch": B,
            "executor": w.executor, "single ms": ta * 1e3, "simulated ms": tb * 1e3, "ratio": tb / ta}


def speed_report(device: str, n: int, repeats: int, threads: int = 0, log=print) -> list[dict]:
    if threads:
        torch.set_num_threads(threads)
    rows = []
    for model, shape, B in (("cnn1d", (1, 40), 32), ("cnn", (3, 32, 32), 32)):
        log(f"timing {model} on {shape} ...")
        rows.append(measure(model, shape, n, B, device, repeats))
    return rows
