"""Gossip with adaptive consensus: DSGD-AC (Wang & Johansson).

    W_t = (1 - gamma_t) I + gamma_t W(t)
    x_i <- x_i + gamma_t (sum_j W_ij x_j - x_i) - lr * U_i     (cta; U_i from the gradient at the pre-mix x_i)
    gamma_t = 1 before the start step, then max(gamma_min, (lr_t / lr_max)^p), p >= 2 (default 3)

The start step is --ac-start (a fraction of training, or "10ep" for an epoch),
never before the warmup ends: during warmup lr_t / lr_max is small and would
switch communication off. As the learning rate decays, gamma_t shrinks and the
consensus errors do not vanish; they act as a curvature regularizer.
"""

from algorithms.base import RULES
from algorithms.gossip import Gossip
from bench.schedule import gamma_at


@RULES.register("gossip-ac", "gossip with consensus weight gamma_t = (lr_t/lr_max)^p (DSGD-AC)")
class GossipAC(Gossip):
    def __init__(self, cfg, total_steps, epoch_len):
        super().__init__(cfg, total_steps, epoch_len)
        kind, v = cfg.ac_start_value()
        start = round(v * total_steps) if kind == "fraction" else round(v * epoch_len)
        self.start = max(cfg.warmup, start)
        self.p = cfg.p
        self.gamma_min = cfg.gamma_min

    def gamma(self, ctx) -> float:
        return gamma_at(ctx.step, ctx.lr, ctx.lr_max, self.start, self.p, self.gamma_min)

    def mixed(self, X, ctx):
        g = self.gamma(ctx)
        if g == 1.0:
            return ctx.comm.mix(X, ctx.step)
        if g == 0.0:
            return X.clone()
        WX = ctx.comm.mix(X, ctx.step)
        return WX.sub_(X).mul_(g).add_(X)
