"""The optimizer chain a config asks for: clip → optimizer (with decay mask and schedule).

`optim.name` picks a registered optimizer (`jaxllm.optim.registry`); `optim.groups` splits the
parameters into groups with their own learning-rate scale and weight decay
(`jaxllm.optim.groups`); a scanned decoder's stacked parameters are updated per layer
(`jaxllm.optim.stacked`).
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from jaxllm.optim import registry
from jaxllm.optim.groups import grouped_optimizer
from jaxllm.optim.schedules import warmup_schedule
from jaxllm.optim.stacked import per_layer


def build_optimizer(
    optim_cfg, total_steps: int, stacked: Any = None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(transformation, learning-rate schedule) for `optim_cfg` (an `OptimConfig`);
    `ConfigError` first if its optimizer or options are not ones the registry holds.

    stacked: a pytree of bools like the params marking the stacked [U, ...] parameters of a
    scanned decoder, which the optimizer then updates per layer (`jaxllm.optim.stacked`)."""
    registry.check(optim_cfg)
    c = optim_cfg
    lr = warmup_schedule(
        registry.resolved(c)["lr"], total_steps, c.warmup_steps, c.schedule, c.min_lr_ratio
    )
    if c.groups:
        opt = grouped_optimizer(c, lr)
    else:
        opt = registry.make_optimizer(c, lr)
    if stacked is not None and any(jax.tree.leaves(stacked)):
        opt = per_layer(opt, stacked)
    parts = [optax.clip_by_global_norm(c.grad_clip)] if c.grad_clip else []
    return optax.chain(*parts, opt), lr
