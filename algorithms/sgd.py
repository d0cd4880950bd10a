"""SGD with momentum, Nesterov and weight decay, as torch.optim.SGD (dampening 0).

    g = G + wd * x            (wd masked to 0 on 1-D parameters with --no-wd-1d)
    m = mu * m + g            (m starts at 0, so the first m = g, as in torch)
    U = g + mu * m  (Nesterov)  or  U = m
    x <- x - lr * U           (the communication rule decides which x and when to mix)

Momentum buffers are local to each worker (Lian et al. 2017; Zhu et al. 2023).
"""

import torch

from algorithms.base import OPTIMIZERS
from bench.spec import Component, Param, non_negative, probability_open


@OPTIMIZERS.register("sgd", "SGD with momentum, Nesterov, weight decay (torch.optim.SGD)")
class SGD(Component):
    params = (
        Param("momentum", 0.9, "SGD momentum mu: m = mu m + g", check=probability_open),
        Param("nesterov", False, "Nesterov momentum: U = g + mu m"),
        Param("weight_decay", 5e-4, "L2 weight decay: g = G + wd x", check=non_negative),
        Param("wd_1d", True, "weight decay on 1-D parameters (biases, normalisation scales) too"),
    )
    state_keys = ("m",)

    def __init__(self, hp, ctx):
        self.mu = hp.momentum
        self.nesterov = hp.nesterov
        self.wd = hp.weight_decay
        self.wd_vec = None
        if self.wd and not hp.wd_1d:
            self.wd_vec = (~ctx.layout.one_d_mask(ctx.device)).double() * self.wd  # cast to X's dtype at first use
        self.m = None

    def decayed(self, X: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        """g = G + wd x (a new tensor when wd > 0; G itself otherwise)."""
        if self.wd_vec is not None and self.wd_vec.dtype != X.dtype:
            self.wd_vec = self.wd_vec.to(X.dtype)
        if not self.wd:
            return G
        return G + X * self.wd_vec if self.wd_vec is not None else G.add(X, alpha=self.wd)

    def momentum(self, g: torch.Tensor) -> torch.Tensor:
        """U from g: m = mu m + g (first m = g), U = m or g + mu m (Nesterov); g itself without momentum."""
        if self.mu == 0:
            return g
        if self.m is None:
            self.m = g.clone()
        else:
            self.m.mul_(self.mu).add_(g)
        return g.add(self.m, alpha=self.mu) if self.nesterov else self.m

    def direction(self, X: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        return self.momentum(self.decayed(X, G))
