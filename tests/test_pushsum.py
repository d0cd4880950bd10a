"""Push-sum (SGP, --algo sgp) and the directed topologies directed-ring and directed-exp.

References are written here independently of the code under test: mixing matrices from their
definitions, gradients from a float64 copy of the module (test_algorithms.grads64), SGD with
momentum and weight decay from its formula.
"""

import json
import math

import numpy as np
import pytest
import torch

import topologies
from algorithms import StepContext
from bench.comm import SimulatedComm
from bench.config import RunConfig
from bench.errors import UserError
from bench.models import build_model
from bench.runner import run
from bench.workers import ParamLayout
from helpers import component
from test_algorithms import cosine, do_step, grads64, make_trainer, perturb_rows, run_steps
from test_cli import TINY, assert_user_error, cli
from topologies.base import Topology, count_components

CPU = torch.device("cpu")
# Float64 runs and references, as in tests/test_algorithms.py: correct code agrees to ~1e-13 relative
# after a few steps; 1e-9 leaves a 1e4 margin while a wrong constant of relative size 1e-6 moves the
# parameters by ~1e-7 relative (test_tolerance_catches_a_wrong_rule).
EQ = dict(rtol=1e-9, atol=1e-12)
NS = list(range(1, 21)) + [32, 64]


@pytest.fixture
def tiny_cfg(tiny_cfg):
    return tiny_cfg.replace(precision="fp64")


def push_graph(n: int = 4) -> np.ndarray:
    """Column-stochastic, NOT row-stochastic: worker 0 pushes to everyone, worker j > 0 to j + 1;
    uniform out-weights 1/(out-degree + 1), self included (SGP's UniformMixing)."""
    W = np.zeros((n, n))
    W[:, 0] = 1.0 / n
    for j in range(1, n):
        W[j, j] = W[(j + 1) % n, j] = 0.5
    return W


def directed_topology(n: int = 4) -> Topology:
    return Topology("push-graph", n, [push_graph(n)], directed=True)


def save_push_graph(tmp_path, n: int = 4):
    p = tmp_path / "push.npy"
    np.save(p, push_graph(n))
    return p


def strongly_connected(Ws) -> bool:
    """Every worker reaches every other along the union's edges j -> i (W_ij > 0): BFS from 0, both ways."""
    A = sum((np.asarray(W) != 0).astype(int) for W in Ws) > 0
    n = A.shape[0]

    def reach(M):
        seen, todo = {0}, [0]
        while todo:
            j = todo.pop()
            for i in np.nonzero(M[:, j])[0]:
                if int(i) not in seen:
                    seen.add(int(i))
                    todo.append(int(i))
        return len(seen) == n

    return reach(A) and reach(A.T)


# ----------------------------------------------------------------------------------------------
# the directed families


def check_directed(topo, expected, n):
    """W(t) entries, column and row sums, periodicity, strong connectivity, the gather form."""
    assert topo.directed and topo.period == len(expected)
    for t, E in enumerate(expected):
        W = topo.weights(t)
        np.testing.assert_array_equal(W, E)
        np.testing.assert_array_equal(W.sum(axis=0), np.ones(n))  # column-stochastic, exactly
        np.testing.assert_array_equal(W.sum(axis=1), np.ones(n))  # regular: rows too
        for k in (1, 2, 5):
            np.testing.assert_array_equal(topo.weights(t + k * topo.period), W)
        X = np.random.default_rng(t).standard_normal((n, 3))
        idx, w = topo.neighbors(t)
        np.testing.assert_allclose((w[:, :, None] * X[idx]).sum(axis=1), W @ X, rtol=0, atol=1e-14)
    assert strongly_connected(expected)
    assert count_components(expected, strong=True) == 1


