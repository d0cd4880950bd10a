"""Communication backends: what the algorithms may ask of the other workers.

Algorithms are written against this object, never against "all workers are
here": they see only the local block X [n_local, d] and call

  allreduce_mean(G)  -> every row replaced by the mean over ALL workers
  mix(X, t)          -> (W(t) X) for the local rows
  mix_payload(P, decode, t) -> W(t) decode(P): the same for messages that are not the
                        rows themselves (compressed: values + indices); each payload
                        tensor has one row per local worker, decode maps rows to [k, d]
  mean(X)            -> x_bar [d], the mean over all workers (evaluation: not counted as traffic)
  sum(v)             -> a tensor summed over all workers' contributions

Simulated: all n workers live in this process (n_local = n). The distributed
backend (torch.distributed) implements the same four calls for a block of
n / world_size workers per rank.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from topologies import Topology


class Mixer:
    """W(t) in gather form, on the device: (W X)_i = sum_s w[i, s] * X[idx[i, s]].

    The sum runs over the slots s in order (column 0 the diagonal, then the neighbours by
    ascending index), one multiply-add per slot on [n, d]: never a dense n x n product. A slot
    whose neighbour index is i + c for blocks of consecutive rows (a ring, a torus, the
    exponential graphs: a few blocks, at the wraparounds) is added block by block from slices
    of X, in place, with no [n, d] temporary, when the blocks are large enough for the call
    overhead not to matter (BLOCK_BYTES of X per block on average); any other slot gathers its
    rows into a scratch buffer kept between calls. Both do the same floating-point operations in the same order as a
    plain index_select, so the results are bit for bit the same. The complete graph is a plain
    mean. Plans are cached per (t mod period, dtype).
    """

    BLOCK_BYTES = 16384  # a slot is added block by block when its blocks hold this much of X on average

    def __init__(self, topology: Topology, device):
        self.topology = topology
        self.device = device
        self._plans: dict[tuple, tuple] = {}
        self._scratch: Optional[torch.Tensor] = None

    def plan(self, t: int, dtype=torch.float32):
        key = (t % self.topology.period, dtype)
        p = self._plans.get(key)
        if p is None:
            if self.topology.is_uniform(key[0]):
                p = ("mean", None, None, None)
            else:
                idx, w = self.topology.neighbors(key[0])
                slots = [_runs(idx[:, s], len(idx) // 2) for s in range(1, idx.shape[1])]
                p = ("gather", torch.as_tensor(idx, device=self.device),
                     torch.as_tensor(w, dtype=dtype, device=self.device), slots)  # weights in X's dtype
            self._plans[key] = p
        return p

    def __call__(self, X: torch.Tensor, t: int) -> torch.Tensor:
        kind, idx, w, slots = self.plan(t, X.dtype)
        if kind == "mean":
            return X.mean(0, keepdim=True).expand_as(X).clone()
        out = X * w[:, :1]  # column 0 is the diagonal
        size = X.numel() * X.element_size()
        for s, runs in enumerate(slots, start=1):
            ws = w[:, s:s + 1]
            if runs is not None and len(runs) * self.BLOCK_BYTES <= size:
                for a, b, src in runs:
                    out[a:b].addcmul_(X[src:src + b - a], ws[a:b])
            else:
                buf = self._buffer(X)
                torch.index_select(X, 0, idx[:, s], out=buf)
                out.addcmul_(buf, ws)
        return out

    def _buffer(self, X: torch.Tensor) -> torch.Tensor:
        if self._scratch is None or self._scratch.shape != X.shape or self._scratch.dtype != X.dtype \
                or self._scratch.device != X.device:
            self._scratch = torch.empty_like(X)
        return self._scratch


def _runs(col: np.ndarray, limit: int) -> Optional[list[tuple[int, int, int]]]:
    """(row_start, row_stop, source_start) blocks where col[r] = source_start + (r - row_start); None if more
    than `limit` blocks (the slot is gathered instead)."""
    n = len(col)
    if n == 0:
        return []
    shift = col - np.arange(n)
    cuts = np.flatnonzero(np.diff(shift)) + 1
    if len(cuts) + 1 > limit:
        return None
    starts = np.concatenate(([0], cuts))
    stops = np.concatenate((cuts, [n]))
    return [(int(a), int(b), int(col[a])) for a, b in zip(starts, stops)]


def allreduce_bytes(row_bytes: float, n: int) -> float:
    """What one of n participants sends in a ring all-reduce of a buffer of row_bytes: 2 (n - 1) / n of it."""
    return 2.0 * (n - 1) / n * row_bytes


def messages(topology: Topology, cache: dict, t: int, rows) -> int:
    """Messages the given rows of W(t) receive (off-diagonal nonzeros; the complete graph: n - 1 each).
    cache: a dict kept by the caller (counts per t mod period)."""
    k = t % topology.period
    if topology.is_uniform(k):
        return len(rows) * (topology.n - 1)
    if k not in cache:
        idx, w = topology.neighbors(k)
        cache[k] = (w[:, 1:] != 0).sum(axis=1)
    return int(cache[k][rows.start:rows.stop].sum())


class SimulatedComm:
    """All n workers in one process."""

    backend = "simulated"
    world_size = 1
    rank = 0

    def __init__(self, n: int, topology: Topology | None, device):
        self.n = n
        self.workers = range(n)  # global ids of the local workers
        self.mixer = Mixer(topology, device) if topology is not None else None
        self.logical_bytes = 0.0  # what the workers' messages hold, as if each were its own process
        self._counts: dict = {}

    def allreduce_mean(self, G: torch.Tensor) -> torch.Tensor:
        self.logical_bytes += self.n * allreduce_bytes(G[0].numel() * G.element_size(), self.n)
        return G.mean(0, keepdim=True).expand_as(G)

    def mix(self, X: torch.Tensor, t: int) -> torch.Tensor:
        row = X[0].numel() * X.element_size()
        self.logical_bytes += messages(self.mixer.topology, self._counts, t, range(self.n)) * row
        return self.mixer(X, t)

    def mix_payload(self, payload: dict, decode, t: int) -> torch.Tensor:
        row = sum(v[0].numel() * v.element_size() for v in payload.values())
        self.logical_bytes += messages(self.mixer.topology, self._counts, t, range(self.n)) * row
        return self.mixer(decode(payload), t)

    def bytes_sent_per_worker_step(self, steps: int) -> float:
        """Bytes of the algorithm's messages per worker and step (every worker its own process)."""
        return self.logical_bytes / (steps * self.n) if steps else 0.0

    def mean(self, X: torch.Tensor) -> torch.Tensor:
        return X.mean(0)

    def sum(self, v: torch.Tensor) -> torch.Tensor:
        return v
