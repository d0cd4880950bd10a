"""one-peer-ring: time-varying ring with one partner per step, period 2.

Even t pairs (0,1), (2,3), ...; odd t pairs (1,2), (3,4), ... and (n-1, 0) when n is even.
A pair averages with weight 1/2 each; an unpaired worker keeps weight 1 on itself. Over one
period the pairs cover the cycle (even n) or the path 0-1-...-(n-1) (odd n), so it is connected.
n = 1 is the identity with period 1.
"""

import numpy as np

from topologies.base import TOPOLOGIES, Topology, no_arg, pairing_matrix


@TOPOLOGIES.register("one-peer-ring", "ring, one partner per step alternating even/odd pairs (period 2)")
def one_peer_ring(n: int, arg: str | None) -> Topology:
    no_arg("one-peer-ring", arg)
    if n == 1:
        return Topology("one-peer-ring", 1, [np.ones((1, 1))])
    even = [(i, i + 1) for i in range(0, n - 1, 2)]
    odd = [(i, i + 1) for i in range(1, n - 1, 2)]
    if n % 2 == 0:
        odd.append((n - 1, 0))
    return Topology("one-peer-ring", n, [pairing_matrix(n, even), pairing_matrix(n, odd)])
