"""Communication backends: what the algorithms may ask of the other workers.

Algorithms are written against this object, never against "all workers are
here": they see only the local block X [n_local, d] and call

  allreduce_mean(G)  -> every row replaced by the mean over ALL workers
  mix(X, t)          -> (W(t) X) for the local rows
  mix_payload(P, decode, t) -> W(t) decode(P): the same for messages that are not the
                        rows themselves (compressed: values + indices); each payload
                        tensor has one row per local worker, decode maps rows to [k, d]
  mean(X)            -> x_bar [d], the mean over all workers
  sum(v)             -> a tensor summed over all workers' contributions

Simulated: all n workers live in this process (n_local = n). The distributed
backend (torch.distributed) implements the same four calls for a block of
n / world_size workers per rank.
"""

from __future__ import annotations

import torch

from topologies import Topology


class Mixer:
    """W(t) in gather form, on the device: (W X)_i = sum_s w[i, s] * X[idx[i, s]].

    For a ring that is 3 index-selects and multiply-adds on [n, d] (never a dense n x n
    product); the complete graph is a plain mean. Plans are cached per t mod period.
    """

    def __init__(self, topology: Topology, device):
        self.topology = topology
        self.device = device
        self._plans: dict[int, tuple] = {}

    def plan(self, t: int, dtype=torch.float32):
        key = (t % self.topology.period, dtype)
        p = self._plans.get(key)
        if p is None:
            if self.topology.is_uniform(key[0]):
                p = ("mean", None, None)
            else:
                idx, w = self.topology.neighbors(key[0])
                p = ("gather", torch.as_tensor(idx, device=self.device),
                     torch.as_tensor(w, dtype=dtype, device=self.device))  # weights in X's dtype
            self._plans[key] = p
        return p

    def __call__(self, X: torch.Tensor, t: int) -> torch.Tensor:
        kind, idx, w = self.plan(t, X.dtype)
        if kind == "mean":
            return X.mean(0, keepdim=True).expand_as(X).clone()
        out = X * w[:, :1]  # column 0 is the diagonal
        for s in range(1, idx.shape[1]):
            out.addcmul_(X.index_select(0, idx[:, s]), w[:, s:s + 1])
        return out


class SimulatedComm:
    """All n workers in one process."""

    backend = "simulated"
    world_size = 1
    rank = 0

    def __init__(self, n: int, topology: Topology | None, device):
        self.n = n
        self.workers = range(n)  # global ids of the local workers
        self.mixer = Mixer(topology, device) if topology is not None else None

    def allreduce_mean(self, G: torch.Tensor) -> torch.Tensor:
        return G.mean(0, keepdim=True).expand_as(G)

    def mix(self, X: torch.Tensor, t: int) -> torch.Tensor:
        return self.mixer(X, t)

    def mix_payload(self, payload: dict, decode, t: int) -> torch.Tensor:
        return self.mixer(decode(payload), t)

    def mean(self, X: torch.Tensor) -> torch.Tensor:
        return X.mean(0)

    def sum(self, v: torch.Tensor) -> torch.Tensor:
        return v