@pytest.mark.parametrize("n", NS)
def test_directed_ring_matches_definition(n):
    topo = topologies.get_topology("directed-ring", n, kind="column")
    E = np.zeros((n, n))
    for j in range(n):  # column j: 1/2 stays, 1/2 goes to j + 1
        E[j, j] += 0.5
        E[(j + 1) % n, j] += 0.5
    check_directed(topo, [E], n)
    if n >= 3:
        i = n // 2
        assert topo.weights(0)[i, i - 1] == 0.5 and topo.weights(0)[i - 1, i] == 0.0  # directed: i-1 -> i only
    assert topo.properties()["sends_per_step"] == (0 if n == 1 else 1)
    # regular, hence also doubly stochastic: D-SGD may mix over it
    np.testing.assert_array_equal(topologies.get_topology("directed-ring", n).weights(0), E)


@pytest.mark.parametrize("n", NS)
def test_directed_exp_matches_definition(n):
    topo = topologies.get_topology("directed-exp", n, kind="column")
    hops = [2 ** k for k in range(n) if 2 ** k <= n - 1] or [0]  # phone book offsets: 1, 2, 4, ..., <= n - 1
    L = len(hops)
    assert L == (1 if n <= 2 else math.floor(math.log2(n - 1)) + 1)
    expected = []
    for t in range(L):
        E = np.zeros((n, n))
        for i in range(n):  # worker i pushes to phone_book[t mod L] = i + hops[t]
            E[i, i] += 0.5
            E[(i + hops[t]) % n, i] += 0.5
        expected.append(E)
    check_directed(topo, expected, n)
    for t in range(3 * L if n >= 3 else 0):  # (W(t) x)_i = 1/2 x_i + 1/2 x_{i - 2^k}, k = t mod L
        W = topo.weights(t)
        assert all(W[i, (i - hops[t % L]) % n] == 0.5 for i in range(n))
    if n & (n - 1) == 0:  # n a power of two: one period averages exactly (prod (I + S^{2^k}) / 2 = J)
        M = np.eye(n)
        for t in range(L):
            M = topo.weights(t) @ M
        np.testing.assert_allclose(M, np.full((n, n), 1.0 / n), rtol=0, atol=1e-15)
    assert topo.properties()["sends_per_step"] == (0 if n == 1 else 1)


def test_directed_exp_one_step_is_not_connected_but_a_period_is():
    topo = topologies.get_topology("directed-exp", 8)
    assert count_components([topo.weights(1)], strong=True) == 2  # hop 2 on 8 workers: evens and odds
    assert count_components([topo.weights(t) for t in range(topo.period)], strong=True) == 1


# ----------------------------------------------------------------------------------------------
# a column-stochastic graph that is not row-stochastic: push-sum only


def test_push_graph_is_column_not_row_stochastic():
    W = push_graph()
    np.testing.assert_allclose(W.sum(axis=0), 1.0, rtol=0, atol=1e-15)
    assert np.abs(W.sum(axis=1) - 1).max() > 0.2
    assert strongly_connected([W])


def test_directed_file_accepted_for_push_sum_rejected_for_dsgd(tmp_path):
    p = save_push_graph(tmp_path)
    topo = topologies.get_topology(f"file:{p}", 4, kind="column")
    assert topo.directed
    np.testing.assert_array_equal(topo.weights(0), push_graph())
    with pytest.raises(UserError, match="push-sum") as e:
        topologies.get_topology(f"file:{p}", 4, kind="doubly")
    assert "\n" not in str(e.value)
    root = tmp_path / "results"
    assert_user_error(cli("run", *TINY, "--algo", "dsgd", "--workers", "4", "--topology", f"file:{p}",
                          "--results", root), "push-sum")
    res = cli("run", *TINY, "--algo", "sgp", "--workers", "4", "--topology", f"file:{p}", "--results", root)
    assert res.exit_code == 0, res.output


# ----------------------------------------------------------------------------------------------
# the update


def directed_trainer(cfg, data, W: np.ndarray):
    """A trainer whose simulated comm mixes over W (a directed graph), whatever cfg's topology."""
    tr = make_trainer(cfg, data)
    tr.comm = SimulatedComm(cfg.workers, Topology("push-graph", cfg.workers, [W], directed=True), CPU)
    return tr


