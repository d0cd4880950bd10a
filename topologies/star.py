"""star: worker 0 is the hub linked to every other worker; Metropolis-Hastings weights:
hub-leaf 1/n, leaf self 1 - 1/n, hub self 1/n.

Spectrum (closed form): W = I - L / n with L the Laplacian of the star K_{1,n-1}, whose eigenvalues
are 0, 1 (n - 2 times) and n; so W has 1 (consensus), 1 - 1/n (n - 2 times) and 0:
rate = 1 - 1/n for n >= 3, 0 for n <= 2 (n = 2: W = J).
"""

import numpy as np

from topologies.base import TOPOLOGIES, Topology, mh_from_edges, no_arg, symmetric_edges


def star_rate(n: int) -> float:
    return 1.0 - 1.0 / n if n >= 3 else 0.0


def _rate(topo: Topology) -> float:
    return star_rate(topo.n)


@TOPOLOGIES.register("star", "hub worker 0 linked to all others, Metropolis-Hastings weights")
def star(n: int, arg: str | None) -> Topology:
    no_arg("star", arg)
    leaves = np.arange(1, n, dtype=np.int64)
    r, c = symmetric_edges(np.zeros_like(leaves), leaves, n)
    return Topology("star", n, [mh_from_edges(r, c, n)], rate=_rate)
