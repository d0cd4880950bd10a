"""SAM gradient oracle (Foret et al. 2021), per worker on its own batch.

    g = grad f(x_i; xi_i)                                 (BatchNorm running statistics updated)
    eps = rho * T^2 g / ||T g||,  T = 1 (SAM) or |x_i| (--adaptive, ASAM; Kwon et al. 2021)
    G_i = grad f(x_i + eps; xi_i)                         (same batch; BatchNorm running statistics frozen)

The update is applied at x_i (the perturbation is not kept). Two gradients per step.
The norm is over all of worker i's parameters; each worker perturbs on its own batch,
as in data-parallel SAM without synchronising eps ("m-sharpness" with m = local batch).
"""

import torch

from algorithms.base import ORACLES
from bench.spec import Component, Param, positive


@ORACLES.register("sam", "gradient at x + rho g/||g|| (2 gradients/step)")
class SAM(Component):
    params = (
        Param("rho", 0.05, "SAM radius rho", check=positive),
        Param("adaptive", False, "ASAM: perturbation rho T^2 g / ||T g||, T = |x| (Kwon et al. 2021)"),
    )
    grad_evals = 2

    def __init__(self, hp, ctx):
        self.rho = hp.rho
        self.adaptive = hp.adaptive

    def __call__(self, workers, X, x, y, ctx):
        losses, g = workers.loss_and_grad(X, x, y, "train")
        eps = self.perturbation(X, g)
        _, G = workers.loss_and_grad(X + eps, x, y, "frozen")
        return losses, G

    def perturbation(self, X: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        if self.adaptive:
            tg = X.abs() * g
            norm = tg.norm(dim=1, keepdim=True)
            return self.rho * X.abs() * tg / norm.clamp_min(1e-12)
        norm = g.norm(dim=1, keepdim=True)
        return self.rho * g / norm.clamp_min(1e-12)