def reference(tr, X, T, lr0, W, mu=0.9, wd=5e-4, at_z=True, lr_scale=1.0):
    """Push-sum in float64: z = x / w, g = grad(z) + wd x, m = mu m + g, [x, w] = W [x - lr m, w].

    Returns the (x, w) after each step."""
    W = torch.from_numpy(W)
    w = torch.ones(X.shape[0], 1, dtype=torch.float64)
    m, out = None, []
    for t in range(T):
        x, y = tr.batch(t)
        g = grads64(tr.workers.module, X / w if at_z else X, x, y) + wd * X
        m = g.clone() if m is None else mu * m + g
        lr = cosine(t, lr0, T) * lr_scale
        X, w = W @ (X - lr * m), W @ w
        out.append((X, w))
    return out


def test_sgp_steps_match_formula(tiny_cfg, synthetic):
    """On the non-regular directed graph, w moves away from 1 and gradients are taken at z = x / w."""
    T, n = 4, 4
    cfg = tiny_cfg.replace(algo="sgp", topology="ring", workers=n, steps=T, schedule="cosine", momentum=0.9)
    tr = directed_trainer(cfg, synthetic, push_graph(n))
    X0 = perturb_rows(tr)
    ref = reference(tr, X0, T, cfg.lr, push_graph(n))
    for t in range(T):
        do_step(tr, t)
        X, w = ref[t]
        torch.testing.assert_close(tr.workers.X.double(), X, **EQ)
        torch.testing.assert_close(tr.algo.rule.w, w, **EQ)
        assert float(w.sum()) == pytest.approx(n, abs=1e-13)
    assert (w - 1).abs().max() > 0.1  # the weights did move: z != x
    # taking the gradient at x instead of z = x / w is a different rule at this tolerance
    X_at_x = reference(tr, X0, T, cfg.lr, push_graph(n), at_z=False)[-1][0]
    assert (X_at_x - X).abs().max() > 1e-6


def test_tolerance_catches_a_wrong_rule(tiny_cfg, synthetic):
    """A learning rate off by 1e-6 relative moves the result well beyond EQ."""
    T, n = 4, 4
    cfg = tiny_cfg.replace(algo="sgp", topology="ring", workers=n, steps=T, schedule="cosine")
    tr = directed_trainer(cfg, synthetic, push_graph(n))
    X0 = perturb_rows(tr)
    good = reference(tr, X0, T, cfg.lr, push_graph(n))[-1][0]
    wrong = reference(tr, X0, T, cfg.lr, push_graph(n), lr_scale=1 + 1e-6)[-1][0]
    for t in range(T):
        do_step(tr, t)
    got = tr.workers.X.double()
    torch.testing.assert_close(got, good, **EQ)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(got, wrong, **EQ)


@pytest.mark.parametrize("topology", ["ring", "directed-ring", "directed-exp", "one-peer-exp"])
def test_sgp_on_doubly_stochastic_graph_equals_dsgd_atc(tiny_cfg, synthetic, topology):
    """Doubly stochastic W: w stays exactly 1, z = x, and push-sum is D-SGD with --order atc."""
    cfg = tiny_cfg.replace(topology=topology, schedule="cosine", steps=8, workers=4)
    tr = make_trainer(cfg.replace(algo="sgp"), synthetic)
    for t in range(cfg.steps):
        do_step(tr, t)
    assert torch.equal(tr.algo.rule.w, torch.ones(4, 1, dtype=torch.float64))
    X_d = run_steps(cfg.replace(algo="dsgd", order="atc"), synthetic)
    torch.testing.assert_close(tr.workers.X, X_d, **EQ)
    X_cta = run_steps(cfg.replace(algo="dsgd", order="cta"), synthetic)
    assert (X_cta - X_d).abs().max() > 1e-6  # the order matters: SGP is the atc one


class GivenDirection:
    """A local optimizer that returns prescribed directions (to isolate the mixing)."""

    def __init__(self, U):
        self.U = U

    def direction(self, X, G):
        return self.U


