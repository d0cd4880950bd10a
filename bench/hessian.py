"""Sharpness of the deployed model: top Hessian eigenvalue and Hessian trace.

THE PROTOCOL (the same for every algorithm of a comparison, so that the numbers
in one table are comparable):

  model      x_bar, the average of the workers' parameters, after BatchNorm
             recalibration (bench.metrics.recalibrate_bn), in eval mode: BatchNorm
             uses its running statistics and dropout is off, so the loss is a fixed
             function of the parameters and nothing in the model changes during
             the measurement (no buffer update, no .grad written).
  loss       mean cross-entropy over the subset, without weight decay (the Hessian
             of the L2 term would only add wd to every eigenvalue).
  parameters all trainable ones (requires_grad), in named_parameters order; d of them.
  data       a fixed, seeded subset of the training set, without augmentation:
             `hessian_subset(N)` = the whole training set when N <= 5000 (MNIST-1D:
             all 4000 samples), else 2048 samples drawn with numpy's default_rng(seed).
             It depends only on N and the seed, so every algorithm and every seed of
             a comparison is measured on the same samples.
  start      the start vector (Lanczos v0, the power iteration's first vector) is
             numpy default_rng(seed).standard_normal(d); seed 0 by default.

Top eigenvalue (the algebraically largest one, lambda_max):
  lanczos  scipy.sparse.linalg.eigsh (ARPACK implicitly restarted Lanczos) on a float64
           LinearOperator that wraps the float32 Hessian-vector product; k=1, which="LA".
           ARPACK stops when the Ritz residual ||H v - theta v|| <= tol |theta|, which
           bounds the eigenvalue's error by tol |theta| (tol=1e-3: within 0.1%). The basis
           has ncv=10 vectors: scipy's default of 20 never costs fewer than 21 products, while
           10 converged in 12-17 products on MNIST-1D/cnn1d with errors below 1e-6.
  power    power iteration as in PyHessian (Yao et al. 2020): v <- Hv / ||Hv||, lambda =
           v^T H v, stop when the residual ||H v - lambda v|| <= tol |lambda| (v unit), else
           `converged` is False after max_iter products. Not PyHessian's rule (stop when
           lambda changes by < tol relative): when the top two eigenvalues are close, lambda
           creeps up so slowly that it plateaus below lambda_max (15% low on a small MLP)
           and that rule fires; the residual of such a mixture of two eigenvectors stays
           large. It converges to the eigenvalue of largest MAGNITUDE, slowly when the two
           largest are close. Limitation: the residual bounds the distance to SOME
           eigenvalue; a start almost orthogonal to the top eigenvector (|v0 . u1| below
           about tol |lambda| / (lambda_1 - lambda_2)) can still pass it near lambda_2.
           No test on one vector can rule that out. Lanczos, the default, shares it in
           principle (a Krylov method sees only what v0 holds) but amplifies a small
           component along u1 far faster.

Every result carries `residual` = ||H v - lambda v|| / |lambda| of the returned pair and
`hvps`, the Hessian-vector products spent. For Lanczos `hvps` counts the solver's
products plus the one extra product for the residual; power iteration gets its residual
from its last product, at no extra cost.

Adaptive sharpness (ASAM, Kwon et al. 2021): the top eigenvalue of T H T, T = diag(|w|),
w the flat parameter vector in the same layout, measured by the same method on the same
module state, data and start vector (the operator v -> |w| * H(|w| * v)). Why: the plain
lambda_max is not invariant to the rescalings that leave a ReLU network's function
unchanged. For a positively homogeneous network (ReLU, no BatchNorm), scaling layer l's
weights by a_l > 0 with prod a_l = 1, and its bias by a_1 ... a_l (the scale of its
pre-activation), gives w' = A w (A diagonal, positive) and L(A u) = L(u) for all u, so
H(w') = A^-1 H(w) A^-1 and lambda_max can be made as large or small as one likes. With
T' = |A w| = A T the scaled Hessian T' H(w') T' = T H(w) T is exactly unchanged.
measure_sharpness(adaptive=True) reports it as adaptive_top_eig, with its own
adaptive_hessian_hvps/_residual/_seconds (hessian_hvps/_seconds stay those of the plain eigenvalue and trace).

Trace: Hutchinson's estimator with Rademacher probes z (E[z^T H z] = tr H), mean and
standard error over the probes.
"""

