"""All-reduce (centralized / data-parallel SGD): one model, averaged gradients.

    G <- mean_i G_i (every worker), U = local optimizer(x, G), x <- x - lr * U

Every worker holds the same x and the same optimizer state; what a worker sends
per step is that of a ring all-reduce, 2 (n - 1) / n model sizes.
"""

from algorithms.base import RULES
from bench.spec import RuleBase


@RULES.register("allreduce", "average gradients over all workers (C-SGD)")
class AllReduce(RuleBase):
    def __init__(self, hp, ctx):
        pass

    def step(self, X, G, optimizer, ctx):
        U = optimizer.direction(X, ctx.comm.allreduce_mean(G))
        return X - ctx.lr * U

    def sends_per_step(self, n: int, topology) -> float:
        return 2 * (n - 1) / n
