"""A test-only plug-in: D-SGD whose given rank kills itself (SIGKILL) or hangs at a given step.

Loaded only by the tests that need a rank to fail (through DSGDBENCH_PLUGINS in the
environment of the command they start), so no failure hook lives in the package.
"""

import os
import signal
import time

from algorithms.base import RULES, preset
from algorithms.gossip import Gossip
from bench.spec import Param


@RULES.register("test-crash", "D-SGD whose rank --crash-rank fails at --crash-step (a test plug-in)")
class Crash(Gossip):
    params = Gossip.params + (
        Param("crash_step", -1, "the step at which the rank fails (-1: never)"),
        Param("crash_rank", 1, "the rank that fails"),
        Param("crash_mode", "kill", "kill (SIGKILL itself) or hang (sleep for an hour)", choices=("kill", "hang")),
    )

    def __init__(self, hp, ctx):
        super().__init__(hp, ctx)
        self.at, self.rank, self.mode = hp.crash_step, hp.crash_rank, hp.crash_mode

    def step(self, X, G, optimizer, ctx):
        if ctx.step == self.at and ctx.comm.rank == self.rank:
            if self.mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(3600)
        return super().step(X, G, optimizer, ctx)


preset("test-crash", "plain", "sgd", "test-crash", "D-SGD with a failing rank (a test plug-in)")
