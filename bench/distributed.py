"""The torch.distributed backend: n workers split over P processes.

Rank r holds the consecutive block of global workers [r*m, (r+1)*m), m = n / P, as
the rows of its X [m, d]; algorithms see the same four calls as with SimulatedComm:

  allreduce_mean(G)  all_reduce(SUM) of the local row sum, / n, on every local row
  mix(X, t)          (W(t) X) for the local rows:
                       sparse W  - batch_isend_irecv of exactly the rows other ranks
                                   need, then the gather-form sum over [local rows |
                                   received rows] (the simulator's Mixer, same order)
                       uniform W - a plain mean: all_reduce of the local row sum
                       dense W   - all_gather of every block, then the gather-form sum
                                   (dense: every rank needs rows of every other rank and
                                   rows of W have more than n/2 nonzeros)
  mean(X)            x_bar [d]: all_reduce of the local row sum, / n
  sum(v)             all_reduce(SUM) of a copy of v

Exchange plans are computed from the topology alone, so every rank derives the same
send and receive lists (matched, never a send without its receive); one plan
per t mod period, built at construction. Every communicating pair is exercised once at
construction, after one collective, because NCCL creates its communicators lazily.

Launch: `torchrun --nproc-per-node P -m dsgdbench run ... --backend dist` (every
rank runs the CLI; init_from_env reads torchrun's environment), or `launch(cfg, P)`,
which starts P local processes through torch's elastic launcher and returns rank
0's summary; process_group() holds one group for several runs (seeds). gloo on CPU, NCCL on CUDA (rank on cuda:LOCAL_RANK). The timeout given
to init_process_group (cfg.dist_timeout) bounds every collective: a rank that dies
or hangs makes the others fail instead of waiting forever.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from bench.config import RunConfig
from bench.comm import allreduce_bytes, messages
from bench.errors import RunFailed, UserError

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
NEED_TORCHRUN = ("--backend dist needs torchrun's environment (RANK, WORLD_SIZE, ...): launch with "
                 "`torchrun --nproc-per-node P -m dsgdbench run ... --backend dist` or use --procs P")


def _divisors(n: int) -> list[int]:
    return [p for p in range(1, n + 1) if n % p == 0]


def check_procs(workers: int, procs: int) -> None:
    """Raise a one-line UserError unless procs is a positive divisor of workers."""
    if isinstance(procs, bool) or not isinstance(procs, int) or procs < 1:
        raise UserError(f"--procs must be a positive integer (got {procs})")
    if workers % procs:
        raise UserError(f"{procs} processes cannot split {workers} workers evenly; use a process count "
                        f"that divides --workers {workers}: {', '.join(map(str, _divisors(workers)))}")


def _ring_allreduce_bytes(numel: int, element_size: int, P: int) -> float:
    """What one rank sends in a ring all-reduce of numel elements: 2 (P-1)/P of the buffer."""
    return 2.0 * (P - 1) / P * numel * element_size


@dataclass
class _Plan:
    kind: str  # "p2p" | "mean" | "gather"
    idx: Optional[torch.Tensor] = None  # [m, k] rows of the buffer the sum reads (ext for p2p, full for gather)
    w: Optional[torch.Tensor] = None  # [m, k] float64 weights, column 0 the diagonal
    sends: list = field(default_factory=list)  # [(peer rank, local row indices tensor)]
    recvs: list = field(default_factory=list)  # [(peer rank, first row in ext, row count)]
    ext_rows: int = 0
    rows_sent: int = 0
    _cast: dict = field(default_factory=dict)

    def weights(self, dtype) -> torch.Tensor:
        """w in the dtype of the rows it multiplies (float32 runs: the simulator's float32 weights)."""
        if dtype not in self._cast:
            self._cast[dtype] = self.w.to(dtype)
        return self._cast[dtype]


def exchange_lists(W, P: int) -> list[list[np.ndarray]]:
    """need[r][s]: sorted global rows of rank s's block that rank r's rows have nonzero weight on.

    W: the topology's scipy.sparse matrix (Topology.sparse(t)) or a dense array; O(nnz log nnz) for a
    sparse one, never densified.
    """
    from topologies.base import nonzero_entries

    n = W.shape[0]
    m = n // P
    i, j = nonzero_entries(W)
    inside = (i < P * m) & (j < P * m)  # as the dense slicing: rows and columns of the P blocks only
    i, j = i[inside], j[inside]
    r, s = (i // m, j // m) if m else (i, j)
    cross = r != s
    span = max(n, 1)
    key = np.unique((r[cross] * P + s[cross]) * span + j[cross])  # sorted by (r, s, j), distinct
    rs, cols = key // span, key % span
    bounds = np.searchsorted(rs, np.arange(P * P + 1))  # need[a][b] is the run of rs == a * P + b
    need: list[list[np.ndarray]] = []
    for a in range(P):
        per = []
        for b in range(P):
            per.append(cols[bounds[a * P + b]:bounds[a * P + b + 1]].astype(np.int64))
        need.append(per)
    return need


class DistComm:
    """A block of n / world_size consecutive workers on this rank (torch.distributed)."""

    backend = "dist"

    def __init__(self, n: int, topology, device, group=None):
        if not dist.is_initialized():
            raise RuntimeError("DistComm needs an initialized process group (see init_from_env)")
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        check_procs(n, self.world_size)
        self.n = n
        self.m = n // self.world_size
        self.lo = self.rank * self.m
        self.workers = range(self.lo, self.lo + self.m)
        self.topology = topology
        self.device = torch.device(device)
        self._plans: dict[int, _Plan] = {}
        self.bytes_sent = 0.0  # by allreduce_mean and mix (the algorithm's communication), this process
        self.logical_bytes = 0.0  # the local workers' messages as if each worker were its own process
        self._counts: dict = {}
        self.comm_calls = 0
        if topology is not None:
            if topology.n != n:
                raise ValueError(f"topology of {topology.n} workers for n={n}")
            for key in range(topology.period):
                self._plans[key] = self._build_plan(key)
        self._warm_up()

    def __repr__(self) -> str:
        return (f"DistComm(rank={self.rank}/{self.world_size}, workers={self.lo}..{self.lo + self.m - 1} "
                f"of {self.n}, {dist.get_backend(self.group)})")

    # ------------------------------------------------------------------ plans
    def _peer(self, s: int) -> int:
        return s if self.group is None else dist.get_global_rank(self.group, s)

    def _build_plan(self, key: int) -> _Plan:
        topo, P, m, r, lo = self.topology, self.world_size, self.m, self.rank, self.lo
        if topo.is_uniform(key):
            return _Plan("mean")
        idx, w = topo.neighbors(key)
        idx, w = idx[lo:lo + m], w[lo:lo + m]
        w_t = torch.as_tensor(w, dtype=torch.float64, device=self.device)
        need = exchange_lists(topo.sparse(key), P)
        every_pair = all(len(need[a][b]) for a in range(P) for b in range(P) if a != b)
        if P > 1 and every_pair and idx.shape[1] > self.n / 2:
            # Dense: every rank needs rows of every other and rows have > n/2 nonzeros;
            # one all_gather moves about what point-to-point exchange would.
            return _Plan("gather", torch.as_tensor(idx, device=self.device), w_t,
                         rows_sent=(P - 1) * m)
        # Extended buffer: [local rows | rows received from rank s, for s ascending].
        pos = np.full(self.n, -1, dtype=np.int64)
        pos[lo:lo + m] = np.arange(m)
        off, recvs = m, []
        for s in range(P):
            rows = need[r][s]
            if len(rows):
                pos[rows] = off + np.arange(len(rows))
                recvs.append((self._peer(s), off, len(rows)))
                off += len(rows)
        local_idx = np.where(w != 0, pos[idx], np.arange(m)[:, None])
        if (local_idx < 0).any():
            raise AssertionError("exchange plan misses a row with nonzero weight")
        sends = []
        for q in range(P):
            rows = need[q][r]
            if len(rows):
                sends.append((self._peer(q), torch.as_tensor(rows - lo, device=self.device)))
        return _Plan("p2p", torch.as_tensor(local_idx, device=self.device), w_t, sends, recvs,
                     ext_rows=off, rows_sent=sum(len(t) for _, t in sends))

    def plan_kind(self, t: int) -> str:
        return self._plans[t % self.topology.period].kind

    def _warm_up(self) -> None:
        """One collective, then one tiny exchange between every pair that will ever talk."""
        x = torch.ones(1, device=self.device)
        dist.all_reduce(x, group=self.group)
        send_to, recv_from = set(), set()
        for p in self._plans.values():
            send_to.update(peer for peer, _ in p.sends)
            recv_from.update(peer for peer, _, _ in p.recvs)
        if send_to or recv_from:
            bufs = {peer: torch.empty(1, device=self.device) for peer in sorted(recv_from)}
            ops = [dist.P2POp(dist.isend, x, peer, self.group) for peer in sorted(send_to)]
            ops += [dist.P2POp(dist.irecv, b, peer, self.group) for peer, b in bufs.items()]
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        dist.barrier(group=self.group, **({"device_ids": [self.device.index]}
                                          if self.device.type == "cuda" and self.device.index is not None else {}))

    # ------------------------------------------------------------------ the four calls
    def _global_sum(self, X: torch.Tensor) -> torch.Tensor:
        s = X.sum(0)
        dist.all_reduce(s, group=self.group)
        return s

    def allreduce_mean(self, G: torch.Tensor) -> torch.Tensor:
        self.logical_bytes += self.m * allreduce_bytes(G[0].numel() * G.element_size(), self.n)
        g = self._global_sum(G).div_(self.n)
        self.bytes_sent += _ring_allreduce_bytes(g.numel(), g.element_size(), self.world_size)
        self.comm_calls += 1
        return g.unsqueeze(0).expand_as(G)

    def mix(self, X: torch.Tensor, t: int) -> torch.Tensor:
        p = self._plans[t % self.topology.period]
        self.comm_calls += 1
        d, es = X.shape[1], X.element_size()
        self.logical_bytes += self._messages(t) * d * es
        if p.kind == "mean":
            g = self._global_sum(X).div_(self.n)
            self.bytes_sent += _ring_allreduce_bytes(g.numel(), es, self.world_size)
            return g.unsqueeze(0).expand_as(X).clone()
        if p.kind == "gather":
            buf = torch.empty(self.n, d, dtype=X.dtype, device=X.device)
            dist.all_gather_into_tensor(buf, X.contiguous(), group=self.group)
            local = buf[self.lo:self.lo + self.m]
        else:
            buf = torch.empty(p.ext_rows, d, dtype=X.dtype, device=X.device)
            local = buf[:self.m]
            local.copy_(X)
            if p.sends or p.recvs:
                ops = [dist.P2POp(dist.isend, X.index_select(0, rows), peer, self.group) for peer, rows in p.sends]
                ops += [dist.P2POp(dist.irecv, buf[a:a + c], peer, self.group) for peer, a, c in p.recvs]
                for work in dist.batch_isend_irecv(ops):
                    work.wait()
        self.bytes_sent += p.rows_sent * d * es
        w = p.weights(X.dtype)
        out = local * w[:, :1]  # column 0 is the diagonal
        for s in range(1, p.idx.shape[1]):
            out.addcmul_(buf.index_select(0, p.idx[:, s]), w[:, s:s + 1])
        return out

    def mix_payload(self, payload: dict, decode, t: int) -> torch.Tensor:
        """W(t) decode(payload) for the local rows; only the payload's rows travel (counted as sent).

        Every payload tensor has one row per local worker ([m, ...]); decode maps a dict of such
        rows (any count k) to dense rows [k, d]. The rows a peer needs go point-to-point (or all
        are gathered for a dense W), are decoded on arrival and summed with W's weights.
        """
        p = self._plans[t % self.topology.period]
        self.comm_calls += 1
        names = sorted(payload)
        self.logical_bytes += self._messages(t) * sum(v[0].numel() * v.element_size() for v in payload.values())
        if p.kind in ("mean", "gather"):
            full = {}
            for k in names:
                v = payload[k].contiguous()
                buf = torch.empty((self.n, *v.shape[1:]), dtype=v.dtype, device=v.device)
                dist.all_gather_into_tensor(buf, v, group=self.group)
                full[k] = buf
                self.bytes_sent += (self.world_size - 1) * v.numel() * v.element_size()
            dense = decode(full)
            if p.kind == "mean":
                return dense.mean(0, keepdim=True).expand(self.m, -1).clone()
            local = dense[self.lo:self.lo + self.m]
            buf = dense
        else:
            ext = {}
            for k in names:
                v = payload[k]
                b = torch.empty((p.ext_rows, *v.shape[1:]), dtype=v.dtype, device=v.device)
                b[:self.m].copy_(v)
                ext[k] = b
            if p.sends or p.recvs:
                ops = []
                for k in names:
                    v, b = payload[k], ext[k]
                    for peer, rows in p.sends:
                        msg = v.index_select(0, rows)
                        self.bytes_sent += msg.numel() * msg.element_size()
                        ops.append(dist.P2POp(dist.isend, msg, peer, self.group))
                    ops += [dist.P2POp(dist.irecv, b[a:a + c], peer, self.group) for peer, a, c in p.recvs]
                for work in dist.batch_isend_irecv(ops):
                    work.wait()
            buf = decode(ext)
            local = buf[:self.m]
        w = p.weights(buf.dtype)
        out = local * w[:, :1]
        for s in range(1, p.idx.shape[1]):
            out.addcmul_(buf.index_select(0, p.idx[:, s]), w[:, s:s + 1])
        return out

    def mean(self, X: torch.Tensor) -> torch.Tensor:
        return self._global_sum(X).div_(self.n)

    def sum(self, v: torch.Tensor) -> torch.Tensor:
        out = v.detach().clone().contiguous()
        flat = out.view(-1) if out.dim() == 0 else out
        dist.all_reduce(flat, group=self.group)
        return out

    # ------------------------------------------------------------------ cost
    def _messages(self, t: int) -> int:
        """Messages the local rows of W(t) receive (as the simulator counts them)."""
        return messages(self.topology, self._counts, t, self.workers)

    def bytes_sent_per_worker_step(self, steps: Optional[int] = None) -> float:
        """Bytes of the local workers' messages per worker and step, as if every worker were its own
        process: the unit of the prediction bytes_per_step, equal to it for every rule."""
        steps = self.comm_calls if steps is None else steps
        return self.logical_bytes / (steps * self.m) if steps else 0.0

    def bytes_sent_per_process_step(self, steps: Optional[int] = None) -> float:
        """What this process sent per step: point-to-point rows counted exactly (rows x d x element
        size, only the rows another process needs), collectives by the ring algorithm's volume: 2 (P-1)/P
        of the buffer for an all-reduce, (P-1) blocks for an all_gather."""
        steps = self.comm_calls if steps is None else steps
        return self.bytes_sent / steps if steps else 0.0


# ---------------------------------------------------------------------- process setup
def _backend_for(cfg: RunConfig) -> str:
    return "nccl" if cfg.device == "cuda" else "gloo"


def _topology(cfg: RunConfig):
    """cfg's topology when its communication rule gossips, else None."""
    return cfg.build_topology()


def make_comm(cfg: RunConfig) -> DistComm:
    """A DistComm for cfg on an already initialized process group."""
    topo = _topology(cfg)
    if cfg.device == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return DistComm(cfg.workers, topo, device)


def under_torchrun() -> bool:
    """True when torchrun (or another launcher) set this process's rank environment."""
    return all(k in os.environ for k in ENV_VARS)


def _join(cfg: RunConfig) -> bool:
    """Join torchrun's process group unless already in one; True when this call created it."""
    if not under_torchrun():
        raise UserError(NEED_TORCHRUN)
    cfg.validate()
    world, local_rank = int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    check_procs(cfg.workers, world)
    kw: dict[str, Any] = {}
    if cfg.device == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available here; use --device cpu")
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices; "
                            f"use at most {torch.cuda.device_count()} processes per node")
        torch.cuda.set_device(local_rank)
        kw["device_id"] = torch.device("cuda", local_rank)
    if dist.is_initialized():
        return False
    # The timeout bounds every collective and point-to-point wait, not only the rendezvous.
    dist.init_process_group(_backend_for(cfg), timeout=datetime.timedelta(seconds=cfg.dist_timeout), **kw)
    return True


def init_from_env(cfg: RunConfig) -> DistComm:
    """Join the process group described by torchrun's environment; return this rank's DistComm."""
    _join(cfg)
    return make_comm(cfg)


@contextlib.contextmanager
def process_group(cfg: RunConfig):
    """Hold one process group for several runs (seeds), then leave it.

    Runs inside reuse the group; tearing a group down and creating the next on the
    same MASTER_PORT between runs races (a fast rank can reach the old store).
    """
    created = _join(cfg)
    try:
        yield
    finally:
        if created:
            dist.destroy_process_group()


def run_distributed(cfg: RunConfig, progress=None, force: bool = False) -> Optional[dict]:
    """Train cfg as one rank of a torchrun job; rank 0 returns the summary, the others None.

    Joins the process group (unless inside process_group(), whose group it reuses)
    and leaves it at the end, also when the run fails.
    """
    from bench.runner import run

    created = _join(cfg)
    try:
        comm = make_comm(cfg)
        summary = run(cfg, progress if comm.rank == 0 else None, force, comm=comm)
        return summary if comm.rank == 0 else None
    finally:
        if created:
            dist.destroy_process_group()


# ---------------------------------------------------------------------- local launcher
def _limit_threads() -> None:
    """P processes share the machine's cores (torchrun sets OMP_NUM_THREADS=1 likewise)."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def _progress_printer(cfg: RunConfig):
    def show(step: int, total: int, info: dict) -> None:
        if step == 1 or step == total or step % max(1, total // 10) == 0:
            acc = f"  test acc {info['test_acc']:.2f}%" if info.get("test_acc") is not None else ""
            print(f"{cfg.algo} {cfg.topology} seed {cfg.seed}: step {step}/{total}  loss {info['loss']:.4f}{acc}",
                  flush=True)  # stdout: the ranks' stderr goes to their log files (launch)

    return show


def _entry(cfg_dicts: list, force: bool, show_progress: bool):
    """What every launched process runs (module level, so that spawn can pickle it)."""
    _limit_threads()
    cfgs = [RunConfig.from_dict(d) for d in cfg_dicts]
    try:
        with process_group(cfgs[0]):
            return [run_distributed(c, _progress_printer(c) if show_progress else None, force) for c in cfgs]
    except UserError as e:
        return {"user_error": str(e)}


def describe_failure(e, timeout: float) -> str:
    """One line for a failed job: the first rank that failed, and how (signal or exit code)."""
    rank, f = e.get_first_failure()
    if f.exitcode is not None and f.exitcode < 0:
        how = f"was killed by {f.signal_name()}"
    else:
        how = f"exited with code {f.exitcode}"
        lines = [ln.strip() for ln in str(getattr(f, "message", "") or "").splitlines() if ln.strip()]
        if lines and isinstance(f.message, str):
            how += f" ({lines[-1][:200]})"
    others = len(e.failures) - 1
    return (f"rank {rank} {how}; {'the other ranks stopped' if others else 'the job stopped'} (a rank that "
            f"stops answering fails the others after --dist-timeout {timeout:g} s); the last checkpoint is kept: "
            f"run the same command again to resume")


def launch(cfg, procs: int, force: bool = False, progress: bool = True):
    """Run cfg on procs local processes and return rank 0's summary.

    cfg is a RunConfig or its dict, or a list of them (seeds; one process group
    runs them in turn and a list of summaries comes back). Uses torch's elastic
    launcher (what torchrun runs) with a c10d rendezvous on 127.0.0.1 and a free
    port. A failing rank makes the launcher stop the others and raise
    torch.distributed.elastic.multiprocessing.errors.ChildFailedError; a UserError
    inside the ranks is raised here as a UserError.
    """
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    many = isinstance(cfg, (list, tuple))
    cfgs = [c if isinstance(c, RunConfig) else RunConfig.from_dict(c) for c in (cfg if many else [cfg])]
    if not cfgs:
        return []
    cfgs = [c.replace(backend="dist", procs=procs) for c in cfgs]
    for c in cfgs:
        c.validate()
        check_procs(c.workers, procs)
        _topology(c)  # a bad topology spec fails here, once
    if len({(c.device, c.dist_timeout) for c in cfgs}) > 1:
        raise ValueError("runs launched together must share device and dist_timeout")
    first = cfgs[0]
    if first.device == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available here; use --device cpu")
        if torch.cuda.device_count() < procs:
            raise UserError(f"--procs {procs} with --device cuda needs {procs} GPUs; "
                            f"this machine has {torch.cuda.device_count()}")
    import logging
    import tempfile

    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std

    # The ranks' stderr (warnings, the traceback of a rank that fails) goes to log files, so that a failure
    # is the one line of RunFailed; the launcher's own log records are silenced likewise.
    log_dir = tempfile.mkdtemp(prefix="dsgdbench-ranks-")
    for name in ("torch.distributed.elastic", "torch.multiprocessing"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    config = LaunchConfig(
        logs_specs=DefaultLogsSpecs(log_dir=log_dir, redirects=Std.ERR),
        min_nodes=1, max_nodes=1, nproc_per_node=procs,
        rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", local_addr="127.0.0.1",
        rdzv_configs={"timeout": int(max(60, first.dist_timeout))},
        run_id=f"dsgdbench-{uuid.uuid4().hex[:12]}",
        max_restarts=0, monitor_interval=0.2, start_method="spawn", shutdown_timeout=5,
    )
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        outputs = elastic_launch(config, _entry)([c.to_dict() for c in cfgs], force, progress)
    except ChildFailedError as e:
        raise RunFailed(f"{describe_failure(e, first.dist_timeout)} (the ranks' logs: {log_dir})") from None
    shutil.rmtree(log_dir, ignore_errors=True)  # kept only when a rank failed (named in that error)
    errors = [o["user_error"] for o in outputs.values() if isinstance(o, dict) and "user_error" in o]
    if errors:
        raise UserError(errors[0])
    summaries = outputs[0]
    return summaries if many else summaries[0]
