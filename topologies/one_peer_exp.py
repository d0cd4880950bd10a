"""one-peer-exp: time-varying one-peer exponential graph; n must be a power of two.

Period log2(n): at step t, with k = t mod period, worker i averages with partner i XOR 2^k,
weight 1/2 each. The product over one period is exactly the all-1/n matrix: W(k) = (I + P_k) / 2
with P_k the XOR-2^k permutation; the characters of Z_2^L diagonalise all of them, with
eigenvalue (1 + chi(2^k)) / 2 in {0, 1}, and only the trivial character keeps 1 at every step.
So the rate is 0 (closed form).
"""

import numpy as np

from bench.errors import UserError
from topologies.base import TOPOLOGIES, Topology, csr_from_entries, no_arg, pairing_matrix


def _rate(topo: Topology) -> float:
    return 0.0  # the product over a period is J


@TOPOLOGIES.register("one-peer-exp", "one partner per step, i XOR 2^k (period log2 n; n a power of two)")
def one_peer_exp(n: int, arg: str | None) -> Topology:
    no_arg("one-peer-exp", arg)
    if n & (n - 1):
        raise UserError(f"one-peer-exp needs n a power of two (1, 2, 4, 8, 16, ...); got n={n}")
    if n == 1:
        return Topology("one-peer-exp", 1, [csr_from_entries(1, [], [], [], [1.0])])
    i = np.arange(n, dtype=np.int64)
    mats = []
    for k in range(n.bit_length() - 1):
        low = i[(i & (1 << k)) == 0]  # i < i ^ 2^k
        mats.append(pairing_matrix(n, np.stack((low, low ^ (1 << k)), axis=1)))
    return Topology("one-peer-exp", n, mats, rate=_rate)


def _supports(n: int) -> str | None:
    return None if n & (n - 1) == 0 else "needs n a power of two"


one_peer_exp.supports = _supports
