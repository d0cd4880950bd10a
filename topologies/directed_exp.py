"""directed-exp: time-varying one-peer directed exponential graph (SGP's default graph).

The phone book of worker i is [i+1, i+2, i+4, ..., i+2^floor(log2(n-1))] (mod n), L entries;
at step t worker i pushes to phone_book[t mod L], so with k = t mod L

    (W(t) x)_i = 1/2 x_i + 1/2 x_{i - 2^k}       period L = floor(log2(n - 1)) + 1

Reference: facebookresearch/stochastic_gradient_push gossip/graph_manager.py
(NPeerDynamicDirectedExponentialGraph with peers_per_itr = 1; the first gossip uses
phone_book[0], gossip/gossiper.py rotates after each mix), weights 1/2 from
gossip/mixing_manager.py UniformMixing. One message per worker per step; every W(t) is
also doubly stochastic (one in- and one out-neighbour). n = 1 gives [[1]].

Spectrum (closed form): every W(t) is circulant, so the Fourier modes diagonalise the product
over a period: rho = max_{k=1..n-1} prod_{j<L} |cos(pi k 2^j / n)|, rate = rho^(1/L)
(directed_ring.push_rate).
"""

from topologies.base import TOPOLOGIES, Topology, csr_from_entries, no_arg
from topologies.directed_ring import push_matrix, push_rate


def _hops(n: int) -> list[int]:
    return [1 << k for k in range((n - 1).bit_length())]  # floor(log2(n - 1)) + 1 hops 1, 2, 4, ..., all < n


def _rate(topo: Topology) -> float:
    return push_rate(topo.n, _hops(topo.n))


@TOPOLOGIES.register("directed-exp", "one peer per step, i pushes to i+2^k (period floor(log2(n-1))+1; SGP's graph)")
def directed_exp(n: int, arg: str | None) -> Topology:
    no_arg("directed-exp", arg)
    if n == 1:
        return Topology("directed-exp", 1, [csr_from_entries(1, [], [], [], [1.0])], directed=True)
    return Topology("directed-exp", n, [push_matrix(n, h) for h in _hops(n)], directed=True, rate=_rate)
