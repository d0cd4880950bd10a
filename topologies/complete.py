"""complete: every worker talks to every other; W_ij = 1/n for all i, j (mixing is the exact mean)."""

import numpy as np

from topologies.base import TOPOLOGIES, Topology, no_arg


@TOPOLOGIES.register("complete", "all-to-all, W = 1/n everywhere (exact averaging)")
def complete(n: int, arg: str | None) -> Topology:
    no_arg("complete", arg)
    return Topology("complete", n, [np.full((n, n), 1.0 / n)])
