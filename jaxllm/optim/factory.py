"""The optimizer chain a config asks for: clip → optimizer (with decay mask and schedule)."""

from __future__ import annotations

from typing import Any

import jax
import optax

from jaxllm.optim.schedules import warmup_schedule


def decay_mask(params: Any) -> Any:
    """Weight decay on matrices only: norms' scales and biases (ndim < 2) are left alone."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def build_optimizer(
    optim_cfg, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(transformation, learning-rate schedule) for `optim_cfg` (an `OptimConfig`)."""
    c = optim_cfg
    lr = warmup_schedule(c.lr, total_steps, c.warmup_steps, c.schedule, c.min_lr_ratio)
    if c.name == "adamw":
        opt = optax.adamw(
            lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay, mask=decay_mask
        )
    else:
        raise ValueError(f"unknown optimizer {c.name!r}")
    parts = [optax.clip_by_global_norm(c.grad_clip)] if c.grad_clip else []
    return optax.chain(*parts, opt), lr
