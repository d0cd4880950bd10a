"""Gossip: decentralized SGD over the mixing matrix W(t) (Lian et al. 2017; Zhu et al. 2023).

    cta (default):  x_i <- sum_j [W^k]_ij x_j - lr * U_i      U_i from the gradient at the pre-mix x_i
    atc:            x_i <- sum_j [W^k]_ij (x_j - lr * U_j)    (adapt-then-combine; equals C-SGD on the complete graph)

k = --rounds gossip rounds per step (default 1), each with the step's W(t) and each sending the
rows once more: the consensus-control knob of Kong et al. (ICML 2021). In the default order the
gradient is taken before mixing and applied after it, so communication can overlap the backward
pass (Lian et al. 2017; Zhu et al. 2023's code, Raiden-Zhu/ICML-2023-DSGD-and-SAM main.py).
"""

from algorithms.base import RULES
from bench.spec import Param, RuleBase, between


@RULES.register("gossip", "mix parameters with the neighbours: x <- W x - lr U (D-SGD)")
class Gossip(RuleBase):
    params = (Param("order", "cta", "cta: x <- W x - lr U (gradient at the pre-mix x); atc: x <- W (x - lr U)",
                    choices=("cta", "atc")),
              Param("rounds", 1, "gossip rounds per step: x <- W^k x (k messages per neighbour)", check=between(1)))
    needs_topology = True

    def __init__(self, hp, ctx):
        self.order = hp.order
        self.rounds = hp.rounds

    def mix_rounds(self, X, ctx):
        for _ in range(self.rounds):
            X = ctx.comm.mix(X, ctx.step)
        return X

    def mixed(self, X, ctx):
        return self.mix_rounds(X, ctx)

    def step(self, X, G, optimizer, ctx):
        U = optimizer.direction(X, G)
        if self.order == "atc":
            return self.mixed(X - ctx.lr * U, ctx)
        return self.mixed(X, ctx).sub_(U, alpha=ctx.lr)

    def sends_per_step(self, n: int, topology) -> float:
        return self.rounds * topology.properties()["sends_per_step"]
