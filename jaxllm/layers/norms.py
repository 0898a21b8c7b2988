"""Normalisation layers; statistics always in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.layers.base import param


def rms_norm(x: jax.Array, scale: jax.Array | None, eps: float) -> jax.Array:
    """RMSNorm over the last axis in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    return y.astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm with a learned per-channel scale. `axis_name` is the scale's logical axis."""

    def __init__(self, dim: int, *, eps: float, rngs: nnx.Rngs, axis_name: str = "norm"):
        self.eps = eps
        self.scale = param(rngs, (dim,), (axis_name,), init="ones")

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps)
