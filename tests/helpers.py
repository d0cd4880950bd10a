"""Test helpers shared by several test files (importable: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import torch

from algorithms.base import own
from bench.spec import BuildContext


def component(cfg, kind: str, layout=None, n_local: int = 1, device="cpu", total_steps: int = 100,
              epoch_len: int = 10, dtype=torch.float32, topology=None):
    """Build the `kind` component (grad, opt, comm) of cfg alone, as the runner would."""
    r = cfg.hyper()
    a = next(a for a in r.active if a.kind == kind)
    ctx = BuildContext(layout=layout, n_local=n_local, n=n_local, device=torch.device(device), dtype=dtype,
                       total_steps=total_steps, epoch_len=epoch_len, warmup=cfg.warmup,
                       lr_at=lambda t: cfg.lr, seed=cfg.seed, topology=topology)
    hp = own(a, r.values)
    for p in a.cls.params:  # a component-valued parameter: its component, built with its own values
        if p.registry is not None:
            sub = next(b for b in r.active if b.kind == f"{a.name}.{p.name}")
            setattr(hp, p.name, sub.cls(own(sub, r.values), ctx))
    return a.cls(hp, ctx)
