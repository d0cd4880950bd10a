"""one-peer-ring: time-varying ring with one partner per step, period 2.

Even t pairs (0,1), (2,3), ...; odd t pairs (1,2), (3,4), ... and (n-1, 0) when n is even.
A pair averages with weight 1/2 each; an unpaired worker keeps weight 1 on itself. Over one
period the pairs cover the cycle (even n) or the path 0-1-...-(n-1) (odd n), so it is connected.
n = 1 is the identity with period 1.

Spectrum (closed form) of the product W(1) W(0), even n: both steps commute with the shift by 2,
so the Fourier modes theta = 2 pi m / (n/2) of the n/2 blocks of two reduce it to 2 x 2 symbols
W(1)(theta) W(0)(theta) = 1/4 [[1 + e^{-i theta}] * 2, [1 + e^{i theta}] * 2], of rank one with
eigenvalue (1 + cos theta) / 2 = cos^2(2 pi m / n); m = 0 is the consensus mode, so
rho = cos^2(2 pi / n) and rate = rho^(1/2) = |cos(2 pi / n)| (0 for n = 2 and n = 4).
Odd n: the graph is the mirror-symmetric half of the even one-peer-ring of 2n workers
(worker j <-> 2n - 1 - j maps even pairs to even pairs, odd to odd; the pairs across the mirror
leave 0 and n - 1 alone, as here), whose modes give cos^2(pi m / n): rate = |cos(pi / n)|.
"""

import math

import numpy as np

from topologies.base import TOPOLOGIES, Topology, csr_from_entries, no_arg, pairing_matrix, rate_from_rho


def one_peer_ring_rate(n: int) -> float:
    if n <= 2:
        return 0.0
    angle = 2.0 * math.pi / n if n % 2 == 0 else math.pi / n
    return rate_from_rho(math.cos(angle) ** 2, 2)


def _rate(topo: Topology) -> float:
    return one_peer_ring_rate(topo.n)


@TOPOLOGIES.register("one-peer-ring", "ring, one partner per step alternating even/odd pairs (period 2)")
def one_peer_ring(n: int, arg: str | None) -> Topology:
    no_arg("one-peer-ring", arg)
    if n == 1:
        return Topology("one-peer-ring", 1, [csr_from_entries(1, [], [], [], [1.0])])
    even = np.arange(0, n - 1, 2, dtype=np.int64)
    odd = np.arange(1, n - 1, 2, dtype=np.int64)
    even_pairs = np.stack((even, even + 1), axis=1)
    odd_pairs = np.stack((odd, odd + 1), axis=1)
    if n % 2 == 0:
        odd_pairs = np.concatenate((odd_pairs, [[n - 1, 0]]))
    return Topology("one-peer-ring", n, [pairing_matrix(n, even_pairs), pairing_matrix(n, odd_pairs)],
                    rate=_rate)
