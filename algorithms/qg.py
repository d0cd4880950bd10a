"""QG-DSGDm: decentralized SGD with quasi-global momentum (Lin et al., ICML 2021).

    h = G + wd x                              (SGD's decayed(): weight decay at the pre-step x^t)
    m = mu mhat + h ;  d = m  (heavy ball)  or  d = h + mu m  (Nesterov)
    x^{t+1} = W(t) (x^t - lr_t d)             (adapt-then-combine: gossip after the local step)
    mhat <- (1 - beta) mhat + beta (x^t - x^{t+1}) / lr_t

Sent per step: the model x^t - lr d, once to every neighbour (as D-SGD); mhat is never sent.
Initialisation: mhat = 0, so the first step is x^1 = W (x^0 - lr h^0) (m = h, as torch's first step).
mu and Nesterov are the SGD optimizer's (--momentum, --nesterov); SGD's own momentum buffer is
not used. beta is --qg-beta.

Reference code: epfml/quasi-global-momentum, code/pcode/optim/decentralized_qg_sgd.py, SGD.step
(local_step = 1, dampening 0). There beta is `slow_buffer_conf` "factor", 0.1 unless given (the
README runs give none), not tied to the momentum; the paper's Alg. 1 (from memory, unchecked) has
mhat = mu mhat + (1 - mu) (x^t - x^{t+1})/lr, i.e. beta = 1 - mu: the same at mu = 0.9. The reference crashes with
momentum 0 (no direction is set); here mu = 0 gives m = h, i.e. ATC D-SGD, and mhat is unused.

The preset qg-dsgdm sets --nesterov true: the reference's README runs QG (and its D-SGD baseline)
with --use_nesterov True --momentum_factor 0.9 (QG-DSGDm-N). The dsgd preset is heavy ball and
CTA; the reference's like-for-like baseline is --algo dsgd --order atc --nesterov true.

On the complete graph (identical workers), QG with beta = 1 and heavy ball is C-SGD with torch
heavy-ball momentum; any other beta gives d = h + mu/(1 - mu) e, then e <- a e + (1 - a) h, with
a = 1 - beta (1 - mu) and e^0 = 0: QHM with buffer decay a, nu = mu / a and lr / (1 - mu).
"""

import torch

from algorithms.base import RULES, preset
from bench.errors import UserError
from bench.spec import Param, RuleBase, unit_interval


@RULES.register("qg", "quasi-global momentum: x <- W (x - lr d), d from mhat = EMA of (x - x_next)/lr (QG-DSGDm)")
class QuasiGlobal(RuleBase):
    params = (Param("qg_beta", 0.1, "QG buffer: mhat <- (1 - beta) mhat + beta (x - x_next)/lr (reference: 0.1)",
                    check=unit_interval),)
    needs_topology = True
    needs = ("decayed",)
    state_keys = ("mhat",)

    def __init__(self, hp, ctx):
        self.beta = hp.qg_beta
        self.mhat = None

    @classmethod
    def check_run(cls, values: dict) -> None:
        if "sgd.momentum" not in values:
            raise UserError("--comm qg applies the SGD optimizer's momentum and Nesterov flag itself "
                            "(around its quasi-global buffer): use --opt sgd")

    def step(self, X, G, optimizer, ctx):
        if self.mhat is None:
            self.mhat = torch.zeros_like(X)
        h = optimizer.decayed(X, G)
        m = h.add(self.mhat, alpha=optimizer.mu)
        d = h.add(m, alpha=optimizer.mu) if optimizer.nesterov else m
        X_next = ctx.comm.mix(X - ctx.lr * d, ctx.step)
        self.mhat.mul_(1 - self.beta).add_((X - X_next) / ctx.lr, alpha=self.beta)
        return X_next

    def sends_per_step(self, n: int, topology) -> float:
        return topology.properties()["sends_per_step"]


preset("qg-dsgdm", "plain", "sgd", "qg",
       "QG-DSGDm-N: ATC gossip, Nesterov on a quasi-global momentum (Lin et al. 2021)", sgd__nesterov=True)
