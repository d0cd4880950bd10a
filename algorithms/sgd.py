"""SGD with momentum, Nesterov and weight decay, as torch.optim.SGD (dampening 0).

    g = G + wd * x            (wd masked to 0 on 1-D parameters with --no-wd-1d)
    m = mu * m + g            (m starts at 0, so the first m = g, as in torch)
    U = g + mu * m  (Nesterov)  or  U = m
    x <- x - lr * U           (the communication rule decides which x and when to mix)

Momentum buffers are local to each worker (Lian et al. 2017; Zhu et al. 2023).
"""

import torch

from algorithms.base import OPTIMIZERS


@OPTIMIZERS.register("sgd", "SGD with momentum, Nesterov, weight decay (torch.optim.SGD)")
class SGD:
    def __init__(self, cfg, layout, n, device):
        self.mu = cfg.momentum
        self.nesterov = cfg.nesterov
        self.wd = cfg.weight_decay
        self.wd_vec = None
        if self.wd and not cfg.wd_1d:
            self.wd_vec = (~layout.one_d_mask(device)).double() * self.wd  # cast to X's dtype at first use
        self.m = None

    def direction(self, X: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        g = G
        if self.wd_vec is not None and self.wd_vec.dtype != X.dtype:
            self.wd_vec = self.wd_vec.to(X.dtype)
        if self.wd:
            g = G + X * self.wd_vec if self.wd_vec is not None else G.add(X, alpha=self.wd)
        if self.mu == 0:
            return g
        if self.m is None:
            self.m = g.clone()
        else:
            self.m.mul_(self.mu).add_(g)
        return g.add(self.m, alpha=self.mu) if self.nesterov else self.m
