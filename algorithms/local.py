"""Local SGD and post-local SGD: local steps, then an exact average of the parameters.

    x_i <- x_i - lr U_i                       every step (U_i: worker i's own optimizer and buffers)
    x_i <- mean_j x_j                         after step t if t < t0 or (t + 1 - t0) % H == 0

H = --period, t0 = --local-start (a fraction of training, "0.5", or an epoch, "10ep"; rounded to
a step). Before t0 every step averages (post-local SGD, Lin et al. ICLR 2020: synchronous
mini-batch SGD first); from t0 on, rounds of H local steps, the first ending at step t0 + H - 1.
With t0 = 0 (default) averaging follows steps H-1, 2H-1, ... (fairscale SlowMo localsgd,
(num_updates + 1) % H == 0; torchft LocalSGD sync_every). Sent: one parameter all-reduce
(2 (n - 1) / n model sizes) per averaging step, counted exactly over the run.

Reference: epfml/LocalSGD-Code distributed_code/pcode/optim/local_sgd.py (LocalSGD.step): local
torch-style SGD step, then the average when epoch < turn_on_local_step_from or local_index % H == 0.
Momentum buffers stay local: neither averaged nor reset, only the parameters are. Differences: that
code averages after the global steps 0, H, 2H, ... (its first round is one step long, and after the
switch the rounds stay aligned to step 0); here rounds are H steps long and start at t0.
Initialisation: every worker starts from the same x^0 (the runner replicates it).
"""

from algorithms.base import RULES, preset
from algorithms.gossip_ac import parse_start
from bench.spec import Check, Param, RuleBase, between


def allreduce_sends(n: int) -> float:
    """Model sizes one worker sends in a ring all-reduce of a model-sized vector."""
    return 2 * (n - 1) / n


def start_step(text: str, ctx) -> int:
    """The step of a --local-start value ("0.5": a fraction of training, "10ep": an epoch)."""
    kind, v = parse_start(text)
    return round(v * (ctx.total_steps if kind == "fraction" else ctx.epoch_len))


START = Check(lambda s: parse_start(s) is not None,
              "must be a fraction of training in [0, 1] (e.g. 0.5) or an epoch (e.g. 150ep)")


@RULES.register("local", "local SGD: H local steps, then average the parameters (post-local: from --local-start)")
class Local(RuleBase):
    params = (
        Param("period", 4, "local steps between parameter averages (H)", check=between(1)),
        Param("local_start", "0", "average every step before this point: a fraction of training (0.5) or an "
              "epoch (150ep); then every H steps (post-local SGD)", check=START),
    )

    def __init__(self, hp, ctx):
        self.H = hp.period
        self.t0 = start_step(hp.local_start, ctx)
        self.total_steps = ctx.total_steps

    def averages(self, t: int) -> bool:
        return t < self.t0 or (t + 1 - self.t0) % self.H == 0

    def step(self, X, G, optimizer, ctx):
        X = X - ctx.lr * optimizer.direction(X, G)
        return ctx.comm.allreduce_mean(X).contiguous() if self.averages(ctx.step) else X

    def sends_per_step(self, n: int, topology) -> float:
        syncs = sum(self.averages(t) for t in range(self.total_steps))
        return allreduce_sends(n) * syncs / max(1, self.total_steps)


preset("local-sgd", "plain", "sgd", "local", "Local SGD: H = 4 local SGD steps, then an average (Stich 2019)")
preset("post-local-sgd", "plain", "sgd", "local",
       "post-local SGD: C-SGD for the first half, then local SGD with H = 16 (Lin et al. 2020)",
       local_start="0.5", period=16)
