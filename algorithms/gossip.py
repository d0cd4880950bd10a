"""Gossip: decentralized SGD over the mixing matrix W(t) (Lian et al. 2017; Zhu et al. 2023).

    cta (default):  z_i = sum_j [W^k]_ij x_j;   x_i <- z_i - lr * U(z_i, g_i)     g_i = grad f_i(x_i), pre-mix
    atc:            x_i <- sum_j [W^k]_ij (x_j - lr * U(x_j, g_j))   (adapt-then-combine; = C-SGD on the complete graph)

U(x, g) is the local optimizer's direction with its weight decay at x: in the default order the
gradient is taken at the pre-mix x_i, then the parameters are replaced by the mixed z_i and the
optimizer steps from there (so SGD's weight decay acts on z_i), exactly as the reference codes do
it with torch.optim.SGD: Zhu et al. 2023 (Raiden-Zhu/ICML-2023-DSGD-and-SAM main.py: gradients at
the snapshot x^t, x_i = sum_j P_ij x_j^t, optimizer.step()) and DSGD-AC (WangZesen/decent-sam-grc
decent_train.py: mix, then optimizer.step()). Communication overlaps the backward pass.
k = --rounds gossip rounds per step (default 1), each with the step's W(t), each sending the rows
once more: the consensus-control knob of Kong et al. (ICML 2021).
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
        if self.order == "atc":
            return self.mixed(X - ctx.lr * optimizer.direction(X, G), ctx)
        Z = self.mixed(X, ctx)
        return Z.sub_(optimizer.direction(Z, G), alpha=ctx.lr)

    def sends_per_step(self, n: int, topology) -> float:
        return self.rounds * topology.properties()["sends_per_step"]
