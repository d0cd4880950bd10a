"""grid: r x c grid without wraparound (2 to 4 neighbours per worker); Metropolis-Hastings weights
W_ij = 1/(1 + max(d_i, d_j)) on edges, the rest on the diagonal.

Default shape: the most square n = r x c with 2 <= r <= c; "grid:RxC" picks one.
"""

from topologies.base import TOPOLOGIES, Topology, factorisations, grid_shape, metropolis_hastings
from topologies.torus import grid_edges


@TOPOLOGIES.register("grid", "2-D grid without wraparound (grid:RxC), Metropolis-Hastings weights")
def grid(n: int, arg: str | None) -> Topology:
    r, c = grid_shape("grid", n, arg)
    W = metropolis_hastings(grid_edges(r, c, wrap=False), n)
    topo = Topology(f"grid:{r}x{c}", n, [W])
    topo.shape = (r, c)
    return topo


def _supports(n: int) -> str | None:
    """Worker counts a 2-D grid can hold: n = r x c with r, c >= 2 (or the single worker)."""
    return None if n == 1 or factorisations(n) else "needs n = r x c with r, c >= 2"


grid.supports = _supports
