"""grid: r x c grid without wraparound (2 to 4 neighbours per worker); Metropolis-Hastings weights
W_ij = 1/(1 + max(d_i, d_j)) on edges, the rest on the diagonal.

Default shape: the most square n = r x c with 2 <= r <= c; "grid:RxC" picks one.
Spectrum: the weights depend on both degrees, so W is no Kronecker sum of path spectra;
mixing_rate() computes it (dense up to 512 workers, ARPACK eigsh above).
"""

from topologies.base import TOPOLOGIES, Topology, factorisations, grid_shape
from topologies.torus import grid_mh


@TOPOLOGIES.register("grid", "2-D grid without wraparound (grid:RxC), Metropolis-Hastings weights")
def grid(n: int, arg: str | None) -> Topology:
    r, c = grid_shape("grid", n, arg)
    topo = Topology(f"grid:{r}x{c}", n, [grid_mh(r, c, wrap=False)])
    topo.shape = (r, c)
    return topo


def _supports(n: int) -> str | None:
    """Worker counts a 2-D grid can hold: n = r x c with r, c >= 2 (or the single worker)."""
    return None if n == 1 or factorisations(n) else "needs n = r x c with r, c >= 2"


grid.supports = _supports
