"""AD-SAM gradient oracle: the gradient at Gaussian-perturbed weights.

Average-direction SAM (Zhu et al. 2023), implemented as in LPF-SGD (Bisla et al. 2022):

    eps ~ N(0, diag(s^2)),  s = sigma * ||w_filter|| per filter ("filter" mode, the default)
                            or s = sigma ("absolute" mode)
    G_i = (1/M) sum_{m=1..M} grad f(x_i + eps_m; xi_i)

A filter is one output unit (a slice along dim 0) of a weight with >= 2 dimensions;
every entry of a 1-D parameter is its own filter, so its scale is |w|. The noise is
drawn from a generator seeded with (seed, worker, step, m), so it is the same in the
simulated and the distributed runner. The update is applied at x_i (noise removed).
M gradients per step (--samples, default 1). sigma = 0 gives plain SGD exactly.
"""

import torch

from algorithms.base import ORACLES
from bench.spec import Component, Param, between, non_negative


def noise_seed(seed: int, worker: int, step: int, m: int) -> int:
    return (((seed * 1_000_003 + worker) * 1_000_033 + step) * 101 + m) % (2**63 - 1)


@ORACLES.register("adsam", "gradient at x + N(0, (sigma*||filter||)^2) noise (M gradients/step)")
class ADSAM(Component):
    params = (
        Param("sigma", 0.01, "AD-SAM noise scale sigma", check=non_negative),
        Param("sigma_mode", "filter", "noise std: sigma x ||filter|| (filter) or sigma (absolute)",
              choices=("filter", "absolute")),
        Param("samples", 1, "noise draws M per step (M gradients per step)", check=between(1)),
    )

    def __init__(self, hp, ctx):
        self.sigma = hp.sigma
        self.mode = hp.sigma_mode
        self.grad_evals = hp.samples
        self.layout = ctx.layout
        self.filter_ids, self.n_filters = ctx.layout.filter_ids(ctx.device)

    def scale(self, X: torch.Tensor) -> torch.Tensor:
        """Per-entry noise std [n, d]."""
        if self.mode == "absolute":
            return torch.full_like(X, self.sigma)
        sq = torch.zeros(X.shape[0], self.n_filters, dtype=X.dtype, device=X.device)
        sq.index_add_(1, self.filter_ids, X * X)
        return self.sigma * sq.sqrt().index_select(1, self.filter_ids)

    def noise(self, X: torch.Tensor, ctx, m: int) -> torch.Tensor:
        # Drawn in float32 whatever X's dtype, so that a float64 run samples the same noise.
        z = torch.empty(X.shape, dtype=torch.float32, device=X.device)
        for row, w in enumerate(ctx.comm.workers):
            gen = torch.Generator(device=X.device).manual_seed(noise_seed(ctx.seed, w, ctx.step, m))
            z[row].normal_(generator=gen)
        return z.to(X.dtype)

    def __call__(self, workers, X, x, y, ctx):
        if self.sigma == 0:
            losses, G = workers.loss_and_grad(X, x, y, "train")
            for m in range(1, self.grad_evals):
                G = G + workers.loss_and_grad(X, x, y, "frozen")[1]
            return losses, G / self.grad_evals
        s = self.scale(X)
        total, losses = None, None
        for m in range(self.grad_evals):
            l, g = workers.loss_and_grad(X + s * self.noise(X, ctx, m), x, y, "train" if m == 0 else "frozen")
            losses = l if losses is None else losses
            total = g if total is None else total.add_(g)
        return losses, total / self.grad_evals
