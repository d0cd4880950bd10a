"""Plain gradient oracle: g_i = grad f(x_i; xi_i), one gradient per worker per step."""

from algorithms.base import ORACLES


@ORACLES.register("plain", "stochastic gradient at x_i (1 gradient/step)")
class Plain:
    grad_evals = 1

    def __init__(self, cfg, layout, device):
        pass

    def __call__(self, workers, X, x, y, ctx):
        return workers.loss_and_grad(X, x, y, "train")
