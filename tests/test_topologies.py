"""Mixing matrices: double stochasticity, connectivity, gather form, spectra, errors; the sparse
representation against today's dense constructions (bit for bit) and the spectra against dense eigvals."""

import json
import math
import re
import time

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from bench.errors import UserError
from topologies import TOPOLOGIES, get_topology, is_connected, metropolis_hastings, supports, validate_matrix
from topologies import base

NS = list(range(1, 21)) + [32, 64]
FAMILIES = [name for name in TOPOLOGIES.names() if name != "file"]


def expected_to_fail(name, n):
    """What the family itself declares (topologies.supports); test_supports_is_right checks the declarations."""
    return supports(TOPOLOGIES.get(name), n) is not None


def _factors(n):
    return any(n % r == 0 for r in range(2, math.isqrt(n) + 1))


def build(name, n):
    try:
        topo = get_topology(name, n)
    except UserError as e:
        assert expected_to_fail(name, n), f"{name} n={n} raised unexpectedly: {e}"
        pytest.skip(f"{name} n={n}: {e}")
    assert not expected_to_fail(name, n), f"{name} n={n} should have raised UserError"
    return topo


def test_supports_is_right():
    """The declarations of the three families with limits, against independent arithmetic."""
    for n in NS:
        assert (supports(TOPOLOGIES.get("torus"), n) is None) == (n == 1 or _factors(n))
        assert (supports(TOPOLOGIES.get("grid"), n) is None) == (n == 1 or _factors(n))
        assert (supports(TOPOLOGIES.get("one-peer-exp"), n) is None) == (n & (n - 1) == 0)


def test_every_family_registered():
    expected = {
        "complete", "ring", "torus", "grid", "exponential", "star",
        "one-peer-ring", "one-peer-exp", "random", "file",
    }
    assert expected <= set(TOPOLOGIES.names())


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("name", FAMILIES)
def test_family(name, n):
    topo = build(name, n)
    assert topo.n == n and topo.name == name
    assert topo.period >= 1
    rng = np.random.default_rng(n)
    X = rng.standard_normal((n, 5))
    Ws = []
    for t in range(topo.period):
        W = topo.weights(t)
        Ws.append(W)
        assert W.dtype == np.float64 and W.shape == (n, n)
        validate_matrix(W, n, "W")
        assert W.min() >= 0.0
        np.testing.assert_allclose(W.sum(axis=1), 1.0, rtol=0, atol=1e-12)
        np.testing.assert_allclose(W.sum(axis=0), 1.0, rtol=0, atol=1e-12)
        np.testing.assert_array_equal(topo.weights(t + topo.period), W)
        # mixing keeps the average exactly
        np.testing.assert_allclose((W @ X).mean(axis=0), X.mean(axis=0), rtol=0, atol=1e-12)
        # the gather form reproduces W @ X
        idx, w = topo.neighbors(t)
        assert idx.dtype == np.int64 and w.dtype == np.float64
        assert idx.shape == w.shape and idx.shape[0] == n
        np.testing.assert_array_equal(idx[:, 0], np.arange(n))
        np.testing.assert_array_equal(w[:, 0], np.diag(W))
        gathered = (w[:, :, None] * X[idx]).sum(axis=1)
        np.testing.assert_allclose(gathered, W @ X, rtol=0, atol=1e-12)
        nnz_off = (W != 0).sum(axis=1) - (np.diag(W) != 0)
        assert idx.shape[1] == 1 + nnz_off.max()
        # is_uniform means exactly the all-1/n matrix
        assert topo.is_uniform(t) == bool(np.all(W == 1.0 / n))
        if name == "complete":
            assert topo.is_uniform(t)
    assert is_connected(Ws)
    props = topo.properties()
    assert props["name"] == name and props["workers"] == n and props["period"] == topo.period
    assert props["time_varying"] == (topo.period > 1)
    lam = props["lambda2"]
    if n == 1:
        assert lam == 0.0
    else:
        assert 0.0 <= lam < 1.0
    assert props["spectral_gap"] == pytest.approx(1.0 - lam, abs=1e-15)
    assert props["max_degree"] <= n - 1
    assert 0.0 < props["sends_per_step"] <= n - 1 or n == 1


@pytest.mark.parametrize("name", [f for f in FAMILIES if f != "complete"])
def test_only_complete_is_uniform(name):
    topo = get_topology(name, 16)
    assert not any(topo.is_uniform(t) for t in range(topo.period))
    assert get_topology("complete", 16).is_uniform(0)


