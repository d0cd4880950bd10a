"""random: Erdos-Renyi graph G(n, p) with Metropolis-Hastings weights
W_ij = 1/(1 + max(d_i, d_j)) on edges, the rest on the diagonal.

Argument "p=0.3,seed=1" (both optional). Default p = min(1, 2 ln(n) / (n - 1)), default
seed 0. The draw uses numpy default_rng(seed); a disconnected draw is redrawn with seed + 1,
seed + 2, ... so the result is deterministic.
"""

import math

import numpy as np

from bench.errors import UserError
from topologies.base import TOPOLOGIES, Topology, is_connected, metropolis_hastings

MAX_DRAWS = 1000


def parse_options(arg: str | None) -> tuple[float | None, int]:
    p, seed = None, 0
    if arg is None:
        return p, seed
    for item in arg.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep:
            raise UserError(f"random topology options look like 'random:p=0.3,seed=1'; got {item!r}")
        if key == "p":
            try:
                p = float(value)
            except ValueError:
                raise UserError(f"random: p must be a number in (0, 1]; got p={value!r}") from None
            if not 0.0 < p <= 1.0:
                raise UserError(f"random: p must be in (0, 1]; got p={value}")
        elif key == "seed":
            try:
                seed = int(value)
            except ValueError:
                raise UserError(f"random: seed must be an integer; got seed={value!r}") from None
            if seed < 0:
                raise UserError(f"random: seed must be >= 0; got seed={seed}")
        else:
            raise UserError(f"random: unknown option {key!r}; valid options: p, seed (e.g. random:p=0.3,seed=1)")
    return p, seed


def default_p(n: int) -> float:
    return 1.0 if n < 3 else min(1.0, 2.0 * math.log(n) / (n - 1))


@TOPOLOGIES.register("random", "Erdos-Renyi G(n, p) (random:p=0.3,seed=1), Metropolis-Hastings weights")
def random_graph(n: int, arg: str | None) -> Topology:
    p, seed = parse_options(arg)
    if p is None:
        p = default_p(n)
    if n == 1:
        topo = Topology("random", 1, [np.ones((1, 1))])
        topo.seed = seed
        return topo
    iu = np.triu_indices(n, k=1)
    for s in range(seed, seed + MAX_DRAWS):
        A = np.zeros((n, n), dtype=bool)
        A[iu] = np.random.default_rng(s).random(iu[0].size) < p
        A |= A.T
        if is_connected([A]):
            topo = Topology("random", n, [metropolis_hastings(A, n)])
            topo.p = p
            topo.seed = s  # the seed of the draw actually used
            return topo
    raise UserError(
        f"random: G(n={n}, p={p:g}) was disconnected in {MAX_DRAWS} draws (seeds {seed}..{seed + MAX_DRAWS - 1}); "
        f"use a larger p, e.g. p={min(1.0, max(2 * p, default_p(n))):.3g}"
    )
