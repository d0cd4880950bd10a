"""Push-sum: Stochastic Gradient Push (SGP) over a column-stochastic W(t) (Assran et al., ICML 2019).

    z_i = x_i / w_i                                  the de-biased model: gradients are taken here
    x_i^{t+1/2} = x_i - lr U_i,  U_i = local optimizer(x_i, g_i(z_i))   (weight decay on the numerator x)
    [x^{t+1}, w^{t+1}] = W(t) [x^{t+1/2}, w]          push-sum mixing after the local step (ATC)

Sent per step: one message of d + 1 values (x_i^{t+1/2} and w_i, already scaled by W(t)) to
each out-neighbour. Initialisation: w = 1 and x = the common start, no gossip before the first
gradient. Column sums of 1 keep sum_i x_i (up to the gradient steps) and sum_i w_i = n, so
sum_i w_i z_i / n = mean_i x_i: the runner's average model mean_i x_i is push-sum's average.
(Its consensus distance is measured at the de-biased models z_i = query(X), around mean_i x_i.) On a doubly stochastic
W, w stays 1 and this is D-SGD with --order atc.

Reference: facebookresearch/stochastic_gradient_push (synchronous mode): gossip/distributed.py
GossipDataParallel (forward pre-hook: mix, then unbias z = x / w; backward hook: back to the
numerator; torch SGD steps on the numerator; transfer_params sends), gossip/gossiper.py
PushSum.mix, gossip/mixing_manager.py UniformMixing (1/(out-peers + 1)), gossip/graph_manager.py
(--topology directed-exp). Difference: the reference does not send w on regular graphs (w stays
1 there, "lazy mixing"); here w is always sent, one extra value per message.
"""

import numpy as np
import torch

from algorithms.base import RULES, preset
from bench.errors import UserError
from bench.spec import RuleBase


@RULES.register("push-sum", "push-sum (SGP): gradients at x / w, mix (x - lr U, w) over a column-stochastic W")
class PushSum(RuleBase):
    needs_topology = True
    topology_kind = "column"
    state_keys = ("w",)

    def __init__(self, hp, ctx):
        topo = ctx.topology
        if topo is not None:
            for t in range(topo.period):
                W = topo.sparse(t)  # CSR (the diagonal may be stored as an explicit 0)
                rows = np.repeat(np.arange(W.shape[0]), np.diff(W.indptr))
                empty = np.bincount(rows[W.data != 0], minlength=W.shape[0]) == 0
                if empty.any():
                    raise UserError(f"push-sum over {topo.name!r}: worker {int(empty.argmax())} receives nothing at "
                                    f"step {t} (row of W({t}) all zero), so its weight w would be 0")
        self.w = torch.ones(ctx.n_local, 1, dtype=ctx.dtype, device=ctx.device)  # push-sum weight per local worker

    def query(self, X):
        return X / self.w.to(X.dtype)

    def step(self, X, G, optimizer, ctx):
        U = optimizer.direction(X, G)
        Y = ctx.comm.mix(torch.cat([X - ctx.lr * U, self.w.to(X.dtype)], dim=1), ctx.step)  # one message of d + 1
        self.w = Y[:, -1:].clone()
        return Y[:, :-1].contiguous()

    def sends_per_step(self, n: int, topology) -> float:
        return topology.properties()["sends_per_step"]

    def bytes_per_step(self, n: int, topology, d: int, element_size: int) -> float:
        return self.sends_per_step(n, topology) * (d + 1) * element_size


preset("sgp", "plain", "sgd", "push-sum",
       "SGP: push-sum over a directed graph, meant for --topology directed-exp (any topology works; on doubly "
       "stochastic ones w stays 1) (Assran et al. 2019)")