from __future__ import annotations

import time
import warnings
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from bench.errors import UserError
from bench.workers import ParamLayout

FULL_SET_MAX = 5000  # training sets up to this size are measured on all of their samples
DEFAULT_SAMPLES = 2048  # larger ones on this many
HVP_METHODS = ("double-backward", "forward-over-reverse")
EIG_METHODS = ("lanczos", "power")


def hessian_subset(n_train: int, samples: int = 0, seed: int = 0) -> torch.Tensor:
    """Sorted int64 indices of the training samples the Hessian is measured on.

    samples=0: the default rule (all when n_train <= 5000, else 2048). A request larger
    than the training set gives the whole set.
    """
    if samples < 0:
        raise UserError(f"--hessian-samples must be >= 0 (0 = the default rule); got {samples}")
    if samples == 0:
        samples = n_train if n_train <= FULL_SET_MAX else DEFAULT_SAMPLES
    if samples >= n_train:
        return torch.arange(n_train, dtype=torch.int64)
    idx = np.random.default_rng(seed).choice(n_train, size=samples, replace=False)
    return torch.from_numpy(np.sort(idx).astype(np.int64))


class HVP:
    """v -> H v, H the Hessian of the mean cross-entropy of `module` on (x, y).

    The module is put in eval mode (see THE PROTOCOL) and is not otherwise changed: the
    products are taken with torch.autograd.grad / torch.func, never with .backward(), so
    no .grad is written. The samples are processed in chunks of `chunk`; chunk c adds the
    Hessian of (sum of its losses) / N, so the sum over chunks is exactly the Hessian of
    the mean and the memory is that of one chunk.

    method:
      double-backward       g = grad(loss, create_graph=True); Hv = grad(g, grad_outputs=v)
      forward-over-reverse  Hv = jvp(grad(loss o functional_call), (params,), (v,))

    Vectors are flat, of length d, in the layout of bench.workers.ParamLayout; `count`
    counts the products computed so far.
    """

    def __init__(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 1024,
                 method: str = "double-backward"):
        if method not in HVP_METHODS:
            raise UserError(f"unknown Hessian-vector product method {method!r}; valid: {', '.join(HVP_METHODS)}")
        if len(y) == 0:
            raise UserError("the Hessian subset is empty; use --hessian-samples > 0 or 0 for the default")
        self.module = module.eval()
        self.layout = ParamLayout(module)
        self.d = self.layout.d
        named = dict(module.named_parameters())
        self.params = [named[s.name] for s in self.layout.slots]
        first = self.params[0]
        self.dtype, self.device = first.dtype, first.device
        self.x = x.to(self.device, self.dtype if x.is_floating_point() else x.dtype)
        self.y = y.to(self.device)
        self.n = len(self.y)
        self.chunk = max(1, int(chunk))
        self.method = method
        self.count = 0

    def _chunks(self):
        for s in range(0, self.n, self.chunk):
            yield self.x[s:s + self.chunk], self.y[s:s + self.chunk]

    def loss(self) -> float:
        """The mean cross-entropy the Hessian is taken of."""
        with torch.no_grad():
            total = sum(F.cross_entropy(self.module(xc), yc, reduction="sum").item() for xc, yc in self._chunks())
        return total / self.n

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        if v.shape != (self.d,):
            raise ValueError(f"HVP: expected a vector of length {self.d}, got shape {tuple(v.shape)}")
        v = v.to(self.device, self.dtype)
        out = torch.zeros(self.d, dtype=self.dtype, device=self.device)
        with torch.enable_grad():
            for xc, yc in self._chunks():
                if self.method == "double-backward":
                    out += self._double_backward(xc, yc, v)
                else:
                    out += self._forward_over_reverse(xc, yc, v)
        self.count += 1
        return out

    def _double_backward(self, xc, yc, v):
        loss = F.cross_entropy(self.module(xc), yc, reduction="sum") / self.n
        grads = torch.autograd.grad(loss, self.params, create_graph=True)
        vs = [t.view(s.shape) for t, s in zip(self.layout.row_views(v).values(), self.layout.slots)]
        pairs = [(g, w) for g, w in zip(grads, vs) if g.requires_grad]
        if not pairs:  # the loss is linear in every parameter: H = 0
            return torch.zeros_like(v)
        hv = torch.autograd.grad([g for g, _ in pairs], self.params, grad_outputs=[w for _, w in pairs],
                                 allow_unused=True)
        return torch.cat([(h if h is not None else torch.zeros_like(p)).reshape(-1)
                          for h, p in zip(hv, self.params)])

    def _forward_over_reverse(self, xc, yc, v):
        names = [s.name for s in self.layout.slots]
        primals = {n: p.detach() for n, p in zip(names, self.params)}
        tangents = self.layout.row_views(v)
        n = self.n

        def loss_of(p):
            return F.cross_entropy(functional_call(self.module, p, (xc,)), yc, reduction="sum") / n

        with warnings.catch_warnings():  # torch's forward-AD set-up calls the deprecated torch.jit.script once
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
            _, hv = torch.func.jvp(torch.func.grad(loss_of), (primals,), (tangents,))
        return torch.cat([hv[k].reshape(-1) for k in names])