def test_known_values():
    ring = get_topology("ring", 16).properties()
    assert ring["lambda2"] == pytest.approx(1 / 3 + 2 / 3 * math.cos(2 * math.pi / 16), abs=1e-12)
    assert ring["lambda2"] == pytest.approx(0.9493, abs=1e-4)
    assert ring["sends_per_step"] == 2 and ring["max_degree"] == 2

    assert round(get_topology("grid", 16).properties()["lambda2"], 3) == 0.869
    assert get_topology("grid:4x4", 16).properties()["lambda2"] == get_topology("grid", 16).properties()["lambda2"]
    assert get_topology("torus", 16).properties()["lambda2"] == pytest.approx(0.6, abs=1e-12)

    c8 = get_topology("complete", 8).properties()
    assert c8["lambda2"] == 0.0 and c8["spectral_gap"] == 1.0 and c8["sends_per_step"] == 7
    assert get_topology("complete", 13).properties()["lambda2"] == 0.0

    assert get_topology("star", 8).properties()["max_degree"] == 7

    ope = get_topology("one-peer-exp", 16)
    p = ope.properties()
    assert p["lambda2"] == 0.0 and p["period"] == 4 and p["time_varying"]
    assert p["sends_per_step"] == 1 and p["max_degree"] == 1
    M = np.eye(16)
    for t in range(ope.period):
        M = ope.weights(t) @ M
    np.testing.assert_allclose(M, np.full((16, 16), 1 / 16), rtol=0, atol=1e-15)
    for n in (2, 8, 64):
        assert get_topology("one-peer-exp", n).properties()["sends_per_step"] == 1

    assert get_topology("one-peer-ring", 16).properties()["sends_per_step"] == 1
    assert get_topology("exponential", 16).properties()["max_degree"] == 7


def test_weights_match_description():
    W = get_topology("ring", 5).weights(0)
    assert W[0, 0] == W[0, 1] == W[0, 4] == pytest.approx(1 / 3) and W[0, 2] == 0
    np.testing.assert_array_equal(get_topology("ring", 2).weights(0), np.full((2, 2), 0.5))
    np.testing.assert_array_equal(get_topology("ring", 1).weights(0), np.ones((1, 1)))

    T = get_topology("torus:3x4", 12).weights(0)
    assert set(np.round(T[T > 0], 12)) == {0.2}
    assert get_topology("torus:4x8", 32).shape == (4, 8)
    assert get_topology("torus", 12).shape == (3, 4)
    assert get_topology("grid", 36).shape == (6, 6)

    S = get_topology("star", 5).weights(0)
    assert S[0, 0] == pytest.approx(1 / 5) and S[0, 3] == pytest.approx(1 / 5) and S[3, 3] == pytest.approx(4 / 5)

    E = get_topology("exponential", 8).weights(0)  # neighbours +-1, +-2, +-4 -> 5 distinct
    assert (E[0] > 0).sum() == 6 and E[0, 0] == pytest.approx(1 / 6)

    R = get_topology("one-peer-ring", 6)
    assert R.period == 2
    assert R.weights(0)[0, 1] == 0.5 and R.weights(1)[5, 0] == 0.5 and R.weights(1)[1, 2] == 0.5
    R5 = get_topology("one-peer-ring", 5)
    assert R5.weights(0)[4, 4] == 1.0 and R5.weights(1)[0, 0] == 1.0

    X = get_topology("one-peer-exp", 8)
    assert X.weights(2)[3, 3 ^ 4] == 0.5
    assert get_topology("one-peer-exp", 1).period == 1


def test_metropolis_hastings_inputs():
    edges = {(0, 1), (1, 2)}
    W = metropolis_hastings(edges, 3)
    A = np.zeros((3, 3), dtype=bool)
    A[0, 1] = A[1, 2] = True
    np.testing.assert_array_equal(metropolis_hastings(A | A.T, 3), W)
    np.testing.assert_allclose(W, [[2 / 3, 1 / 3, 0], [1 / 3, 1 / 3, 1 / 3], [0, 1 / 3, 2 / 3]])


def test_is_connected():
    assert is_connected([np.eye(1)])
    assert not is_connected([np.eye(3)])
    a = np.eye(3)
    a[0, 1] = 1
    b = np.eye(3)
    b[2, 1] = 1
    assert not is_connected([a]) and is_connected([a, b])


def test_random_is_deterministic_and_seeded():
    a = get_topology("random", 20).weights(0)
    np.testing.assert_array_equal(a, get_topology("random", 20).weights(0))
    np.testing.assert_array_equal(a, get_topology("random:seed=0", 20).weights(0))
    b = get_topology("random:p=0.3,seed=2", 20).weights(0)
    np.testing.assert_array_equal(b, get_topology("random:seed=2,p=0.3", 20).weights(0))
    assert not np.array_equal(a, b)
    full = get_topology("random:p=1", 6).weights(0)
    np.testing.assert_allclose(full, np.full((6, 6), 1 / 6))
    # a sparse p forces redraws but stays deterministic and connected
    sparse = get_topology("random:p=0.15,seed=3", 20)
    np.testing.assert_array_equal(sparse.weights(0), get_topology("random:p=0.15,seed=3", 20).weights(0))


