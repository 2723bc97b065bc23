"""Learning-rate schedules, built by the modules from ``_partial_`` configs."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(
    optimizer: Optimizer,
    num_training_steps: int,
    warmup_ratio: float = 0.05,
    warmup_steps: int | None = None,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """Linear warmup from 0, then cosine decay to ``min_lr_ratio`` times the peak rate."""
    warmup = warmup_steps if warmup_steps is not None else round(warmup_ratio * num_training_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, num_training_steps - warmup))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def constant(optimizer: Optimizer, num_training_steps: int) -> LambdaLR:
    """A constant rate (``num_training_steps`` is accepted for a uniform signature)."""
    return LambdaLR(optimizer, lambda step: 1.0)
