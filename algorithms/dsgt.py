"""DSGT: decentralized SGD with gradient tracking (y tracks the average gradient).

    h^t     = G^t + wd x^t                          (weight decay folded into the tracked gradient)
    y^0     = h^0;   y^t = (W y^{t-1}) + h^t - h^{t-1}
    cta (default): x^{t+1} = W x^t - lr_t SGDm(y^t)       momentum on the un-mixed tracker (epfml's code)
    atc:           x^{t+1} = W x^t - lr_t SGDm(W y^t)     = W (x^t - lr_t y^t) without momentum

Sent per step: [x^t, y^t] concatenated, to every neighbour: 2 model-sized messages per neighbour
(W y^t is kept for the next step). The momentum buffer is local (torch convention: its first
value is its first input); the lr does not enter y. Mixing keeps the mean, so the mean of y^t
is the mean of h^t at every step.

Reference: epfml/quasi-global-momentum code/pcode/optim/decentralized_sgd_with_gradient_tracking.py
(SGD.step): apply_gradient(only_apply_weight_decay=True), y^0 a copy of h^0, then y += h - old_g,
concat [x, y] gossiped with op="weighted", x <- W x, the torch-style momentum step with the
pre-mix y as the gradient ("update grads using 'previous y'"; its docstring says y is aggregated
first, the code does not), y <- W y; n_bits = 2 bits(x) per out-neighbour. That is the "cta" order
(DIGing, Nedic, Olshevsky & Shi 2017). Bluefog examples/pytorch_optimization.py gradient_tracking
is the same form without momentum. The "atc" order is Pu & Nedic 2021's DSGT (Math. Prog.),
x <- W (x - lr y), with momentum applied to W y; only it equals C-SGD on the complete graph
(W = J: W y^t = mean h^t on every worker). In the cta order W = J still gives each worker its
own y^t = h^t + mean h^{t-1} - h^{t-1}, so the workers differ after every step.
"""

import torch

from algorithms.base import RULES, preset
from bench.spec import Param, RuleBase


@RULES.register("dsgt", "gradient tracking: x <- W x - lr SGDm(y), y <- W y + h(x') - h(x) (DSGT)")
class DSGT(RuleBase):
    params = (Param("order", "cta", "cta: x <- W x - lr SGDm(y) (epfml's code); atc: x <- W x - lr SGDm(W y) "
                    "(Pu & Nedic: W (x - lr y))", choices=("cta", "atc")),)
    needs_topology = True
    needs = ("decayed", "momentum")
    state_keys = ("y", "wy", "h_prev")

    def __init__(self, hp, ctx):
        self.order = hp.order
        self.y = self.wy = self.h_prev = None  # y^t, W y^t, h^t of the last step

    def step(self, X, G, optimizer, ctx):
        h = optimizer.decayed(X, G).clone()  # a copy: decayed returns G itself when wd = 0
        y = h.clone() if self.y is None else self.wy + h - self.h_prev
        d = X.shape[1]
        XY = ctx.comm.mix(torch.cat([X, y], dim=1), ctx.step)  # one message of 2 models per neighbour
        self.y, self.wy, self.h_prev = y, XY[:, d:].contiguous(), h
        U = optimizer.momentum(y if self.order == "cta" else self.wy)
        return XY[:, :d] - ctx.lr * U

    def sends_per_step(self, n: int, topology) -> float:
        return 2 * topology.properties()["sends_per_step"]


preset("dsgt", "plain", "sgd", "dsgt", "DSGT: gradient tracking, x and y gossiped (epfml quasi-global-momentum)")