class ScaledHVP:
    """v -> t * H(t * v), the product with T H T (T = diag(t)) for an HVP `hvp` (adaptive sharpness)."""

    def __init__(self, hvp: HVP, t: torch.Tensor):
        self.hvp, self.d, self.dtype, self.device = hvp, hvp.d, hvp.dtype, hvp.device
        self.t = t.to(self.device, self.dtype)

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return self.t * self.hvp(self.t * v.to(self.device, self.dtype))


class _Counted:
    """A float64 numpy view of an HVP (or of any callable v -> Hv) that counts its products."""

    def __init__(self, hvp: Callable, d: int):
        self.hvp, self.d, self.count = hvp, d, 0
        self.dtype = getattr(hvp, "dtype", torch.float64)
        self.device = getattr(hvp, "device", torch.device("cpu"))

    def torch(self, v: torch.Tensor) -> torch.Tensor:
        self.count += 1
        return self.hvp(v.to(self.device, self.dtype)).to(torch.float64)

    def numpy(self, v: np.ndarray) -> np.ndarray:
        v = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64).reshape(-1))
        return self.torch(v).cpu().numpy()


def _residual(hv: torch.Tensor, v: torch.Tensor, lam: float) -> float:
    r = torch.linalg.vector_norm(hv - lam * v).item()
    return r / abs(lam) if lam != 0 else float("inf") if r > 0 else 0.0


def top_eigenvalue(hvp: Callable, d: int, method: str = "lanczos", seed: int = 0, tol: float = 1e-3,
                   max_iter: int = 100, ncv: int = 10) -> dict:
    """The largest eigenvalue of the Hessian behind `hvp` (a callable v [d] -> Hv [d]).

    Returns {top_eig, method, hvps, residual, seconds, converged}; see the module docstring
    for the methods and what `hvps` counts. max_iter: power - products; lanczos - ARPACK
    restarts (each costs about ncv - 1 products). ncv: Lanczos basis size.
    """
    if method not in EIG_METHODS:
        raise UserError(f"unknown --hessian-method {method!r}; valid: {', '.join(EIG_METHODS)}")
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh  # imported before the clock starts

    op = _Counted(hvp, d)
    t0 = time.perf_counter()
    v0 = np.random.default_rng(seed).standard_normal(d)
    converged = True
    if method == "lanczos":
        lin = LinearOperator((d, d), matvec=op.numpy, dtype=np.float64)
        try:
            vals, vecs = eigsh(lin, k=1, which="LA", v0=v0, tol=tol, maxiter=max_iter, ncv=min(ncv, d))
        except ArpackNoConvergence as e:
            converged = False
            vals, vecs = e.eigenvalues, e.eigenvectors
        if len(vals) == 0:
            lam, res = float("nan"), float("nan")
        else:
            lam = float(vals[0])
            v = torch.from_numpy(np.ascontiguousarray(vecs[:, 0])).to(op.device)
            v = v / torch.linalg.vector_norm(v)
            res = _residual(op.torch(v), v, lam)
    else:
        hv = torch.from_numpy(v0).to(op.device)
        converged = False
        for _ in range(max(1, max_iter)):
            v = hv / torch.linalg.vector_norm(hv)
            hv = op.torch(v)
            lam = torch.dot(v, hv).item()
            res = _residual(hv, v, lam)  # H v = 0 gives 0: v is an eigenvector (eigenvalue 0)
            if res <= tol:  # ||Hv - lam v|| <= tol |lam|; see the module docstring for why not the change of lam
                converged = True
                break
    return {"top_eig": lam, "method": method, "hvps": op.count, "residual": res,
            "seconds": time.perf_counter() - t0, "converged": converged}


