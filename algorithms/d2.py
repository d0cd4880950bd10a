"""D^2 (Tang et al. 2018) and Exact Diffusion (Yuan et al. 2019): bias-corrected decentralized SGD.

    h^t       = G^t + wd x^t                                         (no momentum: see check_run)
    x^{1/2}   = x^0 - lr_0 h^0                                       (first step)
    x^{t+1/2} = 2 x^t - x^{t-1} - lr_t (h^t - h^{t-1})               (lr_form "current", the default)
    x^{t+1}   = M x^{t+1/2},   M = W (d2)   or   M = (I + W) / 2 (exact-diffusion)

Sent per step: x^{t+1/2}, one model-sized message per neighbour (as gossip). State: x^{t-1}
and h^{t-1} (and lr_{t-1}), local.

The learning-rate schedule. The three conventions agree for a constant lr:
  current   lr_t (h^t - h^{t-1}): epfml/quasi-global-momentum code/pcode/optim/decentralized_d2.py
            (SGD.step), the brief's reference. Its mean follows x_bar^{t+1} - x_bar^t =
            -lr_t h_bar^t + sum_{s<t} (lr_{s+1} - lr_s) h_bar^s: under a decaying schedule the
            mean keeps moving with (roughly) the first lr, and on W = J it is not C-SGD.
  previous  lr_t h^t - lr_{t-1} h^{t-1}: Exact Diffusion as Bluefog writes it (psi^{k+1} = w^k -
            a g^k, phi^{k+1} = psi^{k+1} + w^k - psi^k, w^{k+1} = Abar phi^{k+1}, psi^0 = w^0).
  ratio     x^t + (lr_t / lr_{t-1})(x^t - x^{t-1}) - lr_t (h^t - h^{t-1}): epfml decentralized_d2_v1.py
            (it stores (x^{t-1} - x^t) / lr_{t-1} after gossip).
With "previous" or "ratio" the mean is exactly SGD on the mean gradient for any schedule, so on
the complete graph (W = J, identical start) both rules are C-SGD without momentum; with "current"
only for a constant lr.

Mixing matrices. D^2 needs lambda_min(W) > -1/3 (Tang et al. 2018): the 1/3-weighted ring with
an even number of workers sits exactly at -1/3 (the boundary); pairings (one-peer graphs) have
eigenvalues 0 and 1. Exact Diffusion's (I + W)/2 has lambda_min >= 0 for every W. A time-varying
W(t) is used as the step's W (the analyses assume a fixed W). The rules cannot see the topology
when the run is checked, so nothing enforces this.

References: epfml decentralized_d2.py (above; weight decay added to the gradient, momentum_factor
never used, x^{1/2} = x^0 - lr h^0 at local_index 0, then the D^2 step, then the weighted gossip;
its bit count adds an unexplained bits * ceil(log2 n), not counted here). Bluefog
examples/pytorch_optimization.py exact_diffusion (use_Abar: self weight (a_ii + 1)/2, neighbours
a_ij / 2); Yuan, Ying, Zhao & Sayed 2019, Exact Diffusion Part I, Alg. 1. Substituting psi shows
Exact Diffusion is D^2 with W replaced by (I + W)/2.
"""

from algorithms.base import RULES, preset
from bench.errors import UserError
from bench.spec import Param, RuleBase


@RULES.register("d2", "D^2: x <- W (2x - x_prev - lr (h - h_prev)) (Tang et al. 2018; no momentum)")
class D2(RuleBase):
    params = (Param("lr_form", "current", "lr on the gradient difference: current = lr_t (h - h_prev) (epfml D2); "
                    "previous = lr_t h - lr_{t-1} h_prev (Exact Diffusion's psi); ratio = epfml D2_v1",
                    choices=("current", "previous", "ratio")),)
    needs_topology = True
    needs = ("decayed",)
    state_keys = ("x_prev", "h_prev", "lr_prev")
    reference = "Tang et al. and epfml's decentralized_d2"

    def __init__(self, hp, ctx):
        self.lr_form = hp.lr_form
        self.x_prev = self.h_prev = self.lr_prev = None

    @classmethod
    def check_run(cls, values: dict) -> None:
        if values.get("sgd.momentum", 0.0) != 0:
            raise UserError(f"{cls.name} applies no momentum, as {cls.reference}; use --momentum 0")

    def mixed(self, Z, ctx):
        return ctx.comm.mix(Z, ctx.step)

    def step(self, X, G, optimizer, ctx):
        h, lr = optimizer.decayed(X, G), ctx.lr
        if self.x_prev is None:
            Z = X - lr * h
        elif self.lr_form == "current":
            Z = 2 * X - self.x_prev - lr * (h - self.h_prev)
        elif self.lr_form == "previous":
            Z = 2 * X - self.x_prev - lr * h + self.lr_prev * self.h_prev
        else:  # ratio
            Z = X + (lr / self.lr_prev) * (X - self.x_prev) - lr * (h - self.h_prev)
        self.x_prev, self.h_prev, self.lr_prev = X.clone(), h.clone(), lr
        return self.mixed(Z, ctx)

    def sends_per_step(self, n: int, topology) -> float:
        return topology.properties()["sends_per_step"]


@RULES.register("exact-diffusion", "Exact Diffusion: D^2 with W replaced by (I + W)/2 (Yuan et al. 2019)")
class ExactDiffusion(D2):
    reference = "Yuan et al. and bluefog's exact_diffusion"

    def mixed(self, Z, ctx):
        return ctx.comm.mix(Z, ctx.step).add_(Z).mul_(0.5)


preset("d2", "plain", "sgd", "d2",
       "D^2: decentralized SGD corrected for heterogeneous local data (Tang et al. 2018), no momentum",
       sgd__momentum=0.0)
preset("exact-diffusion", "plain", "sgd", "exact-diffusion", "Exact Diffusion: D^2 over (I + W)/2 (Yuan et al. 2019)",
       sgd__momentum=0.0)
