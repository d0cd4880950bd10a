"""CHOCO-SGD: decentralized SGD with compressed gossip (Koloskova et al. ICML 2019, ICLR 2020).

    x^{t+1/2} = x^t - lr U                    U = optimizer.direction(x^t, g(x^t)): local momentum, weight decay
    x^{t+1}   = x^{t+1/2} + gamma (s - xhat)   s_i = sum_j W_ij xhat_j (self included), the OLD hats
    q         = Q(x^{t+1} - xhat)              Q: the compressor (algorithms/compressors.py), per tensor
    xhat     += q,   s += W q                  W q from comm.mix_payload: only the compressed q travels

Sent per step: each worker's one q to each of its neighbours (compressor.message_bytes each).
State: xhat (the worker's public copy) and s (the weighted sum of its neighbourhood's copies); the
neighbours' individual copies are never stored. Initialisation (hat_init): "zero" as the DL code,
xhat = s = 0, so the first message is Q(x^1); "x0" as the convex code, xhat = x^0 and s = W x^0 = x^0
(every worker starts from the same x^0). On a time-varying graph s accumulates W(t) q^t, as the
reference's memory would; s = W xhat holds for a static W (CHOCO's setting).

gamma: the reference's --consensus_stepsize defaults to 0.9; its example scripts (sign compression)
use 0.45 on a ring and 0.5 on a social graph. The default 0.4 keeps the consensus iteration (lr = 0) contracting on a
ring of 16 with top-k 10% and qsgd-4 bits scaled (measured; 0.5 diverges with top-k 10%, 0.9 with both).
gamma must be tuned per compressor: random-k 10% needs about 0.1 in the same test.

Reference: epfml/ChocoSGD dl_code/pcode/optim/parallel_choco.py (ParallelCHOCO.step: apply_gradient;
_sync_thread_func: update_params_from_neighbor, then CHOCO*Compressor.pipeline: compress(x - xhat),
sync, uncompress: hat += q, memory += W_ij q_j), dl_code/pcode/optim/utils.py
(update_params_from_neighbor), convex_code/logistic.py (fit, method "choco": x_hat = x^0).
"""


import torch

from algorithms.base import RULES, preset
from algorithms.compressors import COMPRESSORS
from bench.spec import Param, RuleBase, between


@RULES.register("choco", "CHOCO-SGD: gossip of compressed differences x - xhat (Koloskova et al.)")
class Choco(RuleBase):
    params = (
        Param("gamma", 0.4, "CHOCO consensus step size: x <- x + gamma (sum_j W_ij xhat_j - xhat_i)",
              check=between(0, 1, lo_open=True)),
        Param("compressor", "top-k", "message compressor Q of CHOCO (dsgdbench list components)",
              registry=COMPRESSORS),
        Param("hat_init", "zero", "initial public copies xhat: zero (DL code) or x0 (convex code)",
              choices=("zero", "x0")),
    )
    needs_topology = True
    state_keys = ("xhat", "s")

    def __init__(self, hp, ctx):
        self.gamma = hp.gamma
        self.hat_init = hp.hat_init
        self.compressor = hp.compressor  # the built compressor (a component-valued parameter)
        self.d = ctx.layout.d
        self.element_size = torch.empty(0, dtype=ctx.dtype).element_size()
        self.xhat = None  # built at the first step, in X's dtype and device
        self.s = None

    def step(self, X, G, optimizer, ctx):
        U = optimizer.direction(X, G)
        if self.xhat is None:
            self.xhat = X.clone() if self.hat_init == "x0" else torch.zeros_like(X)
            self.s = self.xhat.clone()  # W x^0 = x^0: every worker starts from x^0 (or 0)
        X_next = X - ctx.lr * U
        X_next.add_(self.s - self.xhat, alpha=self.gamma)
        payload = self.compressor.encode(X_next - self.xhat, ctx.comm.workers, ctx.step, ctx.seed)
        self.xhat.add_(self.compressor.decode(payload))
        self.s.add_(ctx.comm.mix_payload(payload, self.compressor.decode, ctx.step))
        return X_next

    def bytes_per_step(self, n: int, topology, d: int, element_size: int) -> float:
        return topology.properties()["sends_per_step"] * self.compressor.message_bytes(d, element_size)

    def sends_per_step(self, n: int, topology) -> float:
        """Model-sized equivalents: messages per step times a message's share of a model."""
        return self.bytes_per_step(n, topology, self.d, self.element_size) / (self.d * self.element_size)


# qsgd.scale: unscaled QSGD (few levels, large tensors) is no contraction and CHOCO diverges with it;
# the reference's example scripts pass --is_biased True. Other compressors ignore the value.
preset("choco", "plain", "sgd", "choco",
       "CHOCO-SGD: gossip of compressed x - xhat (Koloskova et al. 2019); --compressor top-k|random-k|qsgd|sign",
       qsgd__scale=True)
