"""The n workers' models as one flat parameter buffer, and the executors that run them.

Parameters of all workers live in one float32 tensor X of shape [n, d] (row i is
worker i's flattened parameters, in the module's named_parameters order). Gossip
is then one operation on X, the average model is X.mean(0) and the consensus
distance one reduction. BatchNorm running statistics are per-worker buffers of
shape [n, *shape]; they are local state and are not gossiped.

Executors compute the logits of every worker on its own batch:
  native - the model's batched_forward (grouped convolutions, batched matmuls): one
           kernel per layer for all workers; used whenever the model has one.
  loop   - torch.func.functional_call of the one module, worker by worker, with that
           worker's parameter views; works for any nn.Module (resnet18, timm models).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from bench.errors import UserError


@dataclass(frozen=True)
class Slot:
    name: str
    shape: tuple[int, ...]
    start: int
    stop: int


class ParamLayout:
    """Where each parameter of a module sits in a flat vector of length d."""

    def __init__(self, module: nn.Module):
        self.slots: list[Slot] = []
        off = 0
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            k = p.numel()
            self.slots.append(Slot(name, tuple(p.shape), off, off + k))
            off += k
        self.d = off
        # Float buffers (BatchNorm running statistics); integer ones (num_batches_tracked) stay in the module.
        self.buffer_shapes = {name: tuple(b.shape) for name, b in module.named_buffers() if b.is_floating_point()}

    def views(self, X: torch.Tensor) -> dict[str, torch.Tensor]:
        """{name: [n, *shape]} views into X [n, d] (they share X's storage)."""
        n = X.shape[0]
        return {s.name: X[:, s.start:s.stop].view(n, *s.shape) for s in self.slots}

    def row_views(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{name: shape} views into one flat vector x [d]."""
        return {s.name: x[s.start:s.stop].view(s.shape) for s in self.slots}

    def flatten(self, module: nn.Module) -> torch.Tensor:
        params = dict(module.named_parameters())
        return torch.cat([params[s.name].detach().reshape(-1) for s in self.slots])

    def load(self, module: nn.Module, x: torch.Tensor) -> None:
        """Copy a flat vector x [d] into the module's parameters."""
        params = dict(module.named_parameters())
        with torch.no_grad():
            for s in self.slots:
                params[s.name].copy_(x[s.start:s.stop].view(s.shape))

    def one_d_mask(self, device=None) -> torch.Tensor:
        """[d] bool: entries of parameters with ndim <= 1 (biases, normalisation scales)."""
        m = torch.zeros(self.d, dtype=torch.bool, device=device)
        for s in self.slots:
            if len(s.shape) <= 1:
                m[s.start:s.stop] = True
        return m

    def filter_ids(self, device=None) -> tuple[torch.Tensor, int]:
        """[d] int64 id of the filter (output unit) each entry belongs to, and the number of filters.

        A filter is one slice along dim 0 of a weight with ndim >= 2; every entry of a 1-D
        parameter is its own filter. Used for filter-relative noise (AD-SAM) and
        filter normalisation (loss landscapes).
        """
        ids, nxt = [], 0
        for s in self.slots:
            k = s.stop - s.start
            rows = s.shape[0] if len(s.shape) >= 2 else k
            ids.append(torch.arange(nxt, nxt + rows).repeat_interleave(k // rows))
            nxt += rows
        return torch.cat(ids).to(device), nxt


class Workers:
    """The local block of workers: parameters X [n_local, d], BN buffers, and the forward pass."""

    def __init__(self, module: nn.Module, n_local: int, executor: str = "auto", device="cpu"):
        self.module = module.to(device)
        self.eval_module = copy.deepcopy(self.module)  # holds x_bar for evaluation; never used for training
        self.layout = ParamLayout(self.module)
        self.n = n_local
        self.device = torch.device(device)
        x0 = self.layout.flatten(self.module).to(device)
        self.X = x0.unsqueeze(0).repeat(n_local, 1).contiguous()  # every worker starts from the same weights
        bufs = dict(self.module.named_buffers())
        self.buffers = {k: bufs[k].detach().unsqueeze(0).repeat(n_local, *([1] * len(s))).contiguous()
                        for k, s in self.layout.buffer_shapes.items()}
        has_native = hasattr(self.module, "batched_forward")
        if executor == "auto":
            executor = "native" if has_native else "loop"
        if executor == "native" and not has_native:
            raise UserError(f"--executor native: model {type(self.module).__name__} has no batched forward; use loop")
        if executor not in ("native", "loop"):
            raise UserError(f"unknown executor {executor!r}; valid: auto, native, loop")
        self.executor = executor

    def logits(self, P: torch.Tensor, x: torch.Tensor, mode: str = "train") -> torch.Tensor:
        """Logits [n, B, K] of every worker on its own batch x [n, B, ...], parameters P [n, d]."""
        bufs = self.buffers
        if mode == "frozen" and self.executor == "loop":
            bufs = {k: v.clone() for k, v in bufs.items()}  # statistics updated into throw-away copies
        if self.executor == "native":
            self.module.train(mode != "eval")
            return self.module.batched_forward(self.layout.views(P), bufs, x, mode)
        self.module.train(mode != "eval")
        pv = self.layout.views(P)
        outs = []
        for i in range(P.shape[0]):
            state = {k: v[i] for k, v in pv.items()}
            state.update({k: v[i] for k, v in bufs.items()})
            outs.append(functional_call(self.module, state, (x[i],)))
        return torch.stack(outs)

    def loss_and_grad(self, P: torch.Tensor, x: torch.Tensor, y: torch.Tensor, mode: str = "train"):
        """Per-worker mean cross-entropy [n] and its gradient [n, d] at P [n, d].

        Workers are independent, so the gradient of the sum of the workers' losses is,
        row by row, each worker's own gradient.
        """
        P = P.detach().requires_grad_(True)
        out = self.logits(P, x, mode)
        n, B, K = out.shape
        losses = F.cross_entropy(out.reshape(n * B, K), y.reshape(-1), reduction="none").view(n, B).mean(1)
        (grad,) = torch.autograd.grad(losses.sum(), P)
        return losses.detach(), grad

    def average(self) -> torch.Tensor:
        """Mean of the local workers' parameters [d] (the global mean needs the backend)."""
        return self.X.mean(0)

    def load_average(self, xbar: torch.Tensor) -> nn.Module:
        """eval_module holding x_bar (BN buffers: the local workers' mean; recalibrate before evaluating)."""
        self.layout.load(self.eval_module, xbar)
        mod_bufs = dict(self.eval_module.named_buffers())
        with torch.no_grad():
            for k, v in self.buffers.items():
                mod_bufs[k].copy_(v.mean(0))
        return self.eval_module


def param_bytes(layout: ParamLayout, dtype=torch.float32) -> int:
    return layout.d * torch.tensor([], dtype=dtype).element_size()


def count_params(module: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in module.parameters() if p.requires_grad)
