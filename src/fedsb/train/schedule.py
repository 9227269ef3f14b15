"""Learning-rate schedules with linear warm-up, across rounds or restarted every round."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    """lr(step) for step in [0, total): linear warm-up over `warmup` steps, then constant/linear/cosine to 0.

    With scope 'global' a client's step s in round t (1-based) maps to (t - 1) * steps_per_round + s and
    total = rounds * steps_per_round; with scope 'round' every round restarts at 0 with total = steps.
    """

    base_lr: float
    total: int
    warmup: int
    kind: str = "linear"

    def lr(self, step: int) -> float:
        if self.warmup > 0 and step < self.warmup:
            return self.base_lr * (step + 1) / self.warmup
        if self.kind == "constant":
            return self.base_lr
        decay_steps = max(1, self.total - self.warmup)
        progress = min(1.0, max(0.0, (step - self.warmup) / decay_steps))
        if self.kind == "linear":
            return self.base_lr * (1.0 - progress)
        if self.kind == "cosine":
            return self.base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
        raise ValueError(f"unknown schedule {self.kind!r}")


def round_schedule(
    *,
    base_lr: float,
    kind: str,
    warmup_ratio: float,
    scope: str,
    steps_per_round: int,
    rounds: int,
    round: int,
) -> tuple[Schedule, int]:
    """The schedule for one client's round and the step offset of its first step."""
    if scope == "global":
        total, offset = steps_per_round * rounds, steps_per_round * (round - 1)
    else:
        total, offset = steps_per_round, 0
    return Schedule(base_lr=base_lr, total=total, warmup=int(warmup_ratio * total), kind=kind), offset
