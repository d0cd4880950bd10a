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

Representation and cost. A Topology holds one scipy.sparse CSR array per step of its
period (``sparse(t)``), never a dense n x n array, so that building, validating and
characterising a topology costs O(n * degree) memory and time (a ring of 65536 workers
answers in well under a second). The CSR arrays are canonical: float64, sorted column
indices, no duplicates, every diagonal entry stored (even a zero), no stored off-diagonal
zero; their off-diagonal entries are exactly the nonzeros of W(t). ``weights(t)`` still
returns the dense W(t), built on request: O(n^2) memory, for tests and n up to a few
thousand. The complete graph (CompleteTopology) holds no matrix at all: it is marked
uniform, so mixers take the plain mean and never ask for its n-wide gather form.

Each family lives in its own module of this package and registers a factory
``factory(n, arg) -> Topology`` in TOPOLOGIES under its name; ``get_topology``
turns a spec such as "torus:4x8" into a validated Topology. A family that cannot
form every worker count says which it can: ``factory.supports(n)`` returns None or
the reason (``supports(family, n)`` reads it; families without one take any n).
A family whose spectrum has a closed form passes it as ``rate`` (see Topology);
the others get mixing_rate(): a dense eigenvalue solve up to DENSE_EIG_MAX workers,
else ARPACK (scipy.sparse.linalg eigsh / eigs) on a LinearOperator.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigs, eigsh, splu

from bench.errors import UserError
from bench.registry import Registry

TOPOLOGIES: Registry = Registry("topology")

_NEG_TOL = -1e-12
_SUM_TOL = 1e-6
_ZERO_RATE = 1e-12
DENSE_EIG_MAX = 512  # mixing_rate: numpy.linalg.eigvals of the dense product up to this n, ARPACK above
COMPLETE_MAX = 4096  # the complete graph materialises W (sparse/weights/neighbors) only up to this n


# ---------------------------------------------------------------------------------------------
# canonical CSR arrays


def csr_from_entries(n: int, rows, cols, vals, diag) -> sp.csr_array:
    """The canonical n x n CSR array with off-diagonal entries (rows, cols, vals) and diagonal ``diag``.

    Entries on the diagonal or equal to 0 among (rows, cols, vals) are dropped; every diagonal
    entry is stored (diag[i], even 0); column indices come out sorted. Duplicates are an error.
    """
    rows = np.asarray(rows, dtype=np.int64).ravel()
    cols = np.asarray(cols, dtype=np.int64).ravel()
    vals = np.asarray(vals, dtype=np.float64).ravel()
    diag = np.broadcast_to(np.asarray(diag, dtype=np.float64), (n,))
    keep = (rows != cols) & (vals != 0)
    ar = np.arange(n, dtype=np.int64)
    r = np.concatenate((rows[keep], ar))
    c = np.concatenate((cols[keep], ar))
    v = np.concatenate((vals[keep], diag))
    key = r * n + c
    order = np.argsort(key, kind="stable")
    key, c, v = key[order], c[order], v[order]
    if key.size > 1 and np.any(key[1:] == key[:-1]):
        raise ValueError("duplicate entries in a mixing matrix")
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(r, minlength=n), out=indptr[1:])
    A = sp.csr_array((v, c, indptr), shape=(n, n))
    A.has_sorted_indices = True
    return A


def to_csr(W, n: Optional[int] = None) -> sp.csr_array:
    """W (a dense array-like or any scipy.sparse matrix) as a canonical float64 CSR array (see the module doc)."""
    if sp.issparse(W):
        A = sp.csr_array(W, dtype=np.float64, copy=True)
        A.sum_duplicates()
        if A.shape[0] != A.shape[1] or (n is not None and A.shape[0] != n):
            raise ValueError(f"matrix of shape {A.shape} for n={n if n is not None else A.shape[0]}")
        m = A.shape[0]
        coo = A.tocoo()
        return csr_from_entries(m, coo.row, coo.col, coo.data, A.diagonal())
    D = np.asarray(W, dtype=np.float64)
    if D.ndim != 2 or D.shape[0] != D.shape[1] or (n is not None and D.shape[0] != n):
        raise ValueError(f"matrix of shape {D.shape} for n={n if n is not None else D.shape[0]}")
    off = D != 0
    np.fill_diagonal(off, False)
    r, c = np.nonzero(off)
    return csr_from_entries(D.shape[0], r, c, D[r, c], np.diag(D).copy())


def _canonical(W) -> sp.csr_array:
    """W itself when it is a canonical CSR array built here, else to_csr(W)."""
    return W if getattr(W, "_canonical_topology_csr", False) else to_csr(W)