# ---------------------------------------------------------------- errors


def raises(spec, n, *fragments):
    with pytest.raises(UserError) as e:
        get_topology(spec, n)
    msg = str(e.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"
    return msg


def test_unknown_name_suggests():
    raises("rign", 8, "ring", "did you mean")


def test_bad_n():
    raises("ring", 0, "n")
    raises("complete", -3, "n")


def test_torus_grid_need_factorisation():
    msg = raises("torus", 7, "torus needs n = r x c with r, c >= 2", "n=7 does not factor", "4, 6, 8, 9")
    shown = [int(x) for x in re.findall(r"\d+", msg.split("try")[1])]
    assert 7 not in shown and 11 not in shown and {4, 6, 8, 9, 10, 12} <= set(shown)
    raises("grid", 13, "grid needs", "n=13")
    raises("torus", 2, "does not factor")
    raises("torus:4x8", 16, "n=16")
    raises("torus:4by4", 16, "RxC")


def test_one_peer_exp_needs_power_of_two():
    raises("one-peer-exp", 12, "one-peer-exp needs n a power of two (1, 2, 4, 8, 16, ...); got n=12")


def test_bad_args():
    raises("ring:5", 8, "ring")
    raises("complete:x", 8, "complete")
    raises("random:q=0.3", 8, "unknown option", "'q'")
    raises("random:p=abc", 8, "p")
    raises("random:p=0", 8, "p")
    raises("random:p=0.01,seed=0", 40, "larger p")
    raises("file", 4, "path")


def test_file_loads_npy_and_csv(tmp_path):
    W = get_topology("ring", 6).weights(0)
    npy = tmp_path / "w.npy"
    np.save(npy, W)
    csv = tmp_path / "w.csv"
    np.savetxt(csv, W, delimiter=",", fmt="%.17g")
    for path in (npy, csv):
        topo = get_topology(f"file:{path}", 6)
        np.testing.assert_array_equal(topo.weights(0), W)
        assert topo.name == f"file:{path}" and topo.period == 1
        assert topo.properties()["lambda2"] == pytest.approx(get_topology("ring", 6).properties()["lambda2"])
    (tmp_path / "w1.csv").write_text("1.0\n")
    assert get_topology(f"file:{tmp_path / 'w1.csv'}", 1).n == 1


def test_file_errors(tmp_path):
    def save(name, M):
        p = tmp_path / name
        np.save(p, np.asarray(M, dtype=float))
        return p

    p = save("half.npy", np.full((4, 4), 0.2))
    raises(f"file:{p}", 4, "doubly stochastic", "sums to 0.8")
    cols = np.array([[0.5, 0.5, 0], [0.5, 0.5, 0], [0.5, 0, 0.5]])
    raises(f"file:{save('cols.npy', cols)}", 3, "column", "sums to 1.5")
    raises(f"file:{save('rect.npy', np.full((3, 4), 0.25))}", 3, "square", "3x4")
    raises(f"file:{save('size.npy', np.full((4, 4), 0.25))}", 5, "4x4", "n=5")
    raises(f"file:{save('neg.npy', [[1.5, -0.5], [-0.5, 1.5]])}", 2, "negative")
    raises(f"file:{save('nan.npy', [[np.nan, 1], [1, 0]])}", 2, "finite")
    raises(f"file:{save('vec.npy', [1.0])}", 1, "2-D")
    raises(f"file:{save('eye.npy', np.eye(4))}", 4, "disconnected")
    block = np.kron(np.eye(2), np.full((2, 2), 0.5))
    raises(f"file:{save('block.npy', block)}", 4, "disconnected", "2 components")
    raises(f"file:{tmp_path / 'missing.npy'}", 4, "does not exist")
    (tmp_path / "w.txt").write_text("1\n")
    raises(f"file:{tmp_path / 'w.txt'}", 1, ".npy or .csv")
    (tmp_path / "bad.csv").write_text("0.5,0.5\n0.5,abc\n")
    raises(f"file:{tmp_path / 'bad.csv'}", 2, "cannot read")
    (tmp_path / "bad.npy").write_bytes(b"not a numpy file")
    raises(f"file:{tmp_path / 'bad.npy'}", 2, "cannot read")


def test_validate_matrix_direct():
    W = validate_matrix([[0.5, 0.5], [0.5, 0.5]], 2, "W")
    assert W.dtype == np.float64
    with pytest.raises(UserError, match="row 1 sums to 1.1"):
        validate_matrix([[0.5, 0.5], [0.5, 0.6]], 2, "W")
    validate_matrix([[1.0 + 1e-9, -1e-13], [0.0, 1.0]], 2, "W")  # within tolerance


# ---------------------------------------------------------------- sparse representation vs the dense reference
#
# The dense constructions and the dense gather form below are the code of the families before they
# built CSR arrays directly: the sparse code must give the same float64 bits (the mixer sums the slots
# in order, and the simulator's float32 runs must not change).


def ref_gather_form(W):
    n = W.shape[0]
    off = W != 0
    np.fill_diagonal(off, False)
    counts = off.sum(axis=1)
    k = 1 + (int(counts.max()) if n else 0)
    rows = np.arange(n, dtype=np.int64)
    idx = np.repeat(rows[:, None], k, axis=1)
    w = np.zeros((n, k), dtype=np.float64)
    w[:, 0] = np.diag(W)
    r, c = np.nonzero(off)
    if r.size:
        starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
        slot = 1 + np.arange(r.size) - starts[r]
        idx[r, slot] = c
        w[r, slot] = W[r, c]
    return idx, w


def ref_uniform_circulant(offsets, n):
    S = sorted({o % n for o in offsets} - {0})
    W = np.zeros((n, n))
    w = 1.0 / (len(S) + 1)
    rows = np.arange(n)
    W[rows, rows] = w
    for o in S:
        W[rows, (rows + o) % n] = w
    return W


def ref_mh(A):
    A = A | A.T
    np.fill_diagonal(A, False)
    d = A.sum(axis=1)
    W = np.where(A, 1.0 / (1.0 + np.maximum(d[:, None], d[None, :])), 0.0)
    np.fill_diagonal(W, 0.0)
    np.fill_diagonal(W, 1.0 - W.sum(axis=1))
    return W


def ref_edges_adj(n, edges):
    A = np.zeros((n, n), dtype=bool)
    for i, j in edges:
        A[i, j] = True
    return A


def ref_grid_edges(r, c, wrap):
    edges = []
    for i in range(r):
        for j in range(c):
            k = i * c + j
            if i + 1 < r or (wrap and r > 1):
                edges.append((k, ((i + 1) % r) * c + j))
            if j + 1 < c or (wrap and c > 1):
                edges.append((k, i * c + (j + 1) % c))
    return edges


def ref_pairing(n, pairs):
    W = np.eye(n)
    for i, j in pairs:
        W[i, i] = W[j, j] = W[i, j] = W[j, i] = 0.5
    return W


def ref_push(n, hop):
    W = 0.5 * np.eye(n)
    j = np.arange(n)
    W[(j + hop) % n, j] += 0.5
    return W


def ref_random(n, p, seed):
    iu = np.triu_indices(n, k=1)
    for s in range(seed, seed + 1000):
        A = np.zeros((n, n), dtype=bool)
        A[iu] = np.random.default_rng(s).random(iu[0].size) < p
        A |= A.T
        if connected_components(sp.csr_array(A), directed=False)[0] <= 1:
            return ref_mh(A), s
    raise AssertionError("disconnected")


def reference_mats(spec, n):
    """W(0), ..., W(P-1) as the dense code built them."""
    name, arg = base.parse_spec(spec)
    one = [np.ones((1, 1))]
    if name == "ring":
        return one if n == 1 else [np.full((2, 2), 0.5)] if n == 2 else [ref_uniform_circulant([1, -1], n)]
    if name == "exponential":
        if n == 1:
            return one
        hops = [2**k for k in range((n - 1).bit_length())]
        return [ref_uniform_circulant(hops + [-h for h in hops], n)]
    if name in ("torus", "grid"):
        r, c = base.grid_shape(name, n, arg)
        return [ref_mh(ref_edges_adj(n, ref_grid_edges(r, c, wrap=name == "torus")))]
    if name == "star":
        return [ref_mh(ref_edges_adj(n, [(0, j) for j in range(1, n)]))]
    if name == "complete":
        return [np.full((n, n), 1.0 / n)]
    if name == "one-peer-ring":
        if n == 1:
            return one
        even = [(i, i + 1) for i in range(0, n - 1, 2)]
        odd = [(i, i + 1) for i in range(1, n - 1, 2)] + ([(n - 1, 0)] if n % 2 == 0 else [])
        return [ref_pairing(n, even), ref_pairing(n, odd)]
    if name == "one-peer-exp":
        if n == 1:
            return one
        return [ref_pairing(n, [(i, i ^ (1 << k)) for i in range(n) if i < i ^ (1 << k)])
                for k in range(n.bit_length() - 1)]
    if name == "directed-ring":
        return one if n == 1 else [ref_push(n, 1)]
    if name == "directed-exp":
        return one if n == 1 else [ref_push(n, 1 << k) for k in range((n - 1).bit_length())]
    if name == "random":
        from topologies.random_graph import default_p, parse_options

        p, seed = parse_options(arg)
        return one if n == 1 else [ref_random(n, default_p(n) if p is None else p, seed)[0]]
    raise KeyError(name)


def bits(a):
    return np.asarray(a, dtype=np.float64).view(np.int64)


def assert_same_topology(topo, ref):
    assert topo.period == len(ref)
    for t, R in enumerate(ref):
        W = topo.weights(t)
        np.testing.assert_array_equal(bits(W), bits(R + 0.0))  # + 0.0: -0.0 off the diagonal reads as 0
        A = topo.sparse(t)
        assert sp.issparse(A) and A.format == "csr" and A.dtype == np.float64 and A.shape == R.shape
        idx, w = topo.neighbors(t)
        ridx, rw = ref_gather_form(R)
        assert idx.dtype == ridx.dtype == np.int64 and w.dtype == rw.dtype == np.float64
        assert idx.shape == ridx.shape and w.shape == rw.shape
        np.testing.assert_array_equal(idx, ridx)
        np.testing.assert_array_equal(bits(w), bits(rw))
        assert topo.is_uniform(t) == bool(np.all(R == 1.0 / R.shape[0]))


ALL_FAMILIES = [name for name in TOPOLOGIES.names() if name != "file"]
REFERENCES = {"ring", "exponential", "torus", "grid", "star", "complete", "one-peer-ring", "one-peer-exp",
              "directed-ring", "directed-exp", "random"}


def kind_of(name):
    return "column" if name.startswith("directed") else "doubly"


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_sparse_matches_dense_reference(name, n):
    """neighbors(t) of every family is the dense code's gather form of its W(t); and W(t), neighbors(t),
    is_uniform(t) are bit for bit what the dense constructions gave."""
    try:
        topo = get_topology(name, n, kind=kind_of(name))
    except UserError:
        assert expected_to_fail(name, n)
        return
    for t in range(topo.period):
        idx, w = topo.neighbors(t)
        ridx, rw = ref_gather_form(topo.weights(t))
        assert idx.shape == ridx.shape and idx.dtype == ridx.dtype and w.dtype == rw.dtype
        np.testing.assert_array_equal(idx, ridx)
        np.testing.assert_array_equal(bits(w), bits(rw))
    if name in REFERENCES:
        assert_same_topology(topo, reference_mats(name, n))


@pytest.mark.parametrize("spec,n", [("star", 1000), ("random", 1500), ("random:p=0.3,seed=4", 300),
                                    ("random:p=0.05,seed=1", 700), ("torus", 1200), ("torus:2x300", 600),
                                    ("grid", 1200), ("grid:3x200", 600), ("exponential", 1000)])
def test_sparse_matches_dense_reference_larger(spec, n):
    """Larger n: Metropolis-Hastings diagonals summed over rows longer than numpy's 128-element blocks,
    and random graphs drawn over more than one block of a million uniforms."""
    assert_same_topology(get_topology(spec, n), reference_mats(spec, n))


def test_random_seed_used_matches_reference():
    from topologies.random_graph import default_p

    for spec, n, p, seed in (("random:p=0.15,seed=3", 20, 0.15, 3), ("random:p=0.2,seed=0", 40, 0.2, 0),
                             ("random", 64, default_p(64), 0)):
        assert get_topology(spec, n).seed == ref_random(n, p, seed)[1]


def test_numpy_row_sums_is_numpy():
    """The emulation of numpy's pairwise row sum over the nonzeros gives numpy's bits."""
    rng = np.random.default_rng(0)
    sizes = list(range(1, 40)) + [127, 128, 129, 200, 255, 256, 257, 1000, 1024, 4097, 8192, 8193, 20000]
    for n in sizes:
        rows = 6
        D = np.zeros((rows, n))
        for i in range(rows):
            k = int(rng.integers(0, min(n, 300) + 1)) if i else n  # row 0 dense
            pos = rng.choice(n, size=k, replace=False)
            D[i, pos] = rng.random(k) * 10.0 ** rng.integers(-4, 4, size=k)
        A = sp.csr_array(D)
        A.sort_indices()
        got = base.numpy_row_sums(A.indptr, A.indices, A.data, n)
        np.testing.assert_array_equal(bits(got), bits(D.sum(axis=1)), err_msg=f"n={n}")


def test_topology_holds_no_dense_matrix():
    topo = get_topology("torus", 64)
    assert all(sp.issparse(A) for A in topo._csr)
    assert not any(isinstance(v, np.ndarray) and v.shape == (64, 64) for v in vars(topo).values())
    W = topo.sparse(0)
    W.data[:] = 0  # a copy: the topology is unchanged
    assert topo.weights(0).sum() == pytest.approx(64)


def test_dense_and_sparse_inputs_agree():
    """Topology(...) takes dense arrays or scipy.sparse matrices; -0.0, explicit zeros and duplicates."""
    W = get_topology("ring", 6).weights(0)
    a = base.Topology("a", 6, [W])
    b = base.Topology("b", 6, [sp.csr_matrix(W)])
    C = sp.coo_array(W)  # every entry stored twice as two halves (summed), and an explicit zero at (0, 3)
    data = np.concatenate((C.data / 2, C.data / 2, [0.0]))
    rows, cols = np.concatenate((C.row, C.row, [0])), np.concatenate((C.col, C.col, [3]))
    c = base.Topology("c", 6, [sp.coo_array((data, (rows, cols)), shape=(6, 6))])
    for t in (a, b, c):
        np.testing.assert_array_equal(t.weights(0), W)
        for x, y in zip(t.neighbors(0), ref_gather_form(W)):
            np.testing.assert_array_equal(x, y)
    Z = np.array([[-0.0, 1.0], [1.0, 0.0]])
    z = base.Topology("z", 2, [Z])
    np.testing.assert_array_equal(bits(z.neighbors(0)[1]), bits(ref_gather_form(Z)[1]))  # the -0.0 diagonal kept
    with pytest.raises(ValueError, match="shape"):
        base.Topology("bad", 3, [W])


# ---------------------------------------------------------------- spectra


def dense_rate(topo):
    """mixing_rate as the dense code computed it: eigvals of the dense product minus J."""
    n = topo.n
    if n <= 1:
        return 0.0
    M = topo.weights(0)
    for t in range(1, topo.period):
        M = topo.weights(t) @ M
    rho = float(np.max(np.abs(np.linalg.eigvals(M - 1.0 / n))))
    return base.rate_from_rho(rho, topo.period)


CLOSED_FORMS = ["ring", "exponential", "torus", "star", "complete", "one-peer-ring", "one-peer-exp",
                "directed-ring", "directed-exp"]


@pytest.mark.parametrize("name", CLOSED_FORMS)
def test_closed_forms_match_dense_eigvals(name):
    ns = NS + [24, 36, 48, 100, 127, 128, 200, 256]
    checked = 0
    for n in ns:
        if expected_to_fail(name, n):
            continue
        topo = get_topology(name, n, kind=kind_of(name))
        assert topo._rate is not None or name == "complete" or n == 1
        lam = topo.properties()["lambda2"]
        assert lam == pytest.approx(dense_rate(topo), abs=1e-9), (name, n)
        checked += 1
    assert checked >= 8


def test_closed_forms_formulas():
    """The derived formulas, for several n (each also matches dense eigvals above)."""
    from topologies.directed_ring import push_rate
    from topologies.torus import torus_rate

    for n in (5, 6, 7, 16, 33, 100, 4096):
        assert get_topology("ring", n).properties()["lambda2"] == pytest.approx(
            1 / 3 + 2 / 3 * math.cos(2 * math.pi / n), abs=1e-14)
        assert get_topology("directed-ring", n, kind="column").properties()["lambda2"] == pytest.approx(
            math.cos(math.pi / n), abs=1e-14)
        assert get_topology("star", n).properties()["lambda2"] == pytest.approx(1 - 1 / n, abs=1e-14)
        angle = 2 * math.pi / n if n % 2 == 0 else math.pi / n
        assert get_topology("one-peer-ring", n).properties()["lambda2"] == pytest.approx(abs(math.cos(angle)),
                                                                                          abs=1e-12)
    assert get_topology("ring", 4).properties()["lambda2"] == pytest.approx(1 / 3, abs=1e-15)
    assert get_topology("ring", 3).properties()["lambda2"] == 0.0
    for r, c in ((3, 3), (3, 5), (4, 8), (5, 7), (10, 10)):
        expect = max(abs(1 + 2 * math.cos(2 * math.pi * a / r) + 2 * math.cos(2 * math.pi * b / c)) / 5
                     for a in range(r) for b in range(c) if (a, b) != (0, 0))
        assert torus_rate(r, c) == pytest.approx(expect, abs=1e-14)
        assert get_topology(f"torus:{r}x{c}", r * c).properties()["lambda2"] == pytest.approx(expect, abs=1e-14)
    for n in (8, 16, 64, 1024):  # directed-exp on a power of two: the product over a period is J
        assert push_rate(n, [1 << k for k in range((n - 1).bit_length())]) == 0.0
    for n in (2, 4, 8, 64):
        assert get_topology("one-peer-exp", n).properties()["lambda2"] == 0.0


def sparse_rate(mats):
    return base.mixing_rate(mats, dense_max=0)  # ARPACK whatever n


@pytest.mark.parametrize("spec,n", [("grid", 36), ("grid:5x12", 60), ("grid", 100), ("random", 40),
                                    ("random:p=0.3,seed=2", 80), ("random", 200), ("star", 30), ("ring", 50),
                                    ("exponential", 40), ("torus", 64), ("one-peer-ring", 21), ("one-peer-ring", 30),
                                    ("directed-ring", 17), ("directed-exp", 20), ("directed-exp", 64)])
def test_sparse_eigensolver_matches_dense_eigvals(spec, n):
    topo = get_topology(spec, n, kind=kind_of(spec))
    mats = [topo.sparse(t) for t in range(topo.period)]
    assert sparse_rate(mats) == pytest.approx(dense_rate(topo), abs=1e-9)


@pytest.mark.parametrize("spec,n", [("grid", 36), ("grid:4x50", 200), ("random", 60), ("ring", 40),
                                    ("torus", 100), ("star", 25)])
def test_shift_invert_matches_dense_eigvals(spec, n):
    topo = get_topology(spec, n)
    rho = base.symmetric_radius_shift_invert(topo.sparse(0))
    assert rho == pytest.approx(dense_rate(topo), abs=1e-9)


def test_shift_invert_when_the_bottom_dominates():
    # W = 0.05 I + 0.475 (S + S^T) on an even cycle: lambda_min = -0.9 beats lambda_2 = 0.05 + 0.95 cos(2 pi / m)
    for m in (8, 40):
        S = np.roll(np.eye(m), 1, axis=1)
        W = 0.05 * np.eye(m) + 0.475 * (S + S.T)
        expect = float(np.max(np.abs(np.linalg.eigvalsh(W - 1.0 / m))))
        assert base.symmetric_radius_shift_invert(sp.csr_array(W)) == pytest.approx(expect, abs=1e-10)
        assert sparse_rate([sp.csr_array(W)]) == pytest.approx(expect, abs=1e-10)
        assert base.mixing_rate([W]) == pytest.approx(expect, abs=1e-12)


def test_file_topology_above_the_dense_limit(tmp_path):
    """A file of more than DENSE_EIG_MAX workers: its rate comes from ARPACK, and agrees with eigvals."""
    n = base.DENSE_EIG_MAX + 88
    W = get_topology("grid:20x30", n).weights(0)
    path = tmp_path / "grid.npy"
    np.save(path, W)
    topo = get_topology(f"file:{path}", n)
    assert topo.properties()["lambda2"] == pytest.approx(dense_rate(topo), abs=1e-9)


# ---------------------------------------------------------------- validation and helpers on CSR


def test_validate_sparse_gives_the_dense_messages():
    bad = {
        "half": np.full((4, 4), 0.2),
        "cols": np.array([[0.5, 0.5, 0], [0.5, 0.5, 0], [0.5, 0, 0.5]]),
        "neg": np.array([[1.5, -0.5], [-0.5, 1.5]]),
        "nan": np.array([[np.nan, 1], [1, 0]]),
        "inf": np.array([[0.5, 0.5], [0.5, np.inf]]),
        "size": np.full((4, 4), 0.25),
    }
    for key, M in bad.items():
        n = 5 if key == "size" else M.shape[0]
        for rows in (True, False):
            msgs = []
            for A in (M, sp.csr_array(M)):
                with pytest.raises(UserError) as e:
                    validate_matrix(A, n, "W", rows=rows)
                msgs.append(str(e.value))
            if key == "cols" and not rows:
                continue
            assert msgs[0] == msgs[1], key
    ok = validate_matrix(sp.csr_array(get_topology("ring", 5).weights(0)), 5, "W")
    assert sp.issparse(ok)
    validate_matrix(sp.csr_array(np.array([[1.0 + 1e-9, -1e-13], [0.0, 1.0]])), 2, "W")  # within tolerance


def test_count_components_on_sparse():
    a = np.eye(3)
    a[0, 1] = 1
    b = np.eye(3)
    b[2, 1] = 1
    assert base.count_components([sp.csr_array(a)]) == 2
    assert base.count_components([sp.csr_array(a), sp.csr_array(b)]) == 1
    assert base.count_components([sp.csr_array(a), b]) == 1
    e = sp.csr_array((np.array([0.0, 1.0]), (np.array([0, 1]), np.array([1, 2]))), shape=(3, 3))
    assert base.count_components([e]) == 2  # an explicit zero is no edge
    d = get_topology("directed-exp", 8, kind="column")
    assert base.count_components([d.sparse(1)], strong=True) == 2


def test_off_diagonal_nonzeros_dense_and_sparse():
    topo = get_topology("exponential", 16)
    assert int(base.off_diagonal_nonzeros(topo.weights(0)).sum()) == int(
        base.off_diagonal_nonzeros(topo.sparse(0)).sum()) == topo.sends(0) == 16 * 7


def test_metropolis_hastings_csr():
    edges = [(0, 1), (1, 2), (2, 0), (2, 3), (3, 3)]
    A = ref_edges_adj(4, edges)
    np.testing.assert_array_equal(bits(base.metropolis_hastings_csr(edges, 4).toarray()), bits(ref_mh(A)))
    np.testing.assert_array_equal(bits(metropolis_hastings(sp.csr_array(A), 4)), bits(ref_mh(A)))


def test_pairing_matrix_rejects_overlaps():
    with pytest.raises(ValueError, match=r"not disjoint at \(1, 2\)"):
        base.pairing_matrix(4, [(0, 1), (1, 2)])
    with pytest.raises(ValueError, match=r"not disjoint at \(3, 3\)"):
        base.pairing_matrix(4, [(3, 3)])


def test_exchange_lists_sparse_equals_dense():
    from bench.distributed import exchange_lists

    def reference(W, P):  # the dense code
        n = W.shape[0]
        m = n // P
        nz = W != 0
        need = []
        for r in range(P):
            rows = nz[r * m:(r + 1) * m]
            per = []
            for s in range(P):
                if s == r:
                    per.append(np.zeros(0, dtype=np.int64))
                else:
                    cols = np.nonzero(rows[:, s * m:(s + 1) * m].any(axis=0))[0]
                    per.append((cols + s * m).astype(np.int64))
            need.append(per)
        return need

    for spec, n in (("ring", 12), ("torus", 16), ("random", 24), ("one-peer-exp", 16), ("star", 8),
                    ("complete", 6), ("ring", 1)):
        topo = get_topology(spec, n)
        for P in (p for p in range(1, n + 1) if n % p == 0):
            for t in range(topo.period):
                want = reference(topo.weights(t), P)
                for W in (topo.sparse(t), topo.weights(t)):
                    got = exchange_lists(W, P)
                    assert len(got) == P and all(len(row) == P for row in got)
                    for a, b in zip(want, got):
                        for x, y in zip(a, b):
                            assert y.dtype == np.int64
                            np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------- many workers


def test_complete_graph_is_never_materialised():
    topo = get_topology("complete", 65536)
    assert topo.is_uniform(0) and topo.is_uniform(7)
    p = topo.properties()
    assert p["lambda2"] == 0.0 and p["max_degree"] == 65535 and p["sends_per_step"] == 65535
    with pytest.raises(UserError, match="plain mean"):
        topo.neighbors(0)
    with pytest.raises(UserError, match="plain mean"):
        topo.weights(0)
    small = get_topology("complete", 5)
    np.testing.assert_array_equal(small.sparse(0).toarray(), np.full((5, 5), 0.2))


def test_random_graph_above_the_exact_draw_limit():
    from topologies.random_graph import EXACT_DRAW_MAX, default_p

    n = EXACT_DRAW_MAX + 904
    a = get_topology("random", n)
    b = get_topology("random:seed=0", n)
    np.testing.assert_array_equal(a.sparse(0).indices, b.sparse(0).indices)
    A = a.sparse(0)
    degrees = np.diff(A.indptr) - 1
    mean = default_p(n) * (n - 1)
    assert abs(degrees.mean() - mean) < 0.05 * mean  # 2 ln n ~ 17.3 expected neighbours
    assert base.count_components([A]) == 1
    assert (abs(A - A.T)).max() == 0
    c = get_topology("random:p=0.01,seed=5", n)
    assert abs((np.diff(c.sparse(0).indptr) - 1).mean() - 0.01 * (n - 1)) < 0.05 * 0.01 * n


LARGE = 65536


@pytest.mark.parametrize("name", ["ring", "exponential", "torus", "one-peer-exp"])
def test_cli_topology_with_65536_workers(name):
    from typer.testing import CliRunner

    from dsgdbench import app

    t0 = time.perf_counter()
    res = CliRunner().invoke(app, ["topology", name, "--workers", str(LARGE), "--format", "json"])
    took = time.perf_counter() - t0
    assert res.exit_code == 0, res.output
    props = json.loads(res.stdout)
    assert "spectral_gap" in props and props["workers"] == LARGE
    assert took < 20, f"topology {name} --workers {LARGE} took {took:.1f} s"
    expect = {"ring": 1 / 3 + 2 / 3 * math.cos(2 * math.pi / LARGE), "one-peer-exp": 0.0,
              "torus": (1 + 2 + 2 * math.cos(2 * math.pi / 256)) / 5}.get(name)
    if expect is not None:
        assert props["lambda2"] == pytest.approx(expect, abs=1e-14)
    res = CliRunner().invoke(app, ["topology", name, "--workers", str(LARGE)])
    assert res.exit_code == 0 and "spectral_gap" in res.stdout
