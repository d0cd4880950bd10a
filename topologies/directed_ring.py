"""directed-ring: directed cycle, worker j pushes half of its value to j + 1 (mod n).

    (W x)_i = 1/2 x_i + 1/2 x_{i-1}      column j: 1/2 stays at j, 1/2 goes to j + 1

One message per worker per step. Every worker has one in- and one out-neighbour, so W is
also doubly stochastic (D-SGD may mix over it); it is registered as directed, the graph of
push-sum (--algo sgp). n = 2 gives [[1/2, 1/2], [1/2, 1/2]] and n = 1 gives [[1]].
"""

import numpy as np

from topologies.base import TOPOLOGIES, Topology, no_arg


def push_matrix(n: int, hop: int) -> np.ndarray:
    """W with W_jj = 1/2 and W_{j+hop, j} = 1/2 (mod n): every worker keeps half and pushes half."""
    W = 0.5 * np.eye(n)
    j = np.arange(n)
    W[(j + hop) % n, j] += 0.5
    return W


@TOPOLOGIES.register("directed-ring", "directed cycle: i pushes 1/2 to i+1, keeps 1/2 (push-sum, --algo sgp)")
def directed_ring(n: int, arg: str | None) -> Topology:
    no_arg("directed-ring", arg)
    return Topology("directed-ring", n, [np.ones((1, 1)) if n == 1 else push_matrix(n, 1)], directed=True)
