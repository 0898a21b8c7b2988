"""Rotary position embedding (RoPE), in the half-split (LLaMA / NeoX) layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope(x_BTHK: jax.Array, positions_BT: jax.Array, theta: float = 10000.0) -> jax.Array:
    """Rotate pairs (i, i + K/2) of the head dim by angle `pos · theta^(-2i/K)`, in float32.

    x: [B, T, H, K] (K even), positions: [B, T] int → [B, T, H, K] in x's dtype.
    """
    k = x_BTHK.shape[-1]
    if k % 2:
        raise ValueError(f"RoPE needs an even head dim, got {k}")
    inv_freq = theta ** (-jnp.arange(0, k, 2, dtype=jnp.float32) / k)
    angle_BTK = positions_BT.astype(jnp.float32)[..., None] * inv_freq  # [B, T, K/2]
    sin, cos = jnp.sin(angle_BTK)[:, :, None, :], jnp.cos(angle_BTK)[:, :, None, :]
    x1, x2 = jnp.split(x_BTHK.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTHK.dtype)
