"""torus: r x c grid with wraparound (each worker has up to 4 distinct neighbours);
Metropolis-Hastings weights, i.e. uniform 1/5 when r, c >= 3.

Default shape: the most square n = r x c with 2 <= r <= c; "torus:RxC" picks one.
"""

from topologies.base import TOPOLOGIES, Topology, factorisations, grid_shape, metropolis_hastings


def grid_edges(r: int, c: int, wrap: bool) -> list[tuple[int, int]]:
    """Edges of an r x c grid of workers numbered row-major, optionally with wraparound."""
    edges = []
    for i in range(r):
        for j in range(c):
            k = i * c + j
            if i + 1 < r or (wrap and r > 1):
                edges.append((k, ((i + 1) % r) * c + j))
            if j + 1 < c or (wrap and c > 1):
                edges.append((k, i * c + (j + 1) % c))
    return edges


@TOPOLOGIES.register("torus", "2-D wraparound grid (torus:RxC), Metropolis-Hastings weights")
def torus(n: int, arg: str | None) -> Topology:
    r, c = grid_shape("torus", n, arg)
    W = metropolis_hastings(grid_edges(r, c, wrap=True), n)
    topo = Topology(f"torus:{r}x{c}", n, [W])
    topo.shape = (r, c)
    return topo


def _supports(n: int) -> str | None:
    """Worker counts a 2-D torus can hold: n = r x c with r, c >= 2 (or the single worker)."""
    return None if n == 1 or factorisations(n) else "needs n = r x c with r, c >= 2"


torus.supports = _supports
