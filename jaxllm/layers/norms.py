"""Normalisation layers; statistics always in float32."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.layers.base import param


def rms_norm(x: jax.Array, scale: jax.Array | None, eps: float) -> jax.Array:
    """RMSNorm over the last axis in float32, returned in x's dtype.

    x: [..., D]; scale: None or broadcast against x's trailing axes (e.g. [D], or [H, K] for
    a per-head norm of [..., H, K]). The backward keeps x in its own dtype and the float32
    1/rms per row, not the float32 copies of x that autodiff of the formula keeps (up to three
    [..., D] float32 tensors per call, most of a bf16 model's activation memory otherwise).
    """
    return _rms_norm(x, scale, eps)


def _rms_norm_forward(x, scale, eps):
    x32 = x.astype(jnp.float32)
    r = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    y = x32 * r
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    return y.astype(x.dtype), r


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rms_norm(x, scale, eps):
    return _rms_norm_forward(x, scale, eps)[0]


def _rms_norm_fwd(x, scale, eps):
    y, r = _rms_norm_forward(x, scale, eps)
    return y, (x, scale, r)


def _rms_norm_bwd(eps, res, dy):
    x, scale, r = res
    xhat = x.astype(jnp.float32) * r
    g = dy.astype(jnp.float32)
    dscale = None
    if scale is not None:
        lead = x.ndim - scale.ndim
        # sum over the axes scale is broadcast along: the leading ones and its size-1 ones
        axes = tuple(range(lead)) + tuple(
            lead + i for i, n in enumerate(scale.shape) if n == 1 and x.shape[lead + i] != 1
        )
        dscale = jnp.sum(g * xhat, axis=axes, keepdims=True).reshape(scale.shape)
        dscale = dscale.astype(scale.dtype)
        g = g * scale.astype(jnp.float32)
    dx = r * (g - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True))
    return dx.astype(x.dtype), dscale


_rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


class RMSNorm(nnx.Module):
    """RMSNorm with a learned per-channel scale. `axis_name` is the scale's logical axis."""

    def __init__(self, dim: int, *, eps: float, rngs: nnx.Rngs, axis_name: str = "norm"):
        self.eps = eps
        self.scale = param(rngs, (dim,), (axis_name,), init="ones")

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps)
