"""A plug-in that lives outside the package: the Signum local optimizer (Bernstein et al. 2018).

    m = beta m + (1 - beta) g,   U = sign(m) + wd x,   x <- x - lr U

One file, no edit anywhere else: it registers the optimizer (with its own parameter `beta`)
and a preset that runs it with gossip. The tests load it through DSGDBENCH_PLUGINS
(tests/conftest.py), so it is registered only in the test session; the generic tests pick it
up from the registries, the CLI shows --beta in `run --help` and `list components`.
"""

import torch

from algorithms.base import OPTIMIZERS, preset
from bench.spec import Component, Param, non_negative, probability_open


@OPTIMIZERS.register("signum", "Signum: sign of an exponential moving average of gradients")
class Signum(Component):
    params = (
        Param("beta", 0.9, "Signum momentum: m = beta m + (1 - beta) g", check=probability_open),
        Param("weight_decay", 0.0, "decoupled weight decay: U = sign(m) + wd x", check=non_negative),
    )
    state_keys = ("m",)

    def __init__(self, hp, ctx):
        self.beta, self.wd = hp.beta, hp.weight_decay
        self.m = None

    def direction(self, X: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        self.m = (1 - self.beta) * G if self.m is None else self.m.mul_(self.beta).add_(G, alpha=1 - self.beta)
        return torch.sign(self.m) + self.wd * X


preset("d-signum", "plain", "signum", "gossip", "D-Signum: local Signum steps, D-SGD mixing (a test plug-in)",
       beta=0.8)
