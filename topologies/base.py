"""Mixing matrices W(t) for decentralized SGD: the Topology type and its checks.

A topology of n workers is a (possibly periodic) sequence of n x n matrices.
One gossip step on worker parameters X (one row per worker) is X <- W(t) @ X:
row i holds the weights worker i gives to every x_j. Every W(t) of an undirected
family must be doubly stochastic, so that mixing keeps the average of the workers
exactly, and the union of the graphs over one period must be connected, so that the
workers reach consensus. A directed family (Topology(..., directed=True): worker j
pushes to the i with W_ij > 0) need only be column-stochastic, with a strongly
connected union over a period: push-sum (--algo sgp) de-biases it; rules that mix
plainly (gossip) still require row sums of 1 (get_topology(..., kind="doubly")).

Each family lives in its own module of this package and registers a factory
``factory(n, arg) -> Topology`` in TOPOLOGIES under its name; ``get_topology``
turns a spec such as "torus:4x8" into a validated Topology. A family that cannot
form every worker count says which it can: ``factory.supports(n)`` returns None or
the reason (``supports(family, n)`` reads it; families without one take any n).
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from bench.errors import UserError
from bench.registry import Registry

TOPOLOGIES: Registry = Registry("topology")

_NEG_TOL = -1e-12
_SUM_TOL = 1e-6
_ZERO_RATE = 1e-12


class Topology:
    """A periodic sequence of mixing matrices, W(t) == W(t % period)."""

    def __init__(self, name: str, n: int, mats: Sequence[np.ndarray], directed: bool = False):
        if len(mats) < 1:
            raise ValueError("a topology needs at least one matrix")
        self.name = name
        self.directed = directed
        self.n = int(n)
        self._mats = [np.array(m, dtype=np.float64) for m in mats]
        for m in self._mats:
            if m.shape != (self.n, self.n):
                raise ValueError(f"matrix of shape {m.shape} for n={self.n}")
        self.period = len(self._mats)
        self._nbrs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._props: dict | None = None

    def __repr__(self) -> str:
        return f"Topology({self.name!r}, n={self.n}, period={self.period})"

    def weights(self, t: int) -> np.ndarray:
        """W(t) as a float64 [n, n] array (a fresh copy)."""
        return self._mats[int(t) % self.period].copy()

    def neighbors(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Sparse gather form of W(t): (idx int64 [n, k], w float64 [n, k]).

        sum_s w[i, s] * x[idx[i, s]] == (W(t) @ x)[i]. Column 0 is the diagonal;
        short rows are padded with idx = i and w = 0.
        """
        k = int(t) % self.period
        if k not in self._nbrs:
            self._nbrs[k] = gather_form(self._mats[k])
        idx, w = self._nbrs[k]
        return idx.copy(), w.copy()

    def is_uniform(self, t: int) -> bool:
        """True when W(t) is exactly the all-1/n matrix (mixing is a plain mean)."""
        return bool(np.all(self._mats[int(t) % self.period] == 1.0 / self.n))

    def properties(self) -> dict:
        if self._props is None:
            self._props = self._compute_properties()
        return dict(self._props)

    def _compute_properties(self) -> dict:
        n = self.n
        max_degree = 0
        sends = 0
        for W in self._mats:
            off = off_diagonal_nonzeros(W)
            if n > 0:
                max_degree = max(max_degree, int(off.sum(axis=1).max()))
            sends += int(off.sum())
        lam = mixing_rate(self._mats)
        return {
            "name": self.name,
            "workers": n,
            "period": self.period,
            "lambda2": lam,
            "spectral_gap": 1.0 - lam,
            "max_degree": max_degree,
            "sends_per_step": sends / (n * self.period),
            "time_varying": self.period > 1,
        }


def off_diagonal_nonzeros(W: np.ndarray) -> np.ndarray:
    off = W != 0
    np.fill_diagonal(off, False)
    return off


