"""Momentum SGD (`optim.b1` the momentum, 0 = plain SGD), a linear reference for CO2."""

from __future__ import annotations

import optax

from jaxllm.optim.decay import with_decoupled_decay
from jaxllm.optim.registry import OptimizerOptions, register_optimizer


@register_optimizer("sgd", OptimizerOptions, lr=0.1, b2=None, weight_decay=0.0)
def _sgd(learning_rate, options, *, b1, b2, weight_decay, mask):
    tx = optax.sgd(learning_rate, b1 or None)
    return with_decoupled_decay(tx, learning_rate, weight_decay, mask)
