"""Gossip: decentralized SGD over the mixing matrix W(t) (Lian et al. 2017; Zhu et al. 2023).

    cta (default):  x_i <- sum_j W_ij x_j - lr * U_i      U_i from the gradient at the pre-mix x_i
    atc:            x_i <- sum_j W_ij (x_j - lr * U_j)    (adapt-then-combine; equals C-SGD on the complete graph)

In the default order the gradient is taken before mixing and applied after it,
so communication can overlap the backward pass.
"""

from algorithms.base import RULES
from bench.spec import Component, Param


@RULES.register("gossip", "mix parameters with the neighbours: x <- W x - lr U (D-SGD)")
class Gossip(Component):
    params = (Param("order", "cta", "cta: x <- W x - lr U (gradient at the pre-mix x); atc: x <- W (x - lr U)",
                    choices=("cta", "atc")),)
    needs_topology = True

    def __init__(self, hp, ctx):
        self.order = hp.order

    def log(self, ctx) -> dict:
        return {}

    def mixed(self, X, ctx):
        return ctx.comm.mix(X, ctx.step)

    def step(self, X, G, optimizer, ctx):
        U = optimizer.direction(X, G)
        if self.order == "atc":
            return self.mixed(X - ctx.lr * U, ctx)
        return self.mixed(X, ctx).sub_(U, alpha=ctx.lr)

    @staticmethod
    def sends_per_step(n: int, topology) -> float:
        return topology.properties()["sends_per_step"]
