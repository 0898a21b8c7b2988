"""Learning-rate schedules: linear warmup, then cosine / linear decay or constant."""

from __future__ import annotations

import optax


def warmup_schedule(
    peak_lr: float, total_steps: int, warmup_steps: int, kind: str, min_lr_ratio: float
) -> optax.Schedule:
    """Linear warmup from 0 to `peak_lr` over `warmup_steps`, then `kind` down to
    `peak_lr * min_lr_ratio` at `total_steps` (cosine | linear) or flat (constant)."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup_steps, 1)
    end = peak_lr * min_lr_ratio
    if kind == "cosine":
        after = optax.cosine_decay_schedule(peak_lr, decay_steps, alpha=min_lr_ratio)
    elif kind == "linear":
        after = optax.linear_schedule(peak_lr, end, decay_steps)
    elif kind == "constant":
        after = optax.constant_schedule(peak_lr)
    else:
        raise ValueError(f"unknown schedule {kind!r}")
    if warmup_steps == 0:
        return after
    warm = optax.linear_schedule(0.0, peak_lr, warmup_steps)
    return optax.join_schedules([warm, after], [warmup_steps])