def _mark(A: sp.csr_array) -> sp.csr_array:
    A._canonical_topology_csr = True
    return A


def _rows_of(A: sp.csr_array) -> np.ndarray:
    return np.repeat(np.arange(A.shape[0], dtype=np.int64), np.diff(A.indptr))


def _off_counts(A: sp.csr_array) -> np.ndarray:
    """Off-diagonal nonzeros per row of a canonical CSR array (the diagonal is always stored)."""
    return np.diff(A.indptr).astype(np.int64) - 1


# ---------------------------------------------------------------------------------------------
# the Topology


class Topology:
    """A periodic sequence of mixing matrices, W(t) == W(t % period), one canonical CSR array per step.

    ``mats``: dense arrays or scipy.sparse matrices, n x n each. ``rate``: optional closed form of
    the per-step contraction (the "lambda2" of properties()), a callable rate(topology) -> float with
    the meaning of mixing_rate(); without one, mixing_rate() computes it.
    """

    uniform = False  # every W(t) is exactly the all-1/n matrix (CompleteTopology)

    def __init__(self, name: str, n: int, mats: Sequence, directed: bool = False,
                 rate: Optional[Callable[["Topology"], float]] = None):
        if len(mats) < 1:
            raise ValueError("a topology needs at least one matrix")
        self.name = name
        self.directed = directed
        self.n = int(n)
        self._csr = []
        for m in mats:
            shape = m.shape if sp.issparse(m) else np.shape(m)
            if tuple(shape) != (self.n, self.n):
                raise ValueError(f"matrix of shape {tuple(shape)} for n={self.n}")
            self._csr.append(_mark(to_csr(m, self.n)))
        self.period = len(self._csr)
        self._rate = rate
        self._nbrs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._uniform: dict[int, bool] = {}
        self._props: dict | None = None

    def __repr__(self) -> str:
        return f"Topology({self.name!r}, n={self.n}, period={self.period})"

    def sparse(self, t: int) -> sp.csr_array:
        """W(t) as a canonical float64 CSR array (a fresh copy): O(n * degree)."""
        return self._csr[int(t) % self.period].copy()

    def weights(self, t: int) -> np.ndarray:
        """W(t) as a dense float64 [n, n] array (a fresh copy).

        O(n^2) memory and time: for tests and n up to a few thousand; use sparse(t) or neighbors(t).
        """
        return self._csr[int(t) % self.period].toarray()

    def neighbors(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Sparse gather form of W(t): (idx int64 [n, k], w float64 [n, k]).

        sum_s w[i, s] * x[idx[i, s]] == (W(t) @ x)[i]. Column 0 is the diagonal, then the
        off-diagonal nonzeros of row i by ascending column; short rows are padded with
        idx = i and w = 0. k = 1 + the largest number of off-diagonal nonzeros in a row.
        """
        k = int(t) % self.period
        if k not in self._nbrs:
            self._nbrs[k] = gather_form(self._csr[k])
        idx, w = self._nbrs[k]
        return idx.copy(), w.copy()

    def is_uniform(self, t: int) -> bool:
        """True when W(t) is exactly the all-1/n matrix (mixing is a plain mean)."""
        k = int(t) % self.period
        if k not in self._uniform:
            A, n = self._csr[k], self.n
            self._uniform[k] = bool(A.nnz == n * n and np.all(A.data == 1.0 / n))
        return self._uniform[k]

    def sends(self, t: int) -> int:
        """Messages of W(t): its off-diagonal nonzeros (one per ordered pair that talks)."""
        return int(_off_counts(self._csr[int(t) % self.period]).sum())

    def properties(self) -> dict:
        if self._props is None:
            self._props = self._compute_properties()
        return dict(self._props)

    def _degrees(self) -> tuple[int, int]:
        """(max_degree, sends over one period)."""
        max_degree, sends = 0, 0
        for A in self._csr:
            off = _off_counts(A)
            if self.n > 0:
                max_degree = max(max_degree, int(off.max()))
            sends += int(off.sum())
        return max_degree, sends

    def mixing_rate(self) -> float:
        """Per-step contraction of disagreement (see mixing_rate()): the closed form when there is one."""
        if self._rate is not None:
            return float(self._rate(self))
        return mixing_rate(self._csr)

    def _compute_properties(self) -> dict:
        n = self.n
        max_degree, sends = self._degrees()
        lam = self.mixing_rate()
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


class CompleteTopology(Topology):
    """W = J = ones / n at every step, held implicitly: O(1) memory, uniform (mixing is the plain mean).

    sparse(t), weights(t) and neighbors(t) materialise the n^2 entries: allowed up to COMPLETE_MAX
    workers, a UserError above (a dense 1/n matrix of 65536 workers is 34 GB).
    """

    uniform = True

    def __init__(self, name: str, n: int):
        self.name = name
        self.directed = False
        self.n = int(n)
        self.period = 1
        self._rate = None
        self._nbrs = {}
        self._uniform = {}
        self._props = None

    def __repr__(self) -> str:
        return f"CompleteTopology({self.name!r}, n={self.n})"

    def _check_size(self, what: str) -> None:
        if self.n > COMPLETE_MAX:
            raise UserError(f"complete graph of n={self.n} workers: its {what} would hold n^2 = {self.n ** 2} "
                            f"entries (allowed up to n={COMPLETE_MAX}); it mixes as the plain mean (is_uniform)")

    @property
    def _csr(self):
        self._check_size("matrix")
        n = self.n
        rows = np.repeat(np.arange(n, dtype=np.int64), n)
        cols = np.tile(np.arange(n, dtype=np.int64), n)
        return [_mark(csr_from_entries(n, rows, cols, np.full(n * n, 1.0 / n), np.full(n, 1.0 / n)))]

    def sparse(self, t: int) -> sp.csr_array:
        return self._csr[0]

    def weights(self, t: int) -> np.ndarray:
        self._check_size("dense matrix")
        return np.full((self.n, self.n), 1.0 / self.n)

    def neighbors(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        self._check_size("gather form")
        if 0 not in self._nbrs:
            n = self.n
            full = np.broadcast_to(np.arange(n, dtype=np.int64), (n, n))
            off = full[~np.eye(n, dtype=bool)].reshape(n, n - 1)
            idx = np.concatenate((np.arange(n, dtype=np.int64)[:, None], off), axis=1)
            self._nbrs[0] = (idx, np.full((n, n), 1.0 / n))
        idx, w = self._nbrs[0]
        return idx.copy(), w.copy()

    def is_uniform(self, t: int) -> bool:
        return True

    def sends(self, t: int) -> int:
        return self.n * (self.n - 1)

    def _degrees(self) -> tuple[int, int]:
        return self.n - 1, self.n * (self.n - 1)

    def mixing_rate(self) -> float:
        return 0.0


# ---------------------------------------------------------------------------------------------
# gather form, degrees


def off_diagonal_nonzeros(W):
    """The off-diagonal nonzeros of W as a bool mask: dense for a dense W, a sparse array for a sparse one."""
    if sp.issparse(W):
        A = _canonical(W)
        off = A.copy()
        off.data = (_rows_of(A) != A.indices) & (A.data != 0)
        off = sp.csr_array(off, dtype=bool)
        off.eliminate_zeros()
        return off
    off = np.asarray(W) != 0
    np.fill_diagonal(off, False)
    return off


def gather_form(W) -> tuple[np.ndarray, np.ndarray]:
    """(idx int64 [n, k], w float64 [n, k]) of W (dense or sparse): see Topology.neighbors. O(n * k)."""
    A = _canonical(W)
    n = A.shape[0]
    counts = _off_counts(A)
    k = 1 + (int(counts.max()) if n else 0)
    rows = np.arange(n, dtype=np.int64)
    idx = np.repeat(rows[:, None], k, axis=1)
    w = np.zeros((n, k), dtype=np.float64)
    r = _rows_of(A)
    cols = A.indices.astype(np.int64)
    on = cols == r
    w[:, 0] = A.data[on]  # one stored diagonal entry per row, rows in order
    off = ~on
    r, c, v = r[off], cols[off], A.data[off]  # row-major order: columns ascending within a row
    if r.size:
        starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
        slot = 1 + np.arange(r.size) - starts[r]
        idx[r, slot] = c
        w[r, slot] = v
    return idx, w


# ---------------------------------------------------------------------------------------------
# spectra


def rate_from_rho(rho: float, period: int) -> float:
    """The per-step rate rho ** (1 / period), with the zero thresholds of mixing_rate()."""
    rho = float(rho)
    if rho < _ZERO_RATE:
        return 0.0
    lam = rho ** (1.0 / period)
    return 0.0 if lam < _ZERO_RATE else float(lam)


def mixing_rate(mats: Sequence, dense_max: int = DENSE_EIG_MAX) -> float:
    """Per-step contraction of disagreement.

    Static: the largest eigenvalue modulus of W - J (J = ones/n). Periodic with
    period P: spectral radius of (W(P-1) ... W(0) - J) to the power 1/P.
    n <= dense_max: numpy.linalg.eigvals of the dense product (O(n^3)); above, ARPACK on a
    LinearOperator that applies the sparse factors in turn and subtracts J x = mean(x) (J stays
    implicit): eigsh for one symmetric W, eigs otherwise. O(nnz) per product.
    """
    n = mats[0].shape[0]
    if n <= 1:
        return 0.0
    if n <= dense_max:
        dense = [W.toarray() if sp.issparse(W) else np.asarray(W, dtype=np.float64) for W in mats]
        M = dense[0]
        for W in dense[1:]:
            M = W @ M
        rho = float(np.max(np.abs(np.linalg.eigvals(M - 1.0 / n))))
    else:
        rho = sparse_spectral_radius([_canonical(W) for W in mats])
    return rate_from_rho(rho, len(mats))


def _is_symmetric(A: sp.csr_array) -> bool:
    D = (A - A.T).tocsr()
    return bool(D.nnz == 0 or np.all(D.data == 0))


def _product_minus_j(mats: Sequence[sp.csr_array]) -> LinearOperator:
    """x -> W(P-1) ... W(0) x - J x, J x = mean(x) (J never formed)."""
    n = mats[0].shape[0]

    def matvec(x):
        x = np.asarray(x, dtype=np.float64).ravel()
        y = x
        for A in mats:
            y = A @ y
        return y - x.mean()

    return LinearOperator((n, n), matvec=matvec, dtype=np.float64)


def _start(n: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal(n)  # a fixed start vector: the same answer every time


QUICK_RESTARTS = 20  # ARPACK restarts (about 36 products each) before a symmetric W is solved by shift-invert


def sparse_spectral_radius(mats: Sequence[sp.csr_array]) -> float:
    """Spectral radius of W(P-1) ... W(0) - J by ARPACK, never forming the product or J.

    One symmetric W: eigsh (Lanczos) on W - J for the largest |lambda|; when the top of the spectrum
    is too clustered for it to converge within QUICK_RESTARTS restarts (large grids, long paths:
    lambda_2 within ~1e-4 of 1), shift-invert instead (symmetric_radius_shift_invert). Otherwise
    (directed, periodic): eigs (implicitly restarted Arnoldi) on the product minus J.
    """
    n = mats[0].shape[0]
    ops = [sp.csr_array(A) for A in mats]
    op = _product_minus_j(ops)
    symmetric = len(ops) == 1 and _is_symmetric(ops[0])
    k = min(4, n - 2) if symmetric else min(6, n - 2)
    ncv = min(n, max(2 * k + 1, 40))
    if symmetric:
        try:
            vals = eigsh(op, k=k, which="LM", v0=_start(n), ncv=ncv, maxiter=QUICK_RESTARTS,
                         return_eigenvectors=False)
            return float(np.max(np.abs(vals)))
        except ArpackNoConvergence:
            pass
        try:
            return symmetric_radius_shift_invert(ops[0])
        except (RuntimeError, MemoryError):  # a singular or too large factorisation: Lanczos, however long
            solver = eigsh
    else:
        solver = eigs
    try:
        vals = solver(op, k=k, which="LM", v0=_start(n), ncv=ncv, maxiter=max(1000, 20 * n),
                      return_eigenvectors=False)
    except ArpackNoConvergence as e:  # the converged ones are the largest found: better than nothing
        if len(e.eigenvalues) == 0:
            raise
        vals = e.eigenvalues
    return float(np.max(np.abs(vals)))


_SHIFT = 1e-6


def _nearest(A: sp.csr_array, sigma: float, k: int) -> np.ndarray:
    """The k eigenvalues of the symmetric A nearest sigma: Lanczos on (A - sigma I)^-1 (sparse LU)."""
    n = A.shape[0]
    lu = splu(sp.csc_array(A - sigma * sp.identity(n, format="csr")))
    op = LinearOperator((n, n), matvec=lambda x: lu.solve(np.asarray(x, dtype=np.float64).ravel()),
                        dtype=np.float64)
    mu = eigsh(op, k=k, which="LM", v0=_start(n), ncv=min(n, 20), return_eigenvectors=False)
    return sigma + 1.0 / mu


def _positive_definite(A: sp.csr_array) -> bool:
    """Whether the symmetric A is positive definite: the signs of the pivots of a symmetric LU without
    pivoting (A = L D L^T after a symmetric fill-reducing permutation; Sylvester's law of inertia)."""
    try:
        lu = splu(sp.csc_array(A), permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0,
                  options=dict(SymmetricMode=True))
    except RuntimeError:  # exactly singular
        return False
    if not np.array_equal(lu.perm_r, lu.perm_c):
        return False  # not a symmetric factorisation: no conclusion, take the safe way
    return bool(np.all(lu.U.diagonal() > 0))


def symmetric_radius_shift_invert(W: sp.csr_array) -> float:
    """max |lambda| of W - J for a symmetric stochastic W (eigenvalues in [-1, 1], 1 the consensus).

    lambda_2: the two eigenvalues of W nearest 1 + 1e-6 (shift-invert: a clustered top is well
    separated after inversion) are 1 (consensus) and lambda_2. If W + lambda_2 I is positive definite
    (every eigenvalue above -lambda_2) the answer is lambda_2; else the bottom eigenvalue, nearest
    -1 - 1e-6, decides.
    """
    n = W.shape[0]
    lam2 = float(np.min(_nearest(W, 1.0 + _SHIFT, 2)))
    if lam2 >= 0 and _positive_definite(W + lam2 * sp.identity(n, format="csr")):
        return abs(lam2)
    lam_min = float(_nearest(W, -1.0 - _SHIFT, 1)[0])
    return max(abs(lam2), abs(lam_min))


# ---------------------------------------------------------------------------------------------
# validation and connectivity


def validate_matrix(W, n: int, what: str, rows: bool = True):
    """Return W as float64 [n, n], or raise a one-line UserError saying what is wrong.

    rows=False: only the columns must sum to 1 (a directed graph for push-sum). A scipy.sparse W is
    checked in O(nnz) and returned as a canonical CSR array; anything else is returned dense.
    """
    if sp.issparse(W):
        return _validate_sparse(W, n, what, rows)
    try:
        A = np.asarray(W, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise UserError(f"{what}: not a numeric matrix ({_one_line(e)})") from None
    _check_shape(A.shape, n, what)
    if not np.all(np.isfinite(A)):
        i, j = np.argwhere(~np.isfinite(A))[0]
        raise UserError(f"{what}: entry W[{i},{j}] = {A[i, j]} is not finite")
    if n and A.min() < _NEG_TOL:
        i, j = np.unravel_index(np.argmin(A), A.shape)
        raise UserError(f"{what}: entry W[{i},{j}] = {A[i, j]:.6g} is negative; weights must be >= 0")
    _check_sums(A.sum(axis=1), A.sum(axis=0), n, what, rows)
    return A


def _check_shape(shape, n: int, what: str) -> None:
    if len(shape) != 2:
        raise UserError(f"{what}: must be a 2-D matrix; got shape {tuple(shape)}")
    if shape[0] != shape[1]:
        raise UserError(f"{what}: must be square; got {shape[0]}x{shape[1]}")
    if shape[0] != n:
        raise UserError(f"{what}: is {shape[0]}x{shape[1]} but there are n={n} workers (needs {n}x{n})")


def _check_sums(row_sums, col_sums, n: int, what: str, rows: bool) -> None:
    for sums, label in (((row_sums, "row"),) if rows else ()) + ((col_sums, "column"),):
        err = np.abs(sums - 1.0)
        if n and err.max() > _SUM_TOL:
            k = int(np.argmax(err))
            kind = "doubly stochastic" if rows else "column-stochastic"
            raise UserError(
                f"{what}: not {kind}: {label} {k} sums to {sums[k]:.9g} "
                f"(every {'row and column' if rows else 'column'} must sum to 1)"
            )


def _validate_sparse(W, n: int, what: str, rows: bool) -> sp.csr_array:
    _check_shape(W.shape, n, what)
    try:
        A = _canonical(W)
    except (TypeError, ValueError) as e:
        raise UserError(f"{what}: not a numeric matrix ({_one_line(e)})") from None
    r, c, v = _rows_of(A), A.indices, A.data  # stored entries in row-major order, like argwhere/argmin
    bad = ~np.isfinite(v)
    if bad.any():
        k = int(np.argmax(bad))
        raise UserError(f"{what}: entry W[{r[k]},{c[k]}] = {v[k]} is not finite")
    if n and v.size and v.min() < _NEG_TOL:
        k = int(np.argmin(v))
        raise UserError(f"{what}: entry W[{r[k]},{c[k]}] = {v[k]:.6g} is negative; weights must be >= 0")
    row_sums = np.bincount(r, weights=v, minlength=n)
    col_sums = np.bincount(c, weights=v, minlength=n)
    _check_sums(row_sums, col_sums, n, what, rows)
    return A


def is_row_stochastic(W) -> bool:
    """Every row of W (dense or sparse) sums to 1 within the validation tolerance."""
    if sp.issparse(W):
        if W.shape[0] == 0:
            return True
        sums = np.asarray(W.sum(axis=1)).ravel()
        return bool(np.abs(sums - 1.0).max() <= _SUM_TOL)
    return bool(np.abs(np.asarray(W).sum(axis=1) - 1.0).max() <= _SUM_TOL) if len(W) else True


def nonzero_entries(W) -> tuple[np.ndarray, np.ndarray]:
    """(rows, columns) as int64 of the nonzero entries of W, dense or sparse (never densified)."""
    if sp.issparse(W):
        coo = sp.coo_array(W)
        keep = coo.data != 0
        return coo.row[keep].astype(np.int64), coo.col[keep].astype(np.int64)
    r, c = np.nonzero(np.asarray(W) != 0)
    return r.astype(np.int64), c.astype(np.int64)


def _union_graph(Ws: Sequence, n: int) -> sp.csr_array:
    """The union over Ws (dense or sparse) of the off-diagonal nonzeros, as a CSR array of ones."""
    rs, cs = [], []
    for W in Ws:
        r, c = nonzero_entries(W)
        off = r != c
        rs.append(r[off])
        cs.append(c[off])
    r, c = np.concatenate(rs), np.concatenate(cs)
    return sp.csr_array((np.ones(r.size, dtype=np.int8), (r, c)), shape=(n, n))


def count_components(Ws: Sequence, strong: bool = False) -> int:
    """Connected components of the union graph of the off-diagonal nonzeros (weakly, or strongly). O(nnz)."""
    if len(Ws) == 0:
        return 0
    n = Ws[0].shape[0]
    if n <= 1:
        return n
    k, _ = connected_components(_union_graph(Ws, n), directed=True, connection="strong" if strong else "weak")
    return int(k)


def is_connected(Ws: list) -> bool:
    """True when the union graph over Ws (undirected, off-diagonal nonzeros) is connected."""
    return count_components(Ws) <= 1


# ---------------------------------------------------------------------------------------------
# building blocks of the families


@functools.lru_cache(maxsize=64)
def _pairwise_tree(n: int):
    """numpy's pairwise summation of n float64 (PW_BLOCKSIZE 128, unroll 8) as a tree: its leaves
    (start, length) left to right, their node ids, and every node's parent and depth."""
    starts, lens, leaf_node, parent, depth = [], [], [], [], []

    def visit(s: int, length: int, par: int, dep: int) -> None:
        node = len(parent)
        parent.append(par)
        depth.append(dep)
        if length <= 128:
            starts.append(s)
            lens.append(length)
            leaf_node.append(node)
            return
        n2 = length // 2
        n2 -= n2 % 8
        visit(s, n2, node, dep + 1)
        visit(s + n2, length - n2, node, dep + 1)

    visit(0, n, -1, 0)
    as64 = functools.partial(np.asarray, dtype=np.int64)
    return as64(starts), as64(lens), as64(leaf_node), as64(parent), as64(depth)


def numpy_row_sums(indptr, indices, data, n: int) -> np.ndarray:
    """Exactly what D.sum(axis=1) gives for the dense C-ordered float64 [rows, n] array D holding these
    CSR entries (sorted columns, no duplicates) and zeros elsewhere, in O(nnz log n).

    numpy adds a row as 0.0 + pairwise_sum(row): blocks of at most 128 elements split in halves
    (multiples of 8) above that; within a block of 8 or more, eight accumulators r[j] take
    a[j], a[j+8], ... in turn and are combined as ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7)),
    then the elements past the last multiple of 8 are added in order; a block of fewer than 8 is
    added in order. Adding a zero is exact, so the same tree over the nonzeros alone gives the same
    bits (tests/test_topologies.py checks this against numpy). Metropolis-Hastings weights use it
    for their diagonal, 1 - sum_j W_ij, to stay bit for bit what the dense construction gave.
    """
    indptr = np.asarray(indptr, dtype=np.int64)
    nrows = indptr.size - 1
    out = np.zeros(nrows, dtype=np.float64)
    v = np.asarray(data, dtype=np.float64)
    if v.size == 0:
        return out
    r = np.repeat(np.arange(nrows, dtype=np.int64), np.diff(indptr))
    c = np.asarray(indices, dtype=np.int64)
    starts, lens, leaf_node, parent, depth = _pairwise_tree(n)
    leaf = np.searchsorted(starts, c, side="right") - 1
    off = c - starts[leaf]
    L = lens[leaf]
    slot = np.where(off < L - L % 8, off % 8, 8)  # 8: past the last multiple of 8, added in order
    # units: the (row, leaf) pairs holding entries; entries come row-major, so units are runs
    ukey = r * len(starts) + leaf
    new = np.empty(ukey.size, dtype=bool)
    new[0] = True
    np.not_equal(ukey[1:], ukey[:-1], out=new[1:])
    u = np.cumsum(new) - 1
    nunits = int(u[-1]) + 1
    urow, uleaf = r[new], leaf[new]
    # (unit, slot) groups, each summed in column order: r[j] = a[j], then += the next ones
    g = u * 9 + slot
    order = np.argsort(g, kind="stable")
    gs, vs = g[order], v[order]
    first = np.empty(gs.size, dtype=bool)
    first[0] = True
    np.not_equal(gs[1:], gs[:-1], out=first[1:])
    gid = np.cumsum(first) - 1
    rank = np.arange(gs.size) - np.flatnonzero(first)[gid]
    gkey = gs[first]
    gunit, gslot = gkey // 9, gkey % 9
    is_tail = gs % 9 == 8
    body = ~is_tail
    gsum = vs[first].copy()
    for q in range(1, int(rank[body].max(initial=0)) + 1):
        sel = (rank == q) & body
        gsum[gid[sel]] += vs[sel]
    # F = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7)) per unit, absent accumulators 0
    gbody = gslot < 8
    bu, bs, bv = gunit[gbody], gslot[gbody], gsum[gbody]
    per_unit = np.bincount(bu, minlength=nunits)
    val = np.zeros(nunits, dtype=np.float64)
    one = per_unit[bu] == 1
    val[bu[one]] = bv[one]  # x + 0 + ... == x
    many = ~one
    if many.any():
        units = np.unique(bu[many])
        acc = np.zeros((units.size, 8), dtype=np.float64)
        acc[np.searchsorted(units, bu[many]), bs[many]] = bv[many]
        val[units] = ((acc[:, 0] + acc[:, 1]) + (acc[:, 2] + acc[:, 3])) + \
                     ((acc[:, 4] + acc[:, 5]) + (acc[:, 6] + acc[:, 7]))
    # then the elements past the last multiple of 8, in order
    tunit = gs[is_tail] // 9
    tv, trank = vs[is_tail], rank[is_tail]
    for q in range(int(trank.max(initial=-1)) + 1):
        sel = trank == q
        val[tunit[sel]] += tv[sel]
    # up the tree, deepest level first: siblings (adjacent: units are in row, left-to-right order)
    # add, a lone child passes up unchanged
    node = leaf_node[uleaf]
    dep = depth[node]
    row = urow
    while dep.size and dep.max() > 0:
        d = dep.max()
        at = np.flatnonzero(dep == d)
        par = parent[node[at]]
        pair = (row[at[:-1]] == row[at[1:]]) & (par[:-1] == par[1:])  # at[j] and at[j+1] are siblings
        left, right = at[:-1][pair], at[1:][pair]
        val[left] = val[left] + val[right]
        node[at] = par
        dep[at] = d - 1
        if right.size:
            keep = np.ones(dep.size, dtype=bool)
            keep[right] = False
            row, node, dep, val = row[keep], node[keep], dep[keep], val[keep]
    out[row] = 0.0 + val
    return out


def _edge_arrays(adj, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of a symmetric adjacency without self loops, row-major sorted, no duplicates.

    ``adj``: a bool [n, n] ndarray, a scipy.sparse matrix, or an iterable of edges (i, j).
    """
    if sp.issparse(adj):
        if adj.shape != (n, n):
            raise ValueError(f"adjacency of shape {adj.shape} for n={n}")
        coo = sp.coo_array(adj)
        keep = coo.data != 0
        a, b = coo.row[keep].astype(np.int64), coo.col[keep].astype(np.int64)
    elif isinstance(adj, np.ndarray) and adj.ndim == 2:
        if adj.shape != (n, n):
            raise ValueError(f"adjacency of shape {adj.shape} for n={n}")
        a, b = np.nonzero(adj.astype(bool))
    else:
        e = np.asarray(list(adj), dtype=np.int64).reshape(-1, 2)
        a, b = e[:, 0], e[:, 1]
    return symmetric_edges(a, b, n)


def symmetric_edges(a, b, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Both directions of the edges (a[k], b[k]), self loops and duplicates dropped, row-major sorted."""
    a = np.asarray(a, dtype=np.int64).ravel()
    b = np.asarray(b, dtype=np.int64).ravel()
    i, j = np.concatenate((a, b)), np.concatenate((b, a))
    keep = i != j
    key = np.sort(i[keep] * n + j[keep])
    if key.size:
        key = key[np.concatenate(([True], key[1:] != key[:-1]))]
    return key // n, key % n


def adjacency(adj, n: int) -> np.ndarray:
    """A symmetric bool [n, n] adjacency matrix, no self loops, from a matrix or edge list (dense: small n)."""
    r, c = _edge_arrays(adj, n)
    A = np.zeros((n, n), dtype=bool)
    A[r, c] = True
    return A


def metropolis_hastings_csr(adj, n: int) -> sp.csr_array:
    """Metropolis-Hastings weights as a canonical CSR array, in O(edges log n); see metropolis_hastings."""
    r, c = _edge_arrays(adj, n)
    return mh_from_edges(r, c, n)


def mh_from_edges(r: np.ndarray, c: np.ndarray, n: int) -> sp.csr_array:
    """Metropolis-Hastings weights of the symmetric edge set (r, c) (both directions, row-major sorted,
    no loops or duplicates: symmetric_edges). The values are bit for bit those of the dense construction:
    W_ij = 1 / (1 + max(d_i, d_j)), W_ii = 1 - (numpy's row sum of the W_ij, see numpy_row_sums)."""
    d = np.bincount(r, minlength=n).astype(np.int64)
    vals = 1.0 / (1.0 + np.maximum(d[r], d[c]))
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(d, out=indptr[1:])
    diag = 1.0 - numpy_row_sums(indptr, c, vals, n)
    return csr_from_entries(n, r, c, vals, diag)


def metropolis_hastings(adj, n: int) -> np.ndarray:
    """Metropolis-Hastings weights: W_ij = 1/(1 + max(d_i, d_j)) on edges, W_ii = 1 - sum_j W_ij.

    ``adj`` is a bool [n, n] adjacency matrix, a scipy.sparse one, or an iterable of edges (i, j);
    edges are undirected and self loops are ignored. For a d-regular graph this is the uniform
    1/(d + 1). Returns the dense W (O(n^2): small n); metropolis_hastings_csr gives the CSR array.
    """
    return metropolis_hastings_csr(adj, n).toarray()


def uniform_circulant(offsets: Iterable[int], n: int) -> sp.csr_array:
    """W_ij = 1/(|S| + 1) for (j - i) mod n in S (S symmetric, 0 not in S), W_ii likewise (CSR)."""
    S = circulant_offsets(offsets, n)
    w = 1.0 / (len(S) + 1)
    rows = np.arange(n, dtype=np.int64)
    r = np.repeat(rows, len(S))
    c = (r + np.tile(np.asarray(S, dtype=np.int64), n)) % n
    return csr_from_entries(n, r, c, np.full(r.size, w), np.full(n, w))


def circulant_offsets(offsets: Iterable[int], n: int) -> list[int]:
    """The distinct nonzero offsets mod n, sorted."""
    return sorted({o % n for o in offsets} - {0})


def symmetric_circulant_rate(offsets: Iterable[int], n: int) -> float:
    """Closed-form mixing rate of uniform_circulant(offsets, n) (S = -S): W is circulant, so the
    Fourier modes k diagonalise it with eigenvalues lambda_k = w (1 + sum_{s in S} cos(2 pi k s / n)),
    w = 1/(|S| + 1); k = 0 is the consensus mode (removed by J). rate = max_{k=1..n-1} |lambda_k|. O(n |S|)."""
    if n <= 1:
        return 0.0
    S = circulant_offsets(offsets, n)
    w = 1.0 / (len(S) + 1)
    k = np.arange(1, n, dtype=np.int64)
    acc = np.ones(n - 1)
    for s in S:
        acc += np.cos(2.0 * np.pi * ((k * s) % n) / n)
    return rate_from_rho(np.max(np.abs(w * acc)), 1)


def pairing_matrix(n: int, pairs) -> sp.csr_array:
    """Disjoint pairs average with weight 1/2 each; unpaired workers keep weight 1 (CSR).

    ``pairs``: an iterable of (i, j) or an int array [m, 2].
    """
    p = np.asarray(pairs if isinstance(pairs, np.ndarray) else list(pairs), dtype=np.int64).reshape(-1, 2)
    i, j = p[:, 0], p[:, 1]
    ends = np.concatenate((i, j))
    if np.any(i == j) or np.unique(ends).size != ends.size:
        seen: set[int] = set()
        for a, b in p.tolist():
            if a == b or a in seen or b in seen:
                raise ValueError(f"pairs are not disjoint at ({a}, {b})")
            seen.update((a, b))
    diag = np.ones(n)
    diag[ends] = 0.5
    return csr_from_entries(n, np.concatenate((i, j)), np.concatenate((j, i)), np.full(2 * i.size, 0.5), diag)


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
    "column" (column-stochastic is enough: push-sum). Validation works on the CSR arrays: O(nnz).
    """
    name, arg = parse_spec(spec)
    factory = TOPOLOGIES.get(name)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise UserError(f"topology {spec!r} needs a number of workers n >= 1; got n={n!r}")
    n = int(n)
    topo = factory(n, arg)
    topo.name = spec.strip()
    if topo.uniform:  # W = J exactly: doubly stochastic and connected for every n
        return topo
    mats = [topo._csr[t] for t in range(topo.period)]
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
