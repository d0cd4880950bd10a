"""random: Erdos-Renyi graph G(n, p) with Metropolis-Hastings weights
W_ij = 1/(1 + max(d_i, d_j)) on edges, the rest on the diagonal.

Argument "p=0.3,seed=1" (both optional). Default p = min(1, 2 ln(n) / (n - 1)), default
seed 0. The draw uses numpy default_rng(seed); a disconnected draw is redrawn with seed + 1,
seed + 2, ... so the result is deterministic.

How the pairs are drawn. Up to EXACT_DRAW_MAX workers, one uniform per pair i < j in row-major
order (rng.random, streamed a million at a time: O(n^2) time, O(n * degree) memory): the graphs
are exactly those of earlier versions, which drew them into an n x n array. Above, a geometric skip
sampler walks the same row-major list of pairs, jumping from one edge to the next by Geometric(p)
steps: O(edges) time and memory, the same distribution G(n, p), but not the graphs the per-pair
draw gave for those n. The spectrum comes from mixing_rate() (ARPACK eigsh above 512 workers).
"""

import math

import numpy as np
import scipy.sparse as sp

from bench.errors import UserError
from topologies.base import TOPOLOGIES, Topology, count_components, csr_from_entries, mh_from_edges, symmetric_edges

MAX_DRAWS = 1000
EXACT_DRAW_MAX = 4096  # per-pair uniforms (the historical graphs) up to this n; a geometric skip sampler above
_BLOCK = 1 << 20  # uniforms drawn at a time by the per-pair sampler


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


def _pair_starts(n: int) -> np.ndarray:
    """Index of the first pair (i, i + 1) of row i in the row-major list of pairs i < j, for i = 0..n-1."""
    i = np.arange(n, dtype=np.int64)
    return i * (n - 1) - i * (i - 1) // 2


def _pairs_at(pos: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) of the pairs at positions pos of the row-major list of pairs i < j."""
    starts = _pair_starts(n)
    i = np.searchsorted(starts, pos, side="right") - 1
    return i, i + 1 + (pos - starts[i])


def draw_edges(n: int, p: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The pairs i < j of one G(n, p) draw with default_rng(seed) (see the module doc)."""
    rng = np.random.default_rng(seed)
    total = n * (n - 1) // 2
    if n <= EXACT_DRAW_MAX:
        # the same stream as rng.random(total) < p over np.triu_indices(n, 1), a block at a time
        found = []
        for lo in range(0, total, _BLOCK):
            size = min(_BLOCK, total - lo)
            found.append(lo + np.flatnonzero(rng.random(size) < p))
        pos = np.concatenate(found) if found else np.zeros(0, dtype=np.int64)
    else:
        found, at = [], -1
        while at < total:
            expect = (total - at) * p
            steps = rng.geometric(p, size=int(expect + 10 * math.sqrt(expect) + 100))
            pos = at + np.cumsum(steps)
            found.append(pos[pos < total])
            at = int(pos[-1])
        pos = np.concatenate(found)
    return _pairs_at(pos.astype(np.int64), n)


@TOPOLOGIES.register("random", "Erdos-Renyi G(n, p) (random:p=0.3,seed=1), Metropolis-Hastings weights")
def random_graph(n: int, arg: str | None) -> Topology:
    p, seed = parse_options(arg)
    if p is None:
        p = default_p(n)
    if n == 1:
        topo = Topology("random", 1, [csr_from_entries(1, [], [], [], [1.0])])
        topo.seed = seed
        return topo
    for s in range(seed, seed + MAX_DRAWS):
        r, c = symmetric_edges(*draw_edges(n, p, s), n)
        if count_components([sp.csr_array((np.ones(r.size), (r, c)), shape=(n, n))]) <= 1:
            topo = Topology("random", n, [mh_from_edges(r, c, n)])
            topo.p = p
            topo.seed = s  # the seed of the draw actually used
            return topo
    raise UserError(
        f"random: G(n={n}, p={p:g}) was disconnected in {MAX_DRAWS} draws (seeds {seed}..{seed + MAX_DRAWS - 1}); "
        f"use a larger p, e.g. p={min(1.0, max(2 * p, default_p(n))):.3g}"
    )