def gather_form(W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = W.shape[0]
    off = off_diagonal_nonzeros(W)
    counts = off.sum(axis=1)
    k = 1 + (int(counts.max()) if n else 0)
    rows = np.arange(n, dtype=np.int64)
    idx = np.repeat(rows[:, None], k, axis=1)
    w = np.zeros((n, k), dtype=np.float64)
    w[:, 0] = np.diag(W)
    r, c = np.nonzero(off)  # row-major order: columns ascending within a row
    if r.size:
        starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
        slot = 1 + np.arange(r.size) - starts[r]
        idx[r, slot] = c
        w[r, slot] = W[r, c]
    return idx, w


def mixing_rate(mats: Sequence[np.ndarray]) -> float:
    """Per-step contraction of disagreement.

    Static: the largest eigenvalue modulus of W - J (J = ones/n). Periodic with
    period P: spectral radius of (W(P-1) ... W(0) - J) to the power 1/P.
    """
    n = mats[0].shape[0]
    if n <= 1:
        return 0.0
    M = mats[0]
    for W in mats[1:]:
        M = W @ M
    rho = float(np.max(np.abs(np.linalg.eigvals(M - 1.0 / n))))
    if rho < _ZERO_RATE:
        return 0.0
    lam = rho ** (1.0 / len(mats))
    return 0.0 if lam < _ZERO_RATE else float(lam)


def validate_matrix(W, n: int, what: str, rows: bool = True) -> np.ndarray:
    """Return W as float64 [n, n], or raise a one-line UserError saying what is wrong.

    rows=False: only the columns must sum to 1 (a directed graph for push-sum).
    """
    try:
        A = np.asarray(W, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise UserError(f"{what}: not a numeric matrix ({_one_line(e)})") from None
    if A.ndim != 2:
        raise UserError(f"{what}: must be a 2-D matrix; got shape {tuple(A.shape)}")
    if A.shape[0] != A.shape[1]:
        raise UserError(f"{what}: must be square; got {A.shape[0]}x{A.shape[1]}")
    if A.shape[0] != n:
        raise UserError(f"{what}: is {A.shape[0]}x{A.shape[1]} but there are n={n} workers (needs {n}x{n})")
    if not np.all(np.isfinite(A)):
        i, j = np.argwhere(~np.isfinite(A))[0]
        raise UserError(f"{what}: entry W[{i},{j}] = {A[i, j]} is not finite")
    if n and A.min() < _NEG_TOL:
        i, j = np.unravel_index(np.argmin(A), A.shape)
        raise UserError(f"{what}: entry W[{i},{j}] = {A[i, j]:.6g} is negative; weights must be >= 0")
    for axis, label in (((1, "row"),) if rows else ()) + ((0, "column"),):
        sums = A.sum(axis=axis)
        err = np.abs(sums - 1.0)
        if n and err.max() > _SUM_TOL:
            k = int(np.argmax(err))
            kind = "doubly stochastic" if rows else "column-stochastic"
            raise UserError(
                f"{what}: not {kind}: {label} {k} sums to {sums[k]:.9g} "
                f"(every {'row and column' if rows else 'column'} must sum to 1)"
            )
    return A


def is_row_stochastic(W: np.ndarray) -> bool:
    return bool(np.abs(np.asarray(W).sum(axis=1) - 1.0).max() <= _SUM_TOL) if len(W) else True


def count_components(Ws: Sequence[np.ndarray], strong: bool = False) -> int:
    """Connected components of the union graph of the off-diagonal nonzeros (weakly, or strongly)."""
    if len(Ws) == 0:
        return 0
    n = Ws[0].shape[0]
    if n <= 1:
        return n
    adj = np.zeros((n, n), dtype=bool)
    for W in Ws:
        adj |= np.asarray(W) != 0
    np.fill_diagonal(adj, False)
    k, _ = connected_components(csr_matrix(adj), directed=True, connection="strong" if strong else "weak")
    return int(k)


def is_connected(Ws: list[np.ndarray]) -> bool:
    """True when the union graph over Ws (undirected, off-diagonal nonzeros) is connected."""
    return count_components(Ws) <= 1


def adjacency(adj, n: int) -> np.ndarray:
    """A symmetric bool [n, n] adjacency matrix, no self loops, from a matrix or edge list."""
    if isinstance(adj, np.ndarray) and adj.ndim == 2:
        A = adj.astype(bool)
        if A.shape != (n, n):
            raise ValueError(f"adjacency of shape {A.shape} for n={n}")
    else:
        A = np.zeros((n, n), dtype=bool)
        edges = list(adj)
        if edges:
            e = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
            A[e[:, 0], e[:, 1]] = True
    A = A | A.T
    np.fill_diagonal(A, False)
    return A


def metropolis_hastings(adj, n: int) -> np.ndarray:
    """Metropolis-Hastings weights: W_ij = 1/(1 + max(d_i, d_j)) on edges, W_ii = 1 - sum_j W_ij.

    ``adj`` is a bool [n, n] adjacency matrix or an iterable of edges (i, j);
    edges are undirected and self loops are ignored. For a d-regular graph this
    is the uniform 1/(d + 1).
    """
    A = adjacency(adj, n)
    d = A.sum(axis=1)
    W = np.where(A, 1.0 / (1.0 + np.maximum(d[:, None], d[None, :])), 0.0)
    np.fill_diagonal(W, 0.0)
    np.fill_diagonal(W, 1.0 - W.sum(axis=1))
    return W


def uniform_circulant(offsets: Iterable[int], n: int) -> np.ndarray:
    """W_ij = 1/(|S| + 1) for (j - i) mod n in S (S symmetric, 0 not in S), W_ii likewise."""
    S = sorted({o % n for o in offsets} - {0})
    W = np.zeros((n, n))
    w = 1.0 / (len(S) + 1)
    rows = np.arange(n)
    W[rows, rows] = w
    for o in S:
        W[rows, (rows + o) % n] = w
    return W


def pairing_matrix(n: int, pairs: Iterable[tuple[int, int]]) -> np.ndarray:
    """Disjoint pairs average with weight 1/2 each; unpaired workers keep weight 1."""
    W = np.eye(n)
    seen: set[int] = set()
    for i, j in pairs:
        if i == j or i in seen or j in seen:
            raise ValueError(f"pairs are not disjoint at ({i}, {j})")
        seen.update((i, j))
        W[i, i] = W[j, j] = W[i, j] = W[j, i] = 0.5
    return W


def no_arg(family: str, arg: str | None) -> None:
    if arg is not None:
        raise UserError(f"topology {family!r} takes no argument; got '{family}:{arg}' (use '{family}')")


def factorisations(n: int) -> list[tuple[int, int]]:
    """All (r, c) with r * c == n and 2 <= r <= c."""
    return [(r, n // r) for r in range(2, math.isqrt(n) + 1) if n % r == 0]


def _factorable_hint(n: int) -> str:
    valid = [m for m in range(4, max(32, 2 * n) + 1) if factorisations(m)]
    if n <= 32:
        shown = [m for m in valid if m <= 32]
        return "{" + ", ".join(map(str, shown)) + ", ...}"
    below = [m for m in valid if m < n][-3:]
    above = [m for m in valid if m > n][:3]
    return "{..., " + ", ".join(map(str, below + above)) + ", ...}"


def grid_shape(family: str, n: int, arg: str | None) -> tuple[int, int]:
    """Shape (r, c) of a 2-D grid of n workers: from arg "RxC", else the most square one."""
    if arg is not None:
        parts = arg.lower().replace("*", "x").split("x")
        try:
            r, c = (int(p) for p in parts)
        except ValueError:
            raise UserError(f"{family} argument must look like RxC (e.g. {family}:4x8); got {arg!r}") from None
        if r * c != n:
            raise UserError(f"{family}:{arg} has {r * c} workers but n={n}; use a shape with r x c = {n}")
        if n > 1 and (r < 2 or c < 2):
            raise UserError(f"{family}:{arg}: both sides must be >= 2 (use 'ring' for a 1-D cycle)")
        return r, c
    if n == 1:
        return 1, 1
    shapes = factorisations(n)
    if not shapes:
        raise UserError(
            f"{family} needs n = r x c with r, c >= 2; n={n} does not factor; try n in {_factorable_hint(n)}"
        )
    return shapes[-1]


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def parse_spec(spec: str) -> tuple[str, str | None]:
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"topology spec must be a name such as 'ring' or 'torus:4x8'; got {spec!r}")
    name, sep, arg = spec.strip().partition(":")
    name = name.strip()
    arg = arg.strip() if sep else None
    return name, (arg or None)


def supports(family, n: int) -> str | None:
    """None if the family can form a graph of n workers, else why not (a family's optional `supports`)."""
    check = getattr(family, "supports", None)
    return check(n) if check is not None else None


def get_topology(spec: str, n: int, kind: str = "doubly") -> Topology:
    """Build and validate the topology named by ``spec`` ("name" or "name:arg") for n workers.

    kind: what the rule that mixes over it needs: "doubly" (every W(t) doubly stochastic) or
    "column" (column-stochastic is enough: push-sum).
    """
    name, arg = parse_spec(spec)
    factory = TOPOLOGIES.get(name)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise UserError(f"topology {spec!r} needs a number of workers n >= 1; got n={n!r}")
    n = int(n)
    topo = factory(n, arg)
    topo.name = spec.strip()
    mats = [topo._mats[t] for t in range(topo.period)]
    for t, W in enumerate(mats):
        what = f"topology {topo.name!r} (n={n}) W({t})" if topo.period > 1 else f"topology {topo.name!r} (n={n})"
        validate_matrix(W, n, what, rows=not topo.directed)
        if kind == "doubly" and topo.directed and not is_row_stochastic(W):
            raise UserError(f"{what} is a directed graph whose rows do not sum to 1: mixing plainly over it would not "
                            f"reach the average; use push-sum (--algo sgp) or an undirected topology")
    k = count_components(mats, strong=topo.directed)
    if k > 1:
        over = " over one period" if topo.period > 1 else ""
        how = "not strongly connected" if topo.directed else "disconnected"
        raise UserError(f"topology {topo.name!r} is {how} for n={n}: its graph{over} has {k} components")
    return topo
