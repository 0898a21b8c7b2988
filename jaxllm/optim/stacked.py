"""The optimizer of a scanned decoder's stacked parameters (`jaxllm.models.scan`).

A scanned run of layers keeps each parameter of its U layers as one array [U, ...] with a
leading "layers" axis. Optimizers that look at a parameter's shape would treat the stack as
one tensor: CAME would factor a stack of norm scales [U, D] as a matrix and clip the RMS of
the whole stack, the weight-decay mask (matrices only) would decay those scales. `per_layer`
runs the optimizer on each layer's slice as a parameter of its own, so a scanned model trains
exactly as the unrolled one.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

LAYERS, REST = "layers", "rest"


def per_layer(tx: optax.GradientTransformation, stacked: Any) -> optax.GradientTransformation:
    """`tx`, vmapped over the leading axis of the parameters `stacked` marks (a pytree of bools
    shaped like the params) and as is on the rest. The stacked part's state is stacked too
    (its step counts as well: U equal copies)."""
    vmapped = optax.GradientTransformation(jax.vmap(tx.init), jax.vmap(tx.update))
    labels = jax.tree.map(lambda s: LAYERS if s else REST, stacked)
    return optax.partition({LAYERS: vmapped, REST: tx}, labels)
