"""Gated activations with a backward that keeps their inputs only."""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(gate) ⊙ up, in the inputs' dtype (any matching shapes).

    Autodiff of the formula keeps sigmoid(gate), silu(gate) and their products for the
    backward: up to three more [..., F] tensors beside gate and up, per MLP (or expert) per
    layer. Here the backward keeps gate and up and recomputes the rest, in float32.
    """
    return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(res, dh):
    gate, up = res
    g, u, d = (x.astype(jnp.float32) for x in (gate, up, dh))
    s = jax.nn.sigmoid(g)
    # d silu(g)/dg = s + g·s·(1 − s)
    dgate = d * u * s * (1 + g * (1 - s))
    return dgate.astype(gate.dtype), (d * g * s).astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)
