"""Plain gradient oracle: g_i = grad f(x_i; xi_i), one gradient per worker per step."""

from algorithms.base import ORACLES
from bench.spec import Component


@ORACLES.register("plain", "stochastic gradient at x_i (1 gradient/step)")
class Plain(Component):
    grad_evals = 1

    def __init__(self, hp, ctx):
        pass

    def __call__(self, workers, X, x, y, ctx):
        return workers.loss_and_grad(X, x, y, "train")
