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
from bench.spec import Check, Param, non_negative, unit_interval


def parse_start(text: str):
    """("fraction", v) for "0.1" (of training, in [0, 1]), ("epoch", v) for "10ep"; None if neither."""
    s = str(text).strip()
    try:
        if s.endswith("ep"):
            v = float(s[:-2])
            return ("epoch", v) if v >= 0 else None
        v = float(s)
        return ("fraction", v) if 0 <= v <= 1 else None
    except ValueError:
        return None


@RULES.register("gossip-ac", "gossip with consensus weight gamma_t = (lr_t/lr_max)^p (DSGD-AC)")
class GossipAC(Gossip):
    params = Gossip.params + (
        Param("p", 3.0, "DSGD-AC exponent: gamma_t = (lr_t / lr_max)^p", check=non_negative),
        Param("ac_start", "0", "start of the adaptive consensus: a fraction of training (0.1) or an epoch (10ep)",
              check=Check(lambda s: parse_start(s) is not None,
                          "must be a fraction of training in [0, 1] (e.g. 0.1) or an epoch (e.g. 10ep)")),
        Param("gamma_min", 0.0, "lower bound on gamma_t", check=unit_interval),
    )

    def __init__(self, hp, ctx):
        super().__init__(hp, ctx)
        kind, v = parse_start(hp.ac_start)
        start = round(v * ctx.total_steps) if kind == "fraction" else round(v * ctx.epoch_len)
        self.start = max(ctx.warmup, start)
        self.p = hp.p
        self.gamma_min = hp.gamma_min

    def gamma(self, ctx) -> float:
        return gamma_at(ctx.step, ctx.lr, ctx.lr_max, self.start, self.p, self.gamma_min)

    def log(self, ctx) -> dict:
        return {"gamma": self.gamma(ctx)}

    def mixed(self, X, ctx):
        g = self.gamma(ctx)
        if g == 1.0:
            return self.mix_rounds(X, ctx)
        if g == 0.0:
            return X.clone()
        WX = self.mix_rounds(X, ctx)
        return WX.sub_(X).mul_(g).add_(X)
