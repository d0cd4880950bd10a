"""one-peer-exp: time-varying one-peer exponential graph; n must be a power of two.

Period log2(n): at step t, with k = t mod period, worker i averages with partner i XOR 2^k,
weight 1/2 each. The product over one period is exactly the all-1/n matrix.
"""

import numpy as np

from bench.errors import UserError
from topologies.base import TOPOLOGIES, Topology, no_arg, pairing_matrix


@TOPOLOGIES.register("one-peer-exp", "one partner per step, i XOR 2^k (period log2 n; n a power of two)")
def one_peer_exp(n: int, arg: str | None) -> Topology:
    no_arg("one-peer-exp", arg)
    if n & (n - 1):
        raise UserError(f"one-peer-exp needs n a power of two (1, 2, 4, 8, 16, ...); got n={n}")
    if n == 1:
        return Topology("one-peer-exp", 1, [np.ones((1, 1))])
    mats = []
    for k in range(n.bit_length() - 1):
        pairs = [(i, i ^ (1 << k)) for i in range(n) if i < i ^ (1 << k)]
        mats.append(pairing_matrix(n, pairs))
    return Topology("one-peer-exp", n, mats)


def _supports(n: int) -> str | None:
    return None if n & (n - 1) == 0 else "needs n a power of two"


one_peer_exp.supports = _supports
