"""DiLoCo (Douillard et al. 2023): H inner steps per worker, then one outer Nesterov-SGD step on
the averaged pseudo-gradient.

    x_i <- x_i - lr U_i                       every step (inner optimizer, local state: AdamW)
    after steps t with (t + 1) % H == 0:
      D = theta - mean_i x_i                  (one all-reduce of the parameters)
      b = mu b + D                            (b = D at the first round: torch SGD's buffer)
      theta <- theta - outer_lr (D + mu b)    (Nesterov; plain momentum: - outer_lr b; mu = 0: - outer_lr D)
      x_i <- theta                            (every worker restarts from the new global model)

theta starts at x^0 (the runner starts every worker from it) and is replicated on every rank.
Sent: one all-reduce (2 (n - 1) / n model sizes) per round, i.e. after every H-th step.

Reference: pytorch/torchft torchft/local_sgd.py, DiLoCo / _StreamingDiLoCoFragment (one fragment,
no delay, fragment_update_alpha 0): pseudo-gradient = saved global parameters - local parameters,
all-reduced with AVG, restore the global parameters, outer_optimizer.step() with
torch.optim.SGD(lr=0.7, momentum=0.9, nesterov=True), save them as the new global model; the sync
runs when the step counter reaches sync_every (after steps H-1, 2H-1, ...). The inner optimizer's
state is never reset nor communicated; the inner lr schedule keeps running; the outer lr is constant.
"""

from algorithms.base import RULES, preset
from algorithms.local import allreduce_sends
from bench.spec import Param, RuleBase, between, positive, probability_open


@RULES.register("diloco", "DiLoCo: H inner steps, then outer Nesterov SGD on theta - mean x (one all-reduce)")
class DiLoCo(RuleBase):
    params = (
        Param("period", 8, "inner steps per round (H)", check=between(1)),
        Param("outer_lr", 0.7, "outer SGD learning rate (constant)", check=positive),
        Param("outer_momentum", 0.9, "outer SGD momentum mu: b = mu b + D", check=probability_open),
        Param("outer_nesterov", True, "outer Nesterov: theta <- theta - outer_lr (D + mu b)"),
    )
    state_keys = ("theta", "b")

    def __init__(self, hp, ctx):
        self.H = hp.period
        self.outer_lr, self.mu, self.nesterov = hp.outer_lr, hp.outer_momentum, hp.outer_nesterov
        self.total_steps = ctx.total_steps
        self.theta = self.b = None  # global model [d], outer momentum buffer [d]

    def syncs(self, t: int) -> bool:
        return (t + 1) % self.H == 0

    def step(self, X, G, optimizer, ctx):
        if self.theta is None:
            self.theta = X[0].clone()  # x^0, the same on every worker and rank
        X = X - ctx.lr * optimizer.direction(X, G)
        if not self.syncs(ctx.step):
            return X
        D = self.theta - ctx.comm.allreduce_mean(X)[0]
        if self.mu:
            self.b = D.clone() if self.b is None else self.b.mul_(self.mu).add_(D)
            D = D.add(self.b, alpha=self.mu) if self.nesterov else self.b
        self.theta = self.theta - self.outer_lr * D
        return self.theta.expand_as(X).contiguous()

    def sends_per_step(self, n: int, topology) -> float:
        rounds = sum(self.syncs(t) for t in range(self.total_steps))
        return allreduce_sends(n) * rounds / max(1, self.total_steps)


preset("diloco", "plain", "adamw", "diloco",
       "DiLoCo: H = 8 inner AdamW steps, outer Nesterov SGD (lr 0.7, mu 0.9) on the pseudo-gradient "
       "(Douillard et al. 2023); use an Adam-sized --lr")
