"""DecentLaM: decentralized large-batch momentum SGD (Yuan et al., ICCV 2021).

    psi = x - lr h,  h = G + wd x              (SGD's decayed(): weight decay at x)
    gt  = (x - W(t) psi) / lr                   (the displacement of one ATC D-SGD step, per unit lr)
    m   = beta m + gt ;  x <- x - lr m           (beta = the SGD optimizer's --momentum)

Equivalently x^{t+1} = W (x^t - lr h^t) - lr beta m^t: heavy-ball momentum on the ATC step.
Sent per step: psi, once to every neighbour (as D-SGD); m is never sent.
Initialisation: m = 0, so the first step is ATC D-SGD: x^1 = W (x^0 - lr h^0).
beta = 0 is ATC D-SGD; on the complete graph (identical workers) it is C-SGD with torch
heavy-ball momentum. Nesterov is not part of the method (--nesterov is refused).

Reference code: yukiTakezawa/MomentumTracking, optimizer/decentlam_optimizer.py,
DecentLaMOptimizer.step (a baseline of the Momentum-Tracking code; there is no official code).
There W is uniform 1/(deg + 1) and the weight decay is hard-coded to 0.001; here they are the
topology's W and --weight-decay. The lr of each step enters both psi and gt, as there.
"""

from algorithms.base import RULES, preset
from bench.errors import UserError
from bench.spec import RuleBase


@RULES.register("decentlam", "DecentLaM: m = beta m + (x - W(x - lr h))/lr, x <- x - lr m")
class DecentLaM(RuleBase):
    needs_topology = True
    needs = ("decayed",)
    state_keys = ("m",)

    def __init__(self, hp, ctx):
        self.m = None

    @classmethod
    def check_run(cls, values: dict) -> None:
        if "sgd.momentum" not in values:
            raise UserError("--comm decentlam applies the SGD optimizer's momentum itself (to the gossip "
                            "displacement): use --opt sgd")
        if values.get("sgd.nesterov"):
            raise UserError("--comm decentlam has heavy-ball momentum only (Yuan et al. 2021): drop --nesterov")

    def step(self, X, G, optimizer, ctx):
        lr = ctx.lr
        psi = X - lr * optimizer.decayed(X, G)
        gt = (X - ctx.comm.mix(psi, ctx.step)) / lr
        self.m = gt if self.m is None else self.m.mul_(optimizer.mu).add_(gt)
        return X - lr * self.m

    def sends_per_step(self, n: int, topology) -> float:
        return topology.properties()["sends_per_step"]


preset("decentlam", "plain", "sgd", "decentlam", "DecentLaM: heavy-ball momentum on the ATC gossip step "
       "(Yuan et al. 2021)")
