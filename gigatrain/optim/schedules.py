"""Learning-rate schedules as pure functions of the step.

A schedule depends only on the step number and the config, so resuming needs no scheduler state:
step 137 has the same learning rate whether the run was interrupted or not.
"""
from __future__ import annotations

import math


def lr_at(step: int, *, kind: str, lr: float, total_steps: int, warmup_steps: int = 0,
          min_lr_ratio: float = 0.1) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    - ``constant``: ``lr`` after a linear warmup.
    - ``cosine``: linear warmup from lr/warmup to ``lr`` over ``warmup_steps``, then cosine decay to
      ``lr * min_lr_ratio`` at ``total_steps``.
    - ``onecycle``: Smith's one-cycle: linear rise from lr/25 to ``lr`` over the first 30% (or
      ``warmup_steps`` if given), then cosine annealing to lr/1e4.
    """
    if total_steps <= 0:
        return lr
    if kind == "onecycle":
        up = warmup_steps if warmup_steps > 0 else max(1, int(0.3 * total_steps))
        start, end = lr / 25.0, lr / 1e4
        if step < up:
            return start + (lr - start) * step / up
        t = min(1.0, (step - up) / max(1, total_steps - up))
        return end + (lr - end) * 0.5 * (1 + math.cos(math.pi * t))
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if kind == "constant":
        return lr
    if kind == "cosine":
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        floor = lr * min_lr_ratio
        return floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * t))
    raise ValueError(f"unknown schedule {kind!r}: use cosine, onecycle or constant")