def test_push_sum_conserves_sums_and_debiases(tiny_cfg):
    """sum_i x_i changes only by the gradient steps, sum_i w_i = n; with U = 0, z = x / w -> mean of x^0
    while the numerators x_i alone do not reach it (W is not row-stochastic)."""
    n, d = 4, 6
    topo = directed_topology(n)
    rule = component(tiny_cfg.replace(algo="sgp"), "comm", n_local=n, dtype=torch.float64, topology=topo)
    comm = SimulatedComm(n, topo, CPU)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    for t in range(5):
        U, lr = torch.randn(n, d, generator=g, dtype=torch.float64), 0.1 * (t + 1)
        X_next = rule.step(X, torch.zeros_like(X), GivenDirection(U), StepContext(t, lr, 0.5, comm, 0))
        torch.testing.assert_close(X_next.sum(0), X.sum(0) - lr * U.sum(0), rtol=0, atol=1e-13)
        assert float(rule.w.sum()) == pytest.approx(n, abs=1e-14)
        X = X_next
    mean0 = X.mean(0)
    zero = GivenDirection(torch.zeros(n, d, dtype=torch.float64))
    for t in range(5, 200):
        X = rule.step(X, None, zero, StepContext(t, 0.1, 0.1, comm, 0))
    torch.testing.assert_close(X.mean(0), mean0, rtol=0, atol=1e-13)
    torch.testing.assert_close(rule.query(X), mean0.expand(n, d), rtol=0, atol=1e-12)
    assert (X - mean0).abs().max() > 0.05  # the numerators stay biased (Perron weights)


def test_push_sum_rejects_a_worker_that_receives_nothing(tiny_cfg):
    W0 = np.array([[1.0, 1.0], [0.0, 0.0]])  # column-stochastic; worker 1 gets nothing at step 0
    topo = Topology("bad", 2, [W0, W0[::-1].copy()], directed=True)
    with pytest.raises(UserError, match="worker 1 receives nothing at step 0"):
        component(tiny_cfg.replace(algo="sgp"), "comm", n_local=2, topology=topo)


# ----------------------------------------------------------------------------------------------
# cost and runs


def test_bytes_per_step():
    """(d + 1) values per message (x and the scalar w), one message per out-neighbour."""
    d, es = 1000, 4
    rule = component(RunConfig(algo="sgp"), "comm", n_local=4, topology=topologies.get_topology("ring", 4))
    for spec, n, sends in (("directed-exp", 8, 1.0), ("directed-exp", 5, 1.0), ("directed-ring", 6, 1.0),
                           ("ring", 5, 2.0), ("complete", 4, 3.0)):
        topo = topologies.get_topology(spec, n, kind="column")
        assert rule.bytes_per_step(n, topo, d, es) == sends * (d + 1) * es
    # the non-regular graph: out-degrees (3, 1, 1, 1), 1.5 messages per worker on average
    W = push_graph()
    out_degree = [sum(1 for i in range(4) if i != j and W[i, j] > 0) for j in range(4)]
    assert out_degree == [3, 1, 1, 1]
    assert rule.bytes_per_step(4, directed_topology(), d, es) == pytest.approx(np.mean(out_degree) * (d + 1) * es)


@pytest.mark.parametrize("topology,n", [("directed-ring", 4), ("directed-exp", 8), ("directed-exp", 5)])
def test_sgp_runs(tiny_cfg, tmp_path, topology, n):
    cfg = tiny_cfg.replace(algo="sgp", topology=topology, workers=n, steps=6, eval_every=3, precision="fp32")
    s = run(cfg, force=True)
    on_disk = json.loads((tmp_path / "results" / s["run_id"] / "summary.json").read_text())
    assert on_disk["status"] == "completed" and on_disk["algo"] == "sgp" and on_disk["topology"] == topology
    for k in ("test_acc", "test_loss", "train_loss", "consensus_distance"):
        assert math.isfinite(on_disk[k])
    d = ParamLayout(build_model("mlp", (1, 16), 4)).d
    assert on_disk["params"] == d
    assert on_disk["bytes_per_step"] == pytest.approx((d + 1) * 4)  # one out-neighbour, d + 1 float32 values
