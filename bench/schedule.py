"""Learning-rate schedules (a function of the step) and DSGD-AC's consensus weight gamma_t."""

from __future__ import annotations

import math


def lr_at(step: int, base_lr: float, total_steps: int, schedule: str, warmup: int,
          milestones: tuple[float, ...], decay: float = 0.1) -> float:
    """Learning rate for `step` (0-based).

    Linear warmup from base_lr/warmup to base_lr over the first `warmup` steps, then
      constant:  base_lr
      multistep: base_lr * decay^k, k = number of milestones (fractions of training) passed
      cosine:    base_lr * (1 + cos(pi * s)) / 2, s = progress after warmup in [0, 1]
    """
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "constant":
        return base_lr
    if schedule == "multistep":
        k = sum(step >= round(m * total_steps) for m in milestones)
        return base_lr * decay ** k
    if schedule == "cosine":
        span = max(1, total_steps - warmup)
        s = min(1.0, (step - warmup) / span)
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * s))
    raise ValueError(schedule)


def gamma_at(step: int, lr: float, lr_start: float, start_step: int, p: float, gamma_min: float) -> float:
    """DSGD-AC's consensus weight (WangZesen/decent-sam-grc, image-cifar/src/utils.py get_adaptive_gamma):
    1 before start_step, then gamma_min + (1 - gamma_min) (lr / lr_start)^p, lr_start the lr AT the start
    step, so that gamma is continuous there (1 at the start step)."""
    if step < start_step or lr_start <= 0:
        return 1.0
    return gamma_min + (1.0 - gamma_min) * (lr / lr_start) ** p
