"""SRMSNorm (TransNormerLLM): RMS normalisation without a learned scale, in float32."""

from __future__ import annotations

import jax
from flax import nnx

from jaxllm.layers.norms import rms_norm


def srms_norm(x: jax.Array, eps: float) -> jax.Array:
    """x · rsqrt(mean(x²) + eps) over the last axis, in float32, returned in x's dtype."""
    return rms_norm(x, None, eps)


class SRMSNorm(nnx.Module):
    """`srms_norm` as a module (no parameters), a drop-in for `RMSNorm` in the decoder."""

    def __init__(self, dim: int, *, eps: float, rngs: nnx.Rngs | None = None):
        del dim, rngs  # no parameters; same signature as RMSNorm
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return srms_norm(x, self.eps)
