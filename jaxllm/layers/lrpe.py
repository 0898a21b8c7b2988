"""LRPE (linearized relative positional encoding, TransNormerLLM / cosFormer2).

Each rotated channel c of q and k becomes the pair [x_c cos(θ_c t), x_c sin(θ_c t)], so the
product of a query at t and a key at s is Σ_c q_c k_c cos(θ_c (t − s)): a relative,
cosine re-weighting that survives the linear-attention factorisation (no softmax needed).
Channels past the first R are kept as they are (θ = 0), which is cosFormer2's "LRPE on part of
the head dim"; TNL rotates all K.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def lrpe_theta(n_heads: int, n_rot: int, base: float = 10000.0) -> jax.Array:
    """TNL's initial frequencies: base^(−2c/(H·R)) over c < H·R, reshaped [H, R] so every head
    gets its own band (as the official `Lrpe` reshapes the embed dim into heads)."""
    c = jnp.arange(n_heads * n_rot, dtype=jnp.float32)
    return (base ** (-2.0 * c / (n_heads * n_rot))).reshape(n_heads, n_rot)


def lrpe(x_BTHK: jax.Array, positions_BT: jax.Array, theta_HR: jax.Array) -> jax.Array:
    """[B, T, H, K] → [B, T, H, K + R]: the first R channels rotated by θ·position (cos part
    for all K, sin part for the R rotated channels), in float32 then x's dtype."""
    n_rot = theta_HR.shape[-1]
    x = x_BTHK.astype(jnp.float32)
    angle_BTHR = positions_BT.astype(jnp.float32)[:, :, None, None] * theta_HR.astype(jnp.float32)
    cos_BTHR, sin_BTHR = jnp.cos(angle_BTHR), jnp.sin(angle_BTHR)
    head = x[..., :n_rot]
    out = jnp.concatenate([head * cos_BTHR, x[..., n_rot:], head * sin_BTHR], axis=-1)
    return out.astype(x_BTHK.dtype)
