"""The n workers' models as one flat parameter buffer, and the executors that run them.

Parameters of all workers live in one float32 (float64 with precision "fp64") tensor X of shape [n, d] (row i is
worker i's flattened parameters, in the module's named_parameters order). Gossip
is then one operation on X, the average model is X.mean(0) and the consensus
distance one reduction. BatchNorm running statistics are per-worker buffers of
shape [n, *shape]; they are local state and are not gossiped.

Executors compute the logits of every worker on its own batch:
  native - the model's batched_forward (grouped convolutions, batched matmuls): one
           kernel per layer for all workers; used whenever the model has one.
  vmap   - torch.func.vmap of functional_call of the one module over the rows of X
           (views [n, *shape]) and the BN buffers [n, *shape]: any nn.Module, all
           workers in one batched call (vmap's batching rules turn a convolution
           into one grouped convolution, BatchNorm into BatchNorm over n*C channels:
           what batched_forward does by hand). Gradients by ordinary autograd through
           the vmapped forward (the backward is one batched pass too). BatchNorm
           running buffers go in as batched inputs and are updated in place, per
           worker, exactly as the module would update its own.
  loop   - functional_call of the one module, worker by worker, with that worker's
           parameter views; the readable reference the others are tested against.
  auto   - the fastest measured executor for the model and device: AUTO_EXECUTOR below where
           it has an entry, else native when the model has batched_forward, else vmap on
           CUDA and loop on CPU (there vmap is not reliably faster than the loop: resnet18,
           3x32x32, 4 workers x 8 on a shared 2-core machine: vmap 1.21 s vs loop 0.97 s with 2
           threads). `dsgdbench speed` times every executor and says when auto's choice is not
           the fastest on the machine at hand. If vmap fails on a model (an op without a
           batching rule that cannot fall back), auto switches to loop with a warning.

Numerics options (none changes what a run computes beyond rounding; none is in the run id
except precision):
  precision "bf16"  torch.autocast(bfloat16) around forward and loss; parameters, BN
                    buffers, gradients and losses stay float32.
  precision "fp64"  the module, X, BN buffers, inputs, gradients and optimizer state in
                    float64. Executors and backends then agree to ~1e-13 instead of float32's
                    machine-dependent ~1e-6: the equality tests run in it.
  channels_last     4-D image inputs laid out NHWC per worker (loop) or as
                    [B, H, W, n, C] (vmap, native: the grouped convolution over n*C
                    channels then sees a channels-last input); 4-D weights channels-last
                    in the loop executor. Models with non-image inputs ignore it.
  compile           torch.compile of the executor's forward (one graph for all workers
                    with vmap/native, the per-worker forward with loop). A compilation
                    failure prints one warning and the run continues eagerly.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from bench.config import EXECUTORS, PRECISIONS
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




# (device type, model class) -> the executor `auto` picks where the default rule is not the fastest.
# Measured with `dsgdbench speed` on a 2-core CPU, n = 16, local batch 32, ratios to the single-model
# step: the cnn on 3x32x32 images runs 0.57x with the loop and 1.05x with the native grouped
# convolutions (its small channel counts leave the grouped kernels no work to share).
AUTO_EXECUTOR = {("cpu", "CNN"): "loop"}


def auto_executor(module: nn.Module, device) -> str:
    dev = torch.device(device).type
    choice = AUTO_EXECUTOR.get((dev, type(module).__name__))
    if choice is not None:
        return choice
    return "native" if hasattr(module, "batched_forward") else ("vmap" if dev == "cuda" else "loop")


def channels_last_input(x: torch.Tensor, executor: str) -> torch.Tensor:
    """x [n, B, C, H, W] (same values) in the memory layout the executor's convolutions want NHWC in.

    loop:         physical [n, B, H, W, C] - every worker's x[i] is channels-last.
    vmap, native: physical [B, H, W, n, C] - the packed view [B, n*C, H, W] that the grouped
                  convolution reads is channels-last (a view, no copy inside the model).
    """
    if executor == "loop":
        return x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    return x.permute(1, 3, 4, 0, 2).contiguous().permute(3, 0, 4, 1, 2)


class _NormCast:
    """Forward hooks of normalisation layers: float32 in, bfloat16 out, while `active`."""

    def __init__(self):
        self.active = False

    def pre(self, module, args):
        if self.active:
            return (args[0].float(), *args[1:])

    def post(self, module, args, out):
        if self.active:
            return out.to(torch.bfloat16)


class Workers:
    """The local block of workers: parameters X [n_local, d], BN buffers, and the forward pass.

    precision ("fp32" | "bf16"), channels_last and compile are how the forward runs,
    not what it computes (see the module docstring).
    """

    def __init__(self, module: nn.Module, n_local: int, executor: str = "auto", device="cpu",
                 precision: str = "fp32", channels_last: bool = False, compile: bool = False, log=None):
        self.dtype = torch.float64 if precision == "fp64" else torch.float32
        self.module = module.to(device, self.dtype)
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
        if executor not in EXECUTORS:
            raise UserError(f"unknown executor {executor!r}; valid: {', '.join(EXECUTORS)}")
        self.requested = executor
        if executor == "auto":
            executor = auto_executor(self.module, self.device)
        if executor == "native" and not has_native:
            raise UserError(f"--executor native: model {type(self.module).__name__} has no batched forward; "
                            f"use vmap or loop")
        self.executor = executor
        if precision not in PRECISIONS:
            raise UserError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
        self.precision = precision
        self.channels_last = bool(channels_last)
        self.compile = bool(compile)
        self._log = log or (lambda m: print(f"warning: {m}", file=sys.stderr))
        self._compiled: dict[str, object] = {}  # executor -> compiled forward (None: compilation failed)
        self._compile_ok: set = set()  # (executor, mode, input shape) graphs compiled and run once
        self._vmap_checked = False
        # Workers per vectorized forward/backward (0: all; see loss_and_grad). The native executor on a CPU
        # goes 64 workers at a time: grouped convolutions over more groups fall out of the caches (cnn1d at
        # n = 1024: 1.5x the single-model step in one call, 1.0x in chunks of 64); n <= 64 is one call.
        self.chunk = 64 if executor == "native" and self.device.type == "cpu" and n_local > 64 else 0
        norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
        norms = [(name, m) for name, m in self.module.named_modules() if isinstance(m, norm_types)]
        self._norm_params = {f"{name}.{p}" if name else p for name, m in norms for p, _ in m.named_parameters(recurse=False)}
        self._norm_cast = _NormCast()  # active while a bf16 vmap forward runs: see _forward_vmap
        if precision == "bf16":
            for _, m in norms:
                m.register_forward_pre_hook(self._norm_cast.pre)
                m.register_forward_hook(self._norm_cast.post)

    # ------------------------------------------------------------------ forward
    def autocast(self):
        """The autocast context of a forward/backward (a no-op in fp32)."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _forward_native(self, pv: dict, bufs: dict, x: torch.Tensor, mode: str) -> torch.Tensor:
        return self.module.batched_forward(pv, bufs, x, mode)

    def _forward_loop(self, pv: dict, bufs: dict, x: torch.Tensor, mode: str) -> torch.Tensor:
        outs = []
        for i in range(x.shape[0]):
            state = dict(pv[i]) if isinstance(pv, list) else {k: v[i] for k, v in pv.items()}
            if self.channels_last:
                state = {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v
                         for k, v in state.items()}
            state.update({k: v[i] for k, v in bufs.items()})
            outs.append(functional_call(self.module, state, (x[i],)))
        return torch.stack(outs)

    def _forward_vmap(self, pv: dict, bufs: dict, x: torch.Tensor, mode: str) -> torch.Tensor:
        module = self.module
        if self.precision == "bf16":
            # Autocast does not reach every op under vmap (a convolution's batching rule calls
            # aten::convolution below autocast's conv2d kernel and would run in float32), so cast by
            # hand what autocast would: inputs and weights to bfloat16; normalisation layers keep
            # float32 affine parameters (as under autocast, which leaves batch_norm alone). The casts
            # are differentiable: gradients arrive in float32 on P.
            # Normalisation layers compute in float32 and return bfloat16 (forward hooks): vmap's
            # BatchNorm rule with per-worker running statistics rejects a bfloat16 input beside
            # float32 statistics.
            x = x.to(torch.bfloat16) if x.is_floating_point() else x
            pv = {k: v if k in self._norm_params else v.to(torch.bfloat16) for k, v in pv.items()}

        def one(p, b, xi):
            return functional_call(module, {**p, **b}, (xi,))

        # randomness="different": dropout draws independent masks per worker, as separate modules would.
        self._norm_cast.active = self.precision == "bf16"
        try:
            return torch.func.vmap(one, in_dims=(0, 0, 0), randomness="different")(pv, bufs, x)
        finally:
            self._norm_cast.active = False

    def _runner(self, executor: str):
        fn = getattr(self, f"_forward_{executor}")
        if not self.compile:
            return fn
        if executor not in self._compiled:
            self._compiled[executor] = torch.compile(fn, dynamic=False)
        return self._compiled[executor] or fn

    def _call(self, executor: str, pv, bufs, x, mode):
        fn = self._runner(executor)
        key = (executor, mode, tuple(x.shape))
        if not self.compile or self._compiled.get(executor) is None or key in self._compile_ok:
            return fn(pv, bufs, x, mode)
        # First call of a new graph: compilation happens now; if it fails, restore the BN buffers
        # (a partial forward may have touched them) and run eagerly from then on.
        saved = {k: v.clone() for k, v in bufs.items()}
        try:
            out = fn(pv, bufs, x, mode)
        except Exception as e:  # compilation is an optimisation: fall back to eager, say so once
            msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
            self._log(f"--compile: torch.compile failed for the {executor} executor "
                      f"({type(e).__name__}: {msg}); running eagerly")
            self._compiled[executor] = None
            for k, v in bufs.items():
                v.copy_(saved[k])
            return getattr(self, f"_forward_{executor}")(pv, bufs, x, mode)
        self._compile_ok.add(key)
        return out

    def logits(self, P: torch.Tensor, x: torch.Tensor, mode: str = "train") -> torch.Tensor:
        """Logits [n, B, K] of every worker on its own batch x [n, B, ...], parameters P [n, d].

        mode: "train" (batch statistics, running buffers updated), "frozen" (batch statistics,
        buffers untouched), "eval" (running statistics). Runs under the autocast of
        `precision`; the logits may be bfloat16 then.
        """
        return self._logits(self.layout.views(P), x, mode, slice(None))

    def _logits(self, pv, x: torch.Tensor, mode: str, rows: slice) -> torch.Tensor:
        """logits() from parameters pv: {name: [m, *shape]}, or (loop) a list of m {name: shape} dicts.

        rows: which rows of the BN buffers pv and x belong to (a chunk of the local workers).
        """
        bufs = {k: v[rows] for k, v in self.buffers.items()}  # views: in-place updates reach self.buffers
        if mode == "frozen" and self.executor != "native":
            bufs = {k: v.clone() for k, v in bufs.items()}  # statistics updated into throw-away copies
        self.module.train(mode != "eval")
        if self.dtype == torch.float64 and x.is_floating_point():
            x = x.double()  # fp64: inputs follow the parameters (data sets are stored as float32/uint8)
        if self.channels_last and x.dim() == 5:
            x = channels_last_input(x, self.executor)
        with self.autocast():
            if self.executor == "vmap" and self.requested == "auto" and not self._vmap_checked:
                return self._first_vmap(pv, bufs, x, mode)
            return self._call(self.executor, pv, bufs, x, mode)

    def _first_vmap(self, pv, bufs, x, mode):
        """auto chose vmap: if this model cannot run under vmap, switch to the loop executor (once)."""
        saved = {k: v.clone() for k, v in bufs.items()}
        try:
            out = self._call("vmap", pv, bufs, x, mode)
        except torch.cuda.OutOfMemoryError:
            raise  # not a vmap problem: loss_and_grad splits the workers into chunks
        except Exception as e:
            self._log(f"executor auto: vmap failed on {type(self.module).__name__} ({type(e).__name__}); "
                      f"using the loop executor")
            for k, v in bufs.items():
                v.copy_(saved[k])
            self.executor = "loop"
            self._vmap_checked = True
            if self.channels_last and x.dim() == 5:
                x = channels_last_input(x.contiguous(), "loop")
            return self._call("loop", pv, bufs, x, mode)
        self._vmap_checked = True
        return out

    def loss_and_grad(self, P: torch.Tensor, x: torch.Tensor, y: torch.Tensor, mode: str = "train"):
        """Per-worker mean cross-entropy [n] and its gradient [n, d] at P [n, d], both in X's dtype.

        Workers are independent, so the gradient of the sum of the workers' losses is,
        row by row, each worker's own gradient. `chunk` workers go through one forward and
        backward (all by default); on a CUDA out-of-memory error the chunk is halved (BN
        buffers restored, the step retried, one warning): the same numbers, less memory.
        """
        n = P.shape[0]
        while True:
            k = min(n, self.chunk or n)
            guard = self.device.type == "cuda" and k > 1
            saved = {key: v.clone() for key, v in self.buffers.items()} if guard else None
            try:
                return self._loss_and_grad(P, x, y, mode, k)
            except torch.cuda.OutOfMemoryError:
                if not guard:
                    raise
            # Outside the except block: its traceback no longer holds the failed pass's tensors.
            for key, v in self.buffers.items():
                v.copy_(saved[key])
            del saved
            torch.cuda.empty_cache()
            self.chunk = (k + 1) // 2
            self._log(f"{self.executor} executor: CUDA out of memory with {k} workers per call; "
                      f"using {self.chunk}")

    def _leaves(self, P: torch.Tensor):
        """The parameters of the rows of P as autograd leaves that are views into P's storage.

        Gradients are taken with respect to these views, not P: the backward of slicing P
        would build a dense [n, d] gradient per parameter tensor (and per worker in the loop)
        and sum them, O(parameter tensors x n x d) memory traffic per step; this way G is
        written once, O(n x d). vmap/native: {name: [m, *shape]}; loop: one dict per worker.
        """
        m = P.shape[0]
        slots = self.layout.slots
        if self.executor == "loop":
            return [{s.name: P[i, s.start:s.stop].view(s.shape).detach().requires_grad_(True) for s in slots}
                    for i in range(m)]
        return {s.name: P[:, s.start:s.stop].view(m, *s.shape).detach().requires_grad_(True) for s in slots}

    def _loss_and_grad(self, P, x, y, mode, k):
        n = P.shape[0]
        losses = []
        G = torch.empty(n, self.layout.d, dtype=P.dtype, device=P.device)
        slots = self.layout.slots
        for s0 in range(0, n, k):
            rows = slice(s0, min(n, s0 + k))
            leaves = self._leaves(P[rows].detach())
            out = self._logits(leaves, x[rows], mode, rows)
            m, B, K = out.shape
            if out.dtype in (torch.bfloat16, torch.float16):
                out = out.float()  # the loss and everything after it in float32
            lk = F.cross_entropy(out.reshape(m * B, K), y[rows].reshape(-1), reduction="none").view(m, B).mean(1)
            per_worker = leaves if isinstance(leaves, list) else [leaves]
            tensors = [t for d in per_worker for t in d.values()]
            grads = iter(torch.autograd.grad(lk.sum(), tensors, allow_unused=True))
            for i, d in enumerate(per_worker):
                dst = G[rows] if len(per_worker) == 1 else G[s0 + i:s0 + i + 1]
                for s in slots:
                    g = next(grads)
                    if g is None:  # a parameter this forward did not use
                        dst[:, s.start:s.stop] = 0
                    else:
                        dst[:, s.start:s.stop] = g.reshape(dst.shape[0], -1)
            losses.append(lk.detach())
        return (losses[0] if len(losses) == 1 else torch.cat(losses)), G

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


_MALLOC_SET = False


def keep_freed_memory() -> bool:
    """glibc: serve every allocation from the heap and never give freed memory back (mallopt
    M_MMAP_MAX = 0, M_TRIM_THRESHOLD = max), so the [n, d] tensors a step frees are reused by the
    next step instead of being mapped afresh: at n = 1024 (cnn1d) each fresh 40 MB buffer costs
    ~10,000 page faults, about half of a D-SGD step. The process keeps its peak memory; the
    numbers are unchanged. Called once per process by the runner; a no-op elsewhere. Returns
    whether it took effect."""
    global _MALLOC_SET
    if _MALLOC_SET:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        _MALLOC_SET = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False
    return _MALLOC_SET


def count_params(module: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in module.parameters() if p.requires_grad)
