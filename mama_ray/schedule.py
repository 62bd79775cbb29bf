"""The learning-rate schedule of method.md §4, counted in optimizer steps.

Linear warm-up from ``min_lr`` to ``lr`` over ``warmup_steps``, then a half cosine from ``lr`` back
to ``min_lr`` at ``max_steps`` (katsura-jp ``CosineAnnealingWarmupRestarts`` with one cycle of
``max_steps``, so no restart happens). The loop sets the value on every parameter group before each
optimizer step, which keeps the schedule a pure function of the step and so exact after a resume.
"""

from __future__ import annotations

import math


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Learning rate used by the optimizer step with 0-based index ``step``.

    Args:
        step: optimizer steps already taken (0 for the first update).
        lr: peak learning rate, reached at ``step == warmup_steps``.
        min_lr: value at step 0 and at ``max_steps``.
        warmup_steps: length of the linear warm-up.
        max_steps: total optimizer steps (end of the cosine).
    Returns:
        The learning rate for that step.
    """
    if step < warmup_steps:
        return min_lr + (lr - min_lr) * step / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_for(cfg, step: int) -> float:
    """:func:`lr_at` with the values of a :class:`mama_ray.config.Config`."""
    return lr_at(step, cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps, cfg.train.max_steps)
