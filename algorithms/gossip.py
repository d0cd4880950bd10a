"""Gossip: decentralized SGD over the mixing matrix W(t) (Lian et al. 2017; Zhu et al. 2023).

    cta (default):  x_i <- sum_j W_ij x_j - lr * U_i      U_i from the gradient at the pre-mix x_i
    atc:            x_i <- sum_j W_ij (x_j - lr * U_j)    (adapt-then-combine; equals C-SGD on the complete graph)

In the default order the gradient is taken before mixing and applied after it,
so communication can overlap the backward pass.
"""

from algorithms.base import RULES


@RULES.register("gossip", "mix parameters with the neighbours: x <- W x - lr U (D-SGD)")
class Gossip:
    decentralized = True

    def __init__(self, cfg, total_steps, epoch_len):
        self.order = cfg.order

    def gamma(self, ctx) -> float:
        return 1.0

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
