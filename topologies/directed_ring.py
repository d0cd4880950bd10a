"""directed-ring: directed cycle, worker j pushes half of its value to j + 1 (mod n).

    (W x)_i = 1/2 x_i + 1/2 x_{i-1}      column j: 1/2 stays at j, 1/2 goes to j + 1

One message per worker per step. Every worker has one in- and one out-neighbour, so W is
also doubly stochastic (D-SGD may mix over it); it is registered as directed, the graph of
push-sum (--algo sgp). n = 2 gives [[1/2, 1/2], [1/2, 1/2]] and n = 1 gives [[1]].

Spectrum (closed form): W = (I + S) / 2 with S the cyclic shift is circulant; the Fourier mode k
has eigenvalue (1 + e^{-2 pi i k / n}) / 2, of modulus |cos(pi k / n)|; away from k = 0 the
largest is at k = 1: rate = cos(pi / n) (0 for n <= 2).
"""

import math

import numpy as np

from topologies.base import TOPOLOGIES, Topology, csr_from_entries, no_arg, rate_from_rho


def push_matrix(n: int, hop: int):
    """W with W_jj = 1/2 and W_{j+hop, j} = 1/2 (mod n): every worker keeps half and pushes half (CSR)."""
    j = np.arange(n, dtype=np.int64)
    if hop % n == 0:
        return csr_from_entries(n, [], [], [], np.ones(n))
    return csr_from_entries(n, (j + hop) % n, j, np.full(n, 0.5), np.full(n, 0.5))


def push_rate(n: int, hops: list[int]) -> float:
    """Closed-form rate of the product of push_matrix(n, h) over h in hops (circulants: the Fourier
    mode k has eigenvalue prod_h (1 + e^{-2 pi i k h / n}) / 2, of modulus prod_h |cos(pi k h / n)|);
    rho = the largest over k = 1..n-1, rate = rho^(1/len(hops)). O(n len(hops))."""
    if n <= 1:
        return 0.0
    k = np.arange(1, n, dtype=np.int64)
    mod = np.ones(n - 1)
    for h in hops:
        mod *= np.abs(np.cos(np.pi * ((k * h) % n) / n))
    return rate_from_rho(np.max(mod), len(hops))


def _rate(topo: Topology) -> float:
    n = topo.n
    return 0.0 if n <= 2 else rate_from_rho(math.cos(math.pi / n), 1)


@TOPOLOGIES.register("directed-ring", "directed cycle: i pushes 1/2 to i+1, keeps 1/2 (push-sum, --algo sgp)")
def directed_ring(n: int, arg: str | None) -> Topology:
    no_arg("directed-ring", arg)
    W = csr_from_entries(1, [], [], [], [1.0]) if n == 1 else push_matrix(n, 1)
    return Topology("directed-ring", n, [W], directed=True, rate=_rate)
