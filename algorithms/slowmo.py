"""SlowMo (Wang et al. ICLR 2020): a base algorithm, and every tau steps a slow momentum step.

    base step (every step): local SGD ("slowmo": x_i <- x_i - lr U_i, then the exact average after
                 steps t with (t + 1) % H == 0, H = --local-period) or D-SGD ("slowmo-gossip":
                 x_i <- sum_j W_ij x_j - lr U_i, as algorithms/gossip.py)
    after steps t with (t + 1) % tau == 0 (tau = --period), instead of the base communication:
      xbar = mean_i (x_i - lr_t U_i)          (one all-reduce)
      u    <- beta u + (x0 - xbar) / lr_t     (lr_t: this step's base lr)
      x0   <- x0 - alpha lr_t u
      x_i  <- x0                              (every worker)

When both fire on one step the slow step replaces the base sync: its exact average already is
one (fairscale skips the local-SGD all-reduce then, and with slowmo_memory_efficient the gossip
too; mean_i (W x)_i = mean_i x_i for a doubly stochastic W, so skipping the mix changes nothing).
x0 starts at x^0 (every worker starts from it), u at 0. alpha = 1, beta = 0 gives x0 = xbar: the
base algorithm with one extra exact average every tau steps (none when H divides tau).
Sent: the base algorithm's messages on ordinary steps; an all-reduce (2 (n - 1) / n model sizes:
fairscale's sharded reduce + broadcast) on slow steps; counted exactly over the run.

Reference: facebookresearch/fairscale fairscale/experimental/nn/data_parallel/gossip/distributed.py
(SlowMoDistributedDataParallel.perform_slowmo, _should_allreduce_params, _perform_local_optimization:
gmb = beta gmb + (old - p) / lr, old -= slowmo_lr lr gmb, p = old; defaults slowmo_lr 1.0,
slowmo_momentum 0.5, slowmo_frequency 48, localsgd_frequency 3). fairscale copies x0 from each
shard owner's own parameters inside the first perform_slowmo call, i.e. after the first local step;
here x0 = x^0 as epfml/quasi-global-momentum decentralized_sgd.py (slowmo_step_conf). Inner
optimizer buffers are untouched (neither averaged nor reset), as fairscale.
"""

from algorithms.base import RULES, preset
from algorithms.gossip import Gossip
from algorithms.local import allreduce_sends
from bench.spec import Param, RuleBase, between, positive, probability_open


class _SlowMo(RuleBase):
    """The slow momentum step around a base algorithm (base(), base_sends())."""

    params = (
        Param("period", 48, "steps between slow momentum steps (tau)", check=between(1)),
        Param("slow_lr", 1.0, "slow learning rate alpha: x0 <- x0 - alpha lr_t u", check=positive),
        Param("slow_momentum", 0.5, "slow momentum beta: u <- beta u + (x0 - xbar) / lr_t",
              check=probability_open),
    )
    state_keys = ("x0", "u")

    def __init__(self, hp, ctx):
        self.tau, self.alpha, self.beta = hp.period, hp.slow_lr, hp.slow_momentum
        self.total_steps = ctx.total_steps
        self.x0 = self.u = None  # slow model [d], slow momentum [d]

    def slow(self, t: int) -> bool:
        return (t + 1) % self.tau == 0

    def step(self, X, G, optimizer, ctx):
        if self.x0 is None:
            self.x0, self.u = X[0].clone(), X.new_zeros(X.shape[1])  # x^0, the same on every worker and rank
        if not self.slow(ctx.step):
            return self.base(X, G, optimizer, ctx)
        xbar = ctx.comm.allreduce_mean(X - ctx.lr * optimizer.direction(X, G))[0]
        self.u.mul_(self.beta).add_((self.x0 - xbar) / ctx.lr)
        self.x0 = self.x0 - self.alpha * ctx.lr * self.u
        return self.x0.expand_as(X).contiguous()

    def sends_per_step(self, n: int, topology) -> float:
        total = sum(allreduce_sends(n) if self.slow(t) else self.base_sends(t, n, topology)
                    for t in range(self.total_steps))
        return total / max(1, self.total_steps)


@RULES.register("slowmo", "SlowMo over local SGD: average every H steps, slow momentum step every tau steps")
class SlowMo(_SlowMo):
    params = _SlowMo.params + (
        Param("local_period", 3, "base local SGD: local steps between parameter averages (H)", check=between(1)),
    )

    def __init__(self, hp, ctx):
        super().__init__(hp, ctx)
        self.H = hp.local_period

    def averages(self, t: int) -> bool:
        return (t + 1) % self.H == 0

    def base(self, X, G, optimizer, ctx):
        X = X - ctx.lr * optimizer.direction(X, G)
        return ctx.comm.allreduce_mean(X).contiguous() if self.averages(ctx.step) else X

    def base_sends(self, t: int, n: int, topology) -> float:
        return allreduce_sends(n) if self.averages(t) else 0.0


@RULES.register("slowmo-gossip", "SlowMo over D-SGD: gossip every step, slow momentum step every tau steps")
class SlowMoGossip(_SlowMo):
    params = _SlowMo.params + Gossip.params
    needs_topology = True

    def __init__(self, hp, ctx):
        super().__init__(hp, ctx)
        self.gossip = Gossip(hp, ctx)

    def base(self, X, G, optimizer, ctx):
        return self.gossip.step(X, G, optimizer, ctx)

    def base_sends(self, t: int, n: int, topology) -> float:
        return self.gossip.rounds * topology.sends(t) / n  # W(t)'s messages (its off-diagonal nonzeros)


preset("slowmo", "plain", "sgd", "slowmo",
       "SlowMo: local SGD (H = 3) with a slow momentum step every 48 steps (Wang et al. 2020)")
preset("slowmo-gossip", "plain", "sgd", "slowmo-gossip",
       "SlowMo over D-SGD: gossip every step, a slow momentum step every 48 steps (Wang et al. 2020)")
