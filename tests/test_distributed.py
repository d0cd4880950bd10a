"""The torch.distributed backend (gloo on CPU, local processes) against the simulator.

Processes are expensive here (each imports torch), so one process group per world
size P runs every check: DistComm.mix against W(t) @ X for every registered
topology, the other three calls, and a list of short training runs whose final
model and metrics are compared with simulated runs of the same configuration.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import topologies
from algorithms import PRESETS
from bench.config import RunConfig
from bench.distributed import ENV_VARS, check_procs, init_from_env, launch
from bench.errors import UserError

# float64 runs (precision "fp64"): the simulator and the ranks compute the same operations, except
# all-reduce sums, whose order gloo chooses. In float64 that leaves ~1e-15 relative after 20 steps
# (float32: ~1e-7, machine-dependent); REL = 1e-10 keeps a 1e5 margin and fails any rule or exchange
# plan that is wrong by more than ~1e-9 (a wrong row or weight changes the model by O(1e-2)).
BASE = dict(dataset="synthetic", model="mlp", batch=8, steps=20, lr=0.1, schedule="cosine", hessian=False,
            eval_every=10, device="cpu", dist_timeout=60.0, precision="fp64")
REL = 1e-10
ELEMENT = 8  # bytes of a float64 parameter
ALGOS = tuple(PRESETS.names())  # every registered preset, plug-ins included
GOSSIP_ALGOS = tuple(a for a in ALGOS if RunConfig(algo=a).needs_topology())
GOSSIP_TOPOLOGIES = ("ring", "one-peer-exp")
MIX_TOPOLOGIES = tuple(sorted(set(topologies.TOPOLOGIES) - {"file"}))


def job(algo: str, topology: str, n: int) -> dict:
    return dict(BASE, algo=algo, topology=topology, workers=n)


def jobs_for(P: int) -> list[dict]:
    """Every preset with both world sizes: P = 2 at n = 4 (gossip: on both topologies, so a
    time-varying graph crosses ranks too), P = 4 at n = 8 on the ring."""
    n, topos = (4, GOSSIP_TOPOLOGIES) if P == 2 else (8, ("ring",))
    return [job(a, t, n) for a in ALGOS for t in (topos if a in GOSSIP_ALGOS else ("ring",))]


# ---------------------------------------------------------------------- process helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_env(rank: int, P: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(P), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(P),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)


def start(target, P: int, *args) -> list:
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=target, args=(rank, P, port, *args), daemon=True) for rank in range(P)]
    for p in procs:
        p.start()
    return procs


def join(procs, timeout: float) -> list:
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return codes


# ---------------------------------------------------------------------- the per-P suite
def expected_rows_sent(W: np.ndarray, P: int, r: int) -> int:
    """Rows of rank r's block that some other rank's rows have nonzero weight on (independent count)."""
    n = W.shape[0]
    m = n // P
    total = 0
    for q in range(P):
        if q != r:
            block = W[q * m:(q + 1) * m, r * m:(r + 1) * m]
            total += int((block != 0).any(axis=0).sum())
    return total


def check_calls(rank: int, P: int) -> dict:
    """mix for every topology at n = 8; allreduce_mean, mean and sum at n = 8."""
    from bench.distributed import DistComm

    n, d = 8, 6
    m = n // P
    rows = slice(rank * m, (rank + 1) * m)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    X64 = X
    report = {"mix": {}, "kinds": {}, "bytes_ok": {}}
    for name in MIX_TOPOLOGIES:
        topo = topologies.get_topology(name, n)
        comm = DistComm(n, topo, "cpu")
        assert list(comm.workers) == list(range(n))[rows]
        err, kinds, bytes_ok = 0.0, [], True
        for t in range(2 * topo.period + 1):
            before = comm.bytes_sent
            out = comm.mix(X[rows].clone(), t)
            ref = (torch.from_numpy(topo.weights(t)) @ X64)[rows]
            err = max(err, float((out.double() - ref).abs().max()))
            kind = comm.plan_kind(t)
            kinds.append(kind)
            if kind == "p2p":
                want = expected_rows_sent(topo.weights(t), P, rank) * d * ELEMENT
                bytes_ok &= comm.bytes_sent - before == want
        report["mix"][name] = err
        report["kinds"][name] = sorted(set(kinds))
        report["bytes_ok"][name] = bool(bytes_ok)
    comm = DistComm(n, None, "cpu")
    G = X[rows] * 3
    report["allreduce_mean"] = float((comm.allreduce_mean(G) - (X * 3).mean(0)).abs().max())
    report["mean"] = float((comm.mean(X[rows]) - X.mean(0)).abs().max())
    report["sum"] = float((comm.sum(X[rows].sum()) - X.sum()).abs())
    report["sum_0d_shape"] = list(comm.sum(torch.tensor(1.0)).shape)
    return report


def suite_worker(rank: int, P: int, port: int, jobs: list, sim_jobs: list, out_dir: str) -> None:
    """Checks of the four calls, the distributed runs, then this rank's share of the simulated runs."""
    import datetime

    import torch.distributed as dist

    from bench.distributed import make_comm
    from bench.runner import run

    set_env(rank, P, port)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    report = {"calls": check_calls(rank, P), "runs": [], "sim": {}}
    for j in jobs:
        cfg = RunConfig.from_dict(dict(j, results=str(Path(out_dir, "dist")), backend="dist", procs=P))
        comm = make_comm(cfg)
        s = run(cfg, None, True, comm=comm)
        report["runs"].append({k: s[k] for k in SUMMARY_KEYS}
                              | {"bytes_per_process": comm.bytes_sent_per_process_step(cfg.steps),
                                 "bytes_per_worker": comm.bytes_sent_per_worker_step(cfg.steps),
                                 "predicted": s["bytes_per_step"]})
    dist.destroy_process_group()
    for j in sim_jobs[rank::P]:
        s = run(RunConfig.from_dict(dict(j, results=str(Path(out_dir, "sim")))), None, True)
        report["sim"][s["run_id"]] = {k: s[k] for k in SUMMARY_KEYS + ("workers", "params")}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))


