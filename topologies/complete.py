"""complete: every worker talks to every other; W_ij = 1/n for all i, j (mixing is the exact mean).

Held implicitly (base.CompleteTopology): no n x n matrix is built unless asked for (up to
base.COMPLETE_MAX workers); is_uniform() is true, so mixers take the plain mean. Rate 0: W - J = 0.
"""

from topologies.base import TOPOLOGIES, CompleteTopology, Topology, no_arg


@TOPOLOGIES.register("complete", "all-to-all, W = 1/n everywhere (exact averaging)")
def complete(n: int, arg: str | None) -> Topology:
    no_arg("complete", arg)
    return CompleteTopology("complete", n)