def hessian_trace(hvp: Callable, d: int, probes: int = 100, seed: int = 0) -> dict:
    """Hutchinson's estimate of tr H: mean of z^T H z over Rademacher probes z (seeded)."""
    if probes < 2:
        raise UserError(f"--hessian-probes must be >= 2 (a standard error needs two); got {probes}")
    op = _Counted(hvp, d)
    t0 = time.perf_counter()
    rng = np.random.default_rng([seed, 2])
    vals = []
    for _ in range(probes):
        z = torch.from_numpy(rng.integers(0, 2, size=d).astype(np.float64) * 2.0 - 1.0).to(op.device)
        vals.append(torch.dot(z, op.torch(z)).item())
    vals = np.asarray(vals)
    return {"trace": float(vals.mean()), "stderr": float(vals.std(ddof=1) / np.sqrt(probes)), "probes": probes,
            "hvps": op.count, "seconds": time.perf_counter() - t0}


def measure_sharpness(module: nn.Module, data, idx: torch.Tensor, method: str = "lanczos", trace: bool = False,
                      probes: int = 100, seed: int = 0, chunk: int = 1024,
                      hvp_method: str = "double-backward", adaptive: bool = True) -> dict:
    """Top eigenvalue (and optionally the trace) of `module`'s Hessian on training samples idx.

    `module` is x_bar with its BatchNorm statistics already recalibrated; `idx` comes from
    hessian_subset. Parameters and buffers are left as they were; the train/eval mode is
    restored on return. hessian_hvps and hessian_seconds cover the eigenvalue and, with
    trace=True, the trace probes as well. adaptive=True adds the adaptive sharpness (top
    eigenvalue of diag(|w|) H diag(|w|), see the module docstring): adaptive_top_eig,
    adaptive_hessian_hvps, adaptive_hessian_residual, adaptive_hessian_seconds.
    """
    was_training = module.training
    try:
        dev = data.x_train.device
        idx = idx.to(dev)
        hvp = HVP(module, data.prepare(data.x_train[idx]), data.y_train[idx], chunk=chunk, method=hvp_method)
        eig = top_eigenvalue(hvp, hvp.d, method=method, seed=seed)
        out = {"top_eig": eig["top_eig"], "hessian_method": method, "hessian_hvps": eig["hvps"],
               "hessian_residual": eig["residual"], "hessian_seconds": eig["seconds"], "hessian_samples": len(idx)}
        if trace:
            tr = hessian_trace(hvp, hvp.d, probes=probes, seed=seed)
            out.update({"hessian_trace": tr["trace"], "hessian_trace_stderr": tr["stderr"]})
            out["hessian_hvps"] += tr["hvps"]
            out["hessian_seconds"] += tr["seconds"]
        if adaptive:
            scaled = ScaledHVP(hvp, hvp.layout.flatten(module).abs())
            ad = top_eigenvalue(scaled, hvp.d, method=method, seed=seed)
            out.update({"adaptive_top_eig": ad["top_eig"], "adaptive_hessian_hvps": ad["hvps"],
                        "adaptive_hessian_residual": ad["residual"], "adaptive_hessian_seconds": ad["seconds"]})
        return out
    finally:
        module.train(was_training)
