"""exponential: static symmetric exponential graph; worker i is linked to i +- 2^k mod n for
k = 0 .. floor(log2(n - 1)), duplicates merged; uniform weight 1/(deg + 1) to self and each neighbour.
"""

import numpy as np

from topologies.base import TOPOLOGIES, Topology, no_arg, uniform_circulant


@TOPOLOGIES.register("exponential", "static exponential graph, neighbours i +- 2^k, uniform weights")
def exponential(n: int, arg: str | None) -> Topology:
    no_arg("exponential", arg)
    if n == 1:
        return Topology("exponential", 1, [np.ones((1, 1))])
    hops = [2**k for k in range((n - 1).bit_length())]  # 2^k <= n - 1
    return Topology("exponential", n, [uniform_circulant(hops + [-h for h in hops], n)])