SUMMARY_KEYS = ("algo", "topology", "run_id", "test_acc", "test_loss", "train_acc", "train_loss", "consensus_distance", "backend",
                "world_size", "status")


@pytest.fixture(scope="module")
def suites(tmp_path_factory):
    """{P: report} for P = 2 and 4; the P = 2 processes also run the simulated reference of every job."""
    out = {}
    sim_jobs = list({json.dumps(j, sort_keys=True): j for P in (2, 4) for j in jobs_for(P)}.values())
    for P in (2, 4):
        d = tmp_path_factory.mktemp(f"suite{P}")
        t0 = time.monotonic()
        codes = join(start(suite_worker, P, jobs_for(P), sim_jobs if P == 2 else [], str(d)), timeout=400)
        assert codes == [0] * P, f"P={P}: ranks exited with {codes}"
        reports = [json.loads((d / f"rank{r}.json").read_text()) for r in range(P)]
        out[P] = {"P": P, "reports": reports, "dist": d / "dist", "seconds": time.monotonic() - t0}
    sim = {k: v for rep in out[2]["reports"] for k, v in rep["sim"].items()}
    for P in out:
        out[P]["sim"], out[P]["sim_dir"] = sim, out[2]["dist"].parent / "sim"
    return out


@pytest.fixture(params=[2, 4], ids=lambda P: f"P{P}")
def suite(request, suites):
    return suites[request.param]


def test_mix_equals_dense_product(suite):
    for rank, rep in enumerate(suite["reports"]):
        calls = rep["calls"]
        assert set(calls["mix"]) == set(MIX_TOPOLOGIES)
        for name, err in calls["mix"].items():
            assert err < 1e-13, f"P={suite['P']} rank {rank} {name}: max error {err}"  # a few float64 ulps
            assert calls["bytes_ok"][name], f"P={suite['P']} rank {rank} {name}: bytes sent miscounted"
        assert calls["kinds"]["complete"] == ["mean"]
        assert calls["kinds"]["ring"] == ["p2p"]
        assert calls["kinds"]["one-peer-exp"] == ["p2p"]
        assert calls["kinds"]["exponential"] == ["gather"]  # every rank needs rows of every other, k > n/2


def test_allreduce_mean_sum(suite):
    for rep in suite["reports"]:
        c = rep["calls"]
        # sums of 8 O(1) float64 numbers in another order: a few ulps
        assert c["allreduce_mean"] < 1e-13 and c["mean"] < 1e-13 and c["sum"] < 1e-12
        assert c["sum_0d_shape"] == []


def _flat(path: Path) -> torch.Tensor:
    sd = torch.load(path, map_location="cpu")
    return torch.cat([v.reshape(-1).double() for k, v in sorted(sd.items()) if v.is_floating_point()])


@pytest.mark.parametrize("P,algo", [(P, a) for P in (2, 4) for a in ALGOS if any(j["algo"] == a for j in jobs_for(P))])
def test_training_matches_simulator(suites, P, algo):
    suite = suites[P]
    sim_root, sim = suite["sim_dir"], suite["sim"]
    runs = [r for r in suite["reports"][0]["runs"] if r["algo"] == algo]
    assert len(runs) == sum(j["algo"] == algo for j in jobs_for(P))
    for r in runs:
        s = sim[r["run_id"]]
        assert r["status"] == s["status"] == "completed"
        assert r["backend"] == "dist" and r["world_size"] == suite["P"]
        a = _flat(suite["dist"] / r["run_id"] / "model.pt")
        b = _flat(sim_root / r["run_id"] / "model.pt")
        rel = float((a - b).norm() / b.norm())
        assert rel < REL, f"{r['run_id']} P={suite['P']}: parameters differ by {rel:.2e} (relative)"
        assert r["test_acc"] == s["test_acc"] and r["train_acc"] == s["train_acc"], r["run_id"]
        assert r["test_loss"] == pytest.approx(s["test_loss"], rel=REL)
        assert r["train_loss"] == pytest.approx(s["train_loss"], rel=REL)
        # a squared distance between nearly equal models: relative error ~ REL / (its size), floored
        assert r["consensus_distance"] == pytest.approx(s["consensus_distance"], rel=1e-6, abs=1e-14)


