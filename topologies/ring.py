"""ring: undirected cycle 0-1-...-(n-1)-0; weight 1/3 to self and to each of the two neighbours.

n = 2 gives W = [[1/2, 1/2], [1/2, 1/2]] and n = 1 gives W = [[1]].

Spectrum (closed form): W = (I + S + S^T) / 3 with S the cyclic shift is circulant; the Fourier
mode k has eigenvalue lambda_k = 1/3 + 2/3 cos(2 pi k / n). Away from k = 0 (the consensus mode)
the largest modulus is at k = 1 or k = floor(n/2) (cos is monotone on [0, pi]):

    rate = max(|1/3 + 2/3 cos(2 pi / n)|, |1/3 + 2/3 cos(2 pi floor(n/2) / n)|)

which is 1/3 + 2/3 cos(2 pi / n) for n >= 5 (1/3 for n = 4, 0 for n <= 3).
"""

import math

from topologies.base import TOPOLOGIES, Topology, csr_from_entries, no_arg, rate_from_rho, uniform_circulant


def ring_rate(n: int) -> float:
    """Closed-form mixing rate of the ring of n workers (see the module doc)."""
    if n <= 2:
        return 0.0  # [[1]] and the all-1/2 matrix: W = J
    lam = [1.0 / 3.0 + 2.0 / 3.0 * math.cos(2.0 * math.pi * k / n) for k in (1, n // 2)]
    return rate_from_rho(max(abs(x) for x in lam), 1)


def _rate(topo: Topology) -> float:
    return ring_rate(topo.n)


@TOPOLOGIES.register("ring", "undirected cycle, 1/3 to self and each neighbour")
def ring(n: int, arg: str | None) -> Topology:
    no_arg("ring", arg)
    if n == 1:
        W = csr_from_entries(1, [], [], [], [1.0])
    elif n == 2:
        W = csr_from_entries(2, [0, 1], [1, 0], [0.5, 0.5], [0.5, 0.5])
    else:
        W = uniform_circulant([1, -1], n)
    return Topology("ring", n, [W], rate=_rate)
