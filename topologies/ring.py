"""ring: undirected cycle 0-1-...-(n-1)-0; weight 1/3 to self and to each of the two neighbours.

n = 2 gives W = [[1/2, 1/2], [1/2, 1/2]] and n = 1 gives W = [[1]].
"""

import numpy as np

from topologies.base import TOPOLOGIES, Topology, no_arg, uniform_circulant


@TOPOLOGIES.register("ring", "undirected cycle, 1/3 to self and each neighbour")
def ring(n: int, arg: str | None) -> Topology:
    no_arg("ring", arg)
    if n == 1:
        W = np.ones((1, 1))
    elif n == 2:
        W = np.full((2, 2), 0.5)
    else:
        W = uniform_circulant([1, -1], n)
    return Topology("ring", n, [W])
