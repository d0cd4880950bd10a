"""exponential: static symmetric exponential graph; worker i is linked to i +- 2^k mod n for
k = 0 .. floor(log2(n - 1)), duplicates merged; uniform weight 1/(deg + 1) to self and each neighbour.

Spectrum (closed form): W is circulant with offset set S = {+-2^k mod n} (distinct, nonzero) and
weight w = 1/(|S| + 1); the Fourier mode k has eigenvalue

    lambda_k = w (1 + sum_{s in S} cos(2 pi k s / n)),   rate = max_{k = 1..n-1} |lambda_k|

(base.symmetric_circulant_rate, O(n log n)).
"""

from topologies.base import TOPOLOGIES, Topology, csr_from_entries, no_arg, symmetric_circulant_rate, uniform_circulant


def exponential_offsets(n: int) -> list[int]:
    hops = [2**k for k in range((n - 1).bit_length())]  # 2^k <= n - 1
    return hops + [-h for h in hops]


def _rate(topo: Topology) -> float:
    return symmetric_circulant_rate(exponential_offsets(topo.n), topo.n)


@TOPOLOGIES.register("exponential", "static exponential graph, neighbours i +- 2^k, uniform weights")
def exponential(n: int, arg: str | None) -> Topology:
    no_arg("exponential", arg)
    if n == 1:
        return Topology("exponential", 1, [csr_from_entries(1, [], [], [], [1.0])])
    offsets = exponential_offsets(n)
    return Topology("exponential", n, [uniform_circulant(offsets, n)], rate=_rate)