def test_bytes_sent_recorded(suite):
    """Per worker, every preset's messages (counted as if each worker were its own process) are the
    prediction; per process, what really crossed: on the ring a rank sends 2 rows a step (its first row one
    way, its last the other); all-reduce sends its ring volume 2 (P - 1) / P of the buffer."""
    P, sim = suite["P"], suite["sim"]
    for r in suite["reports"][0]["runs"]:
        assert r["bytes_per_worker"] == pytest.approx(r["predicted"], rel=1e-12), r["algo"]
        s = sim[r["run_id"]]
        model_bytes = s["params"] * ELEMENT
        if r["algo"] == "dsgd" and r["topology"] == "ring":
            assert r["bytes_per_process"] == pytest.approx(2 * model_bytes)
        if r["algo"] == "csgd":
            assert r["bytes_per_process"] == pytest.approx(2 * (P - 1) / P * model_bytes)


def test_every_combination_covered():
    """Each registered preset with both P; the gossip ones on both topologies at P = 2."""
    seen = {(j["algo"], j["topology"], j["workers"], P) for P in (2, 4) for j in jobs_for(P)}
    for algo in PRESETS:
        assert {P for a, _, _, P in seen if a == algo} == {2, 4}, algo
    assert {t for a, t, _, P in seen if P == 2 and a in GOSSIP_ALGOS} == set(GOSSIP_TOPOLOGIES)
    assert {n for *_, n, _ in seen} == {4, 8}


# ---------------------------------------------------------------------- failures
def failing_worker(rank: int, P: int, port: int, cfg_dict: dict, mode: str) -> None:
    """Rank 1 dies (mode 'exit') or hangs (mode 'hang') at step 5; the others run the real path."""
    from bench.distributed import run_distributed
    from bench.runner import run

    set_env(rank, P, port)
    cfg = RunConfig.from_dict(cfg_dict)
    if rank != 1:
        run_distributed(cfg, None, True)
        return

    def hook(step, total, info):
        if step == 5:
            if mode == "exit":
                os._exit(1)
            time.sleep(3600)

    comm = init_from_env(cfg)
    run(cfg, hook, True, comm=comm)


@pytest.mark.parametrize("mode", ["exit", "hang"])
def test_lost_rank_fails_the_others(tmp_path, mode):
    cfg = dict(BASE, algo="dsgd", topology="ring", workers=4, steps=200, eval_every=1000, dist_timeout=10.0,
               results=str(tmp_path / "results"), backend="dist", procs=2)
    t0 = time.monotonic()
    procs = start(failing_worker, 2, cfg, mode)
    codes = join(procs[:1], timeout=60)
    elapsed = time.monotonic() - t0
    join(procs[1:], timeout=0)
    assert codes[0] is not None, f"rank 0 still running after {elapsed:.0f}s ({mode})"
    assert codes[0] != 0
    assert elapsed < 60


# ---------------------------------------------------------------------- the launcher
def test_launch_matches_simulator(tmp_path):
    """The elastic launcher, two seeds in one process group; seed 0 against the simulator."""
    from bench.runner import run

    cfg = RunConfig.from_dict(dict(BASE, algo="dsgd", topology="one-peer-ring", workers=4, steps=10,
                                   results=str(tmp_path / "dist")))
    out = launch([cfg, cfg.replace(seed=1)], 2, progress=False)
    assert [s["seed"] for s in out] == [0, 1]
    for s in out:
        assert s["backend"] == "dist" and s["world_size"] == 2 and s["status"] == "completed"
    s = out[0]
    ref = run(cfg.replace(results=str(tmp_path / "sim")), force=True)
    assert s["run_id"] == ref["run_id"]
    a, b = _flat(Path(s["run_dir"]) / "model.pt"), _flat(Path(ref["run_dir"]) / "model.pt")
    assert float((a - b).norm() / b.norm()) < REL
    assert s["test_acc"] == ref["test_acc"]


# ---------------------------------------------------------------------- user errors (no processes)
def test_procs_must_divide_workers(tmp_path):
    with pytest.raises(UserError, match="1, 2, 4, 8"):
        check_procs(8, 3)
    cfg = RunConfig.from_dict(dict(BASE, workers=8, results=str(tmp_path)))
    t0 = time.monotonic()
    with pytest.raises(UserError, match="divides --workers 8"):
        launch(cfg, 3)
    assert time.monotonic() - t0 < 5  # nothing was started


def test_dist_backend_needs_torchrun_env(monkeypatch, tmp_path):
    for k in ENV_VARS:
        monkeypatch.delenv(k, raising=False)
    cfg = RunConfig.from_dict(dict(BASE, workers=4, backend="dist", results=str(tmp_path)))
    with pytest.raises(UserError, match="torchrun"):
        init_from_env(cfg)


def test_world_size_must_divide_workers(monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    cfg = RunConfig.from_dict(dict(BASE, workers=8, backend="dist", results=str(tmp_path)))
    with pytest.raises(UserError, match="1, 2, 4, 8"):
        init_from_env(cfg)
