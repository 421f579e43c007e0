"""Learning-rate schedules as pure functions of the optimizer step.

`step` counts finished optimizer steps (0 before the first update), so the first update uses
`lr_at(1)`. Every schedule warms up linearly from zero over `warmup_steps`: continued pretraining
re-warms because the checkpoint's optimizer state is not carried over.

- cosine:   warmup, then cosine from `lr` to `min_lr` over the remaining steps.
- wsd:      warmup–stable–decay: warmup, `lr` held, then linear decay to `min_lr` over the last
            `decay_steps` (0 = the last 20% of training). The stable phase's checkpoints can be
            branched off and decayed separately.
- constant: warmup, then `lr`.

A pure function (no scheduler object with state) makes resume trivial: the rate at step k is the
same whether the run was interrupted or not.
"""

from __future__ import annotations

import math


def lr_at(step: int, schedule: str, lr: float, min_lr: float, warmup_steps: int, total_steps: int,
          decay_steps: int = 0) -> float:
    """The learning rate for optimizer step `step` (1-based: the first update is step 1)."""
    if step <= warmup_steps:
        return lr * step / warmup_steps if warmup_steps > 0 else lr
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        span = max(total_steps - warmup_steps, 1)
        progress = min((step - warmup_steps) / span, 1.0)
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay = decay_steps if decay_steps > 0 else max(int(round(0.2 * total_steps)), 1)
        decay_start = max(total_steps - decay, warmup_steps)
        if step <= decay_start:
            return lr
        progress = min((step - decay_start) / max(total_steps - decay_start, 1), 1.0)
        return lr + (min_lr - lr) * progress
    raise ValueError(f"optim.schedule={schedule!r} is not a schedule; use cosine, wsd or constant")


def lr_from_config(cfg, step: int) -> float:
    """`lr_at` with the run's `optim` and `train.steps`."""
    o = cfg.optim
    return lr_at(step, o.schedule, o.lr, o.min_lr, o.warmup_steps, cfg.train.steps, o.decay_steps)
