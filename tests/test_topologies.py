"""Mixing matrices: double stochasticity, connectivity, gather form, spectra, errors."""

import math
import re

import numpy as np
import pytest

from bench.errors import UserError
from topologies import TOPOLOGIES, get_topology, is_connected, metropolis_hastings, supports, validate_matrix

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
