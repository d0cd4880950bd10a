"""Evaluation of the deployed (averaged) model, consensus distance, and cost counters."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.data import Dataset


def model_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x in the dtype of the module's parameters when both are floating (float64 models: precision fp64)."""
    p = next(module.parameters(), None)
    if p is not None and x.is_floating_point() and p.dtype == torch.float64:
        return x.to(p.dtype)
    return x


def has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


@torch.no_grad()
def recalibrate_bn(module: nn.Module, data: Dataset, idx: torch.Tensor, batch: int) -> None:
    """Recompute BatchNorm running statistics of `module` on training samples `idx`.

    The averaged model's own statistics are not those of any worker; the running mean
    and variance are reset and re-estimated as the cumulative average over batches of
    the local batch size (momentum None), in train mode, without touching parameters.
    """
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    module.train()
    for s in range(0, len(idx) - batch + 1, batch):
        module(model_input(module, data.prepare(data.x_train[idx[s:s + batch]])))
    for m, mom in zip(bns, saved):
        m.momentum = mom
    module.eval()


@torch.no_grad()
def evaluate(module: nn.Module, data: Dataset, x: torch.Tensor, y: torch.Tensor, batch: int = 1024):
    """Accuracy (%) and mean cross-entropy of `module` in eval mode on (x, y)."""
    module.eval()
    correct, loss_sum = 0, 0.0
    for s in range(0, len(y), batch):
        out = module(model_input(module, data.prepare(x[s:s + batch])))
        loss_sum += F.cross_entropy(out.float(), y[s:s + batch], reduction="sum").item()
        correct += (out.argmax(1) == y[s:s + batch]).sum().item()
    return 100.0 * correct / len(y), loss_sum / len(y)


def consensus_distance(X: torch.Tensor, xbar: torch.Tensor, comm) -> float:
    """(1/n) sum_i ||x_i - x_bar||^2 over all n workers."""
    local = ((X - xbar) ** 2).sum()
    return comm.sum(local).item() / comm.n


_FLOPS: dict = {}


def flops_per_grad(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """FLOPs of one forward + backward of one worker on one local batch (torch's flop counter).

    Counted once per process for each (model class, parameter shapes, input shape and dtype): the
    runs of a suite share it (the counter's first use costs about a second)."""
    from torch.utils.flop_counter import FlopCounterMode

    key = (type(module).__name__, tuple(tuple(p.shape) for p in module.parameters()), tuple(x.shape), x.dtype)
    if key in _FLOPS:
        return _FLOPS[key]
    module.train()
    with FlopCounterMode(display=False) as fc:
        F.cross_entropy(module(model_input(module, x)), y).backward()
    module.zero_grad(set_to_none=True)
    _FLOPS[key] = int(fc.get_total_flops())
    return _FLOPS[key]
