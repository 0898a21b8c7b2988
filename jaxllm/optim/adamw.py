"""AdamW (Loshchilov & Hutter, arXiv 1711.05101): optax's own, registered as `adamw`."""

from __future__ import annotations

import optax
from pydantic import Field

from jaxllm.optim.registry import OptimizerOptions, register_optimizer


class AdamWOptions(OptimizerOptions):
    eps: float = Field(1e-8, gt=0, description="added to √v")


@register_optimizer("adamw", AdamWOptions, lr=3e-4, b2=0.95, weight_decay=0.1)
def _adamw(learning_rate, options: AdamWOptions, *, b1, b2, weight_decay, mask):
    return optax.adamw(
        learning_rate, b1=b1, b2=b2, eps=options.eps, weight_decay=weight_decay, mask=mask
    )
