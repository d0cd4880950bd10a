"""AdamW local optimizer (Loshchilov & Hutter 2019), exactly torch.optim.AdamW (amsgrad off).

    m = b1 m + (1 - b1) G,   v = b2 v + (1 - b2) G^2          (m = v = 0 before the first step)
    U = (m / (1 - b1^t)) / (sqrt(v) / sqrt(1 - b2^t) + eps) + wd x
    x <- x - lr U  =  x (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps)     (decoupled weight decay)

t counts this worker's steps from 1. Defaults are torch's: betas (0.9, 0.999), eps 1e-8,
weight_decay 0.01, on every parameter (1-D ones included, as torch with one parameter group).
Moments and t stay local to the worker (the inner optimizer of DiLoCo: torchft train_diloco.py).
"""

import math

import torch

from algorithms.base import OPTIMIZERS
from bench.spec import Component, Param, non_negative, positive, probability_open


@OPTIMIZERS.register("adamw", "AdamW: Adam with decoupled weight decay (torch.optim.AdamW)")
class AdamW(Component):
    params = (
        Param("betas", (0.9, 0.999), "AdamW moment decays b1,b2", check=probability_open, length=2),
        Param("eps", 1e-8, "AdamW epsilon (added to sqrt(v_hat))", check=positive),
        Param("weight_decay", 0.01, "decoupled weight decay: U = m_hat / (sqrt(v_hat) + eps) + wd x",
              check=non_negative),
    )
    state_keys = ("t", "m", "v")

    def __init__(self, hp, ctx):
        self.b1, self.b2 = hp.betas
        self.eps = hp.eps
        self.wd = hp.weight_decay
        self.t = 0
        self.m = self.v = None

    def direction(self, X: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        if self.m is None:
            self.m, self.v = torch.zeros_like(G), torch.zeros_like(G)
        self.t += 1
        self.m.mul_(self.b1).add_(G, alpha=1 - self.b1)
        self.v.mul_(self.b2).addcmul_(G, G, value=1 - self.b2)
        denom = self.v.sqrt().div_(math.sqrt(1 - self.b2 ** self.t)).add_(self.eps)  # torch's order
        U = self.m.div(denom).div_(1 - self.b1 ** self.t)
        return U.add_(X, alpha=self.wd) if self.wd else U
