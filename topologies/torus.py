"""torus: r x c grid with wraparound (each worker has up to 4 distinct neighbours);
Metropolis-Hastings weights, i.e. uniform 1/5 when r, c >= 3.

Default shape: the most square n = r x c with 2 <= r <= c; "torus:RxC" picks one.

Spectrum (closed form): the torus is regular of degree d = d_r + d_c (d_m = 2 for a cycle of
m >= 3, 1 for m = 2, 0 for m = 1), so its Metropolis-Hastings weights are the uniform 1/(d + 1) and

    W = (I + A_r (x) I + I (x) A_c) / (d + 1)

with A_m the adjacency of the cycle C_m (eigenvalues 2 cos(2 pi a / m)), of K_2 for m = 2 (+-1),
0 for m = 1. A Kronecker sum: the eigenvalues are (1 + alpha_a + beta_b) / (d + 1);
(a, b) = (0, 0) is the consensus mode, rate = the largest modulus over the others. O(n).
"""

import numpy as np

from topologies.base import (TOPOLOGIES, Topology, factorisations, grid_shape, mh_from_edges, rate_from_rho,
                             symmetric_edges)


def grid_edges(r: int, c: int, wrap: bool) -> np.ndarray:
    """Edges [m, 2] of an r x c grid of workers numbered row-major, optionally with wraparound."""
    i, j = np.divmod(np.arange(r * c, dtype=np.int64), c)
    k = i * c + j
    down = (i + 1 < r) | (wrap and r > 1)
    right = (j + 1 < c) | (wrap and c > 1)
    e_down = np.stack((k[down], ((i[down] + 1) % r) * c + j[down]), axis=1)
    e_right = np.stack((k[right], i[right] * c + (j[right] + 1) % c), axis=1)
    return np.concatenate((e_down, e_right)).reshape(-1, 2)


def grid_mh(r: int, c: int, wrap: bool):
    """Metropolis-Hastings weights (CSR) of the r x c grid."""
    e = grid_edges(r, c, wrap)
    rows, cols = symmetric_edges(e[:, 0], e[:, 1], r * c)
    return mh_from_edges(rows, cols, r * c)


def _cycle_spectrum(m: int) -> np.ndarray:
    """Eigenvalues of the adjacency of the wraparound path of m workers (mode a = 0 first)."""
    if m == 1:
        return np.zeros(1)
    if m == 2:
        return np.array([1.0, -1.0])
    return 2.0 * np.cos(2.0 * np.pi * np.arange(m) / m)


def torus_rate(r: int, c: int) -> float:
    """Closed-form mixing rate of the r x c torus (see the module doc)."""
    if r * c <= 1:
        return 0.0
    d = sum(min(m - 1, 2) for m in (r, c))
    lam = (1.0 + _cycle_spectrum(r)[:, None] + _cycle_spectrum(c)[None, :]) / (d + 1)
    lam[0, 0] = 0.0  # the consensus mode
    return rate_from_rho(np.max(np.abs(lam)), 1)


def _rate(topo: Topology) -> float:
    return torus_rate(*topo.shape)


@TOPOLOGIES.register("torus", "2-D wraparound grid (torus:RxC), Metropolis-Hastings weights")
def torus(n: int, arg: str | None) -> Topology:
    r, c = grid_shape("torus", n, arg)
    topo = Topology(f"torus:{r}x{c}", n, [grid_mh(r, c, wrap=True)], rate=_rate)
    topo.shape = (r, c)
    return topo


def _supports(n: int) -> str | None:
    """Worker counts a 2-D torus can hold: n = r x c with r, c >= 2 (or the single worker)."""
    return None if n == 1 or factorisations(n) else "needs n = r x c with r, c >= 2"


torus.supports = _supports
