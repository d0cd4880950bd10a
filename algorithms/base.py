"""The three component registries, the step context, and how a run assembles an algorithm.

One training step of worker block X [n_local, d] (x <- ... - lr * U):

    losses, G = oracle(workers, X, batch, ctx)     # gradient(s) at the pre-mix X
    X_next    = rule.step(X, G, optimizer, ctx)     # communication + local update

Interfaces (duck-typed; see any component file for an example):
  oracle:    grad_evals (int, per worker per step); __call__(workers, X, x, y, ctx) -> (losses [n], G [n, d])
  optimizer: direction(X, G) -> U [n, d]; the step is x <- x - lr * U (momentum, Adam state live here)
  rule:      step(X, G, optimizer, ctx) -> X_next; gamma(ctx) -> consensus weight reported in metrics
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from bench.registry import Registry

ORACLES: Registry = Registry("gradient oracle")
OPTIMIZERS: Registry = Registry("local optimizer")
RULES: Registry = Registry("communication rule")
PRESETS: Registry = Registry("algorithm")


@dataclass
class StepContext:
    step: int
    lr: float
    lr_max: float
    comm: Any  # bench.comm backend: allreduce_mean, mix, mean, sum; .workers = global ids of local rows
    seed: int


def preset(name: str, grad: str, opt: str, comm: str, help: str) -> None:
    PRESETS.register(name, help)({"grad": grad, "opt": opt, "comm": comm})


@dataclass
class Algorithm:
    oracle: Any
    optimizer: Any
    rule: Any

    def step(self, workers, X: torch.Tensor, x: torch.Tensor, y: torch.Tensor, ctx: StepContext):
        losses, G = self.oracle(workers, X, x, y, ctx)
        return losses, self.rule.step(X, G, self.optimizer, ctx)


def build_algorithm(cfg, layout, n_local: int, device, total_steps: int, epoch_len: int) -> Algorithm:
    """Instantiate the resolved config's three components."""
    oracle = ORACLES.get(cfg.grad)(cfg, layout, device)
    optimizer = OPTIMIZERS.get(cfg.opt)(cfg, layout, n_local, device)
    rule = RULES.get(cfg.comm)(cfg, total_steps, epoch_len)
    return Algorithm(oracle, optimizer, rule)
