"""Gossip with adaptive consensus: DSGD-AC (Wang & Johansson, "Decentralized SGD with Controlled
Disagreement Finds Flatter Minima").

    W_t = (1 - gamma_t) I + gamma_t W(t)
    z_i = x_i + gamma_t (sum_j W_ij x_j - x_i);  x_i <- z_i - lr * U(z_i, g_i)   (cta, as gossip: g_i at the pre-mix x_i)
    gamma_t = 1 before the start step t_s, then gamma_min + (1 - gamma_min) (lr_t / lr_{t_s})^p   (default p = 3)

exactly as WangZesen/decent-sam-grc does it (image-cifar/src/utils.py get_adaptive_gamma;
decent_train.py: the gradient at x^t, mix with gamma, then torch SGD's step). lr_{t_s} is the
learning rate AT the start step, so gamma is continuous there (1 at t_s). The start step is
--ac-start (a fraction of training, or "10ep" for an epoch; the reference's default is epoch 10,
the end of its warmup), never before the warmup ends. As the learning rate decays, gamma_t
shrinks and the consensus errors do not vanish: they act as a curvature regularizer.
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


@RULES.register("gossip-ac", "gossip with consensus weight gamma_t = (lr_t/lr_start)^p from --ac-start (DSGD-AC)")
class GossipAC(Gossip):
    params = Gossip.params + (
        Param("p", 3.0, "DSGD-AC exponent: gamma_t = gamma_min + (1 - gamma_min) (lr_t / lr_start)^p",
              check=non_negative),
        Param("ac_start", "0", "start of the adaptive consensus: a fraction of training (0.1) or an epoch (10ep)",
              check=Check(lambda s: parse_start(s) is not None,
                          "must be a fraction of training in [0, 1] (e.g. 0.1) or an epoch (e.g. 10ep)")),
        Param("gamma_min", 0.0, "floor of gamma_t: gamma_min + (1 - gamma_min) (lr_t / lr_start)^p", check=unit_interval),
    )

    def __init__(self, hp, ctx):
        super().__init__(hp, ctx)
        kind, v = parse_start(hp.ac_start)
        start = round(v * ctx.total_steps) if kind == "fraction" else round(v * ctx.epoch_len)
        self.start = max(ctx.warmup, start)
        self.lr_start = ctx.lr_at(self.start) if self.start < ctx.total_steps else 0.0
        self.p = hp.p
        self.gamma_min = hp.gamma_min

    def gamma(self, ctx) -> float:
        return gamma_at(ctx.step, ctx.lr, self.lr_start, self.start, self.p, self.gamma_min)

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
