"""Rotary position embedding (RoPE), in the half-split (LLaMA / NeoX) layout, with the
frequency scalings of long-context checkpoints (linear position interpolation, Llama 3)."""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
from pydantic import BaseModel, ConfigDict, Field


class RopeScaling(BaseModel):
    """How the RoPE frequencies are stretched for a longer context (Hugging Face `rope_scaling`).

    `linear`: every frequency divided by `factor` (position interpolation). `llama3`: wavelengths
    longer than `original_max_len / low_freq_factor` are divided by `factor`, shorter than
    `original_max_len / high_freq_factor` are kept, and the band between is interpolated.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["linear", "llama3"]
    factor: float = Field(gt=0)
    low_freq_factor: float = Field(1.0, gt=0)
    high_freq_factor: float = Field(4.0, gt=0)
    original_max_len: int = Field(8192, ge=1)


def rope_inv_freq(k: int, theta: float, scaling: RopeScaling | None = None) -> jax.Array:
    """The K/2 rotation frequencies (float32) of a head dim K: theta^(-2i/K), then scaled."""
    inv_freq = theta ** (-jnp.arange(0, k, 2, dtype=jnp.float32) / k)
    if scaling is None:
        return inv_freq
    if scaling.type == "linear":
        return inv_freq / scaling.factor
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = scaling.original_max_len / scaling.low_freq_factor
    high_wavelen = scaling.original_max_len / scaling.high_freq_factor
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def rope(
    x_BTHK: jax.Array,
    positions_BT: jax.Array,
    theta: float = 10000.0,
    scaling: RopeScaling | None = None,
) -> jax.Array:
    """Rotate pairs (i, i + K/2) of the head dim by angle `pos · theta^(-2i/K)`, in float32.

    x: [B, T, H, K] (K even), positions: [B, T] int → [B, T, H, K] in x's dtype. `scaling`
    stretches the frequencies (see `RopeScaling`).
    """
    k = x_BTHK.shape[-1]
    if k % 2:
        raise ValueError(f"RoPE needs an even head dim, got {k}")
    inv_freq = rope_inv_freq(k, theta, scaling)
    angle_BTK = positions_BT.astype(jnp.float32)[..., None] * inv_freq  # [B, T, K/2]
    sin, cos = jnp.sin(angle_BTK)[:, :, None, :], jnp.cos(angle_BTK)[:, :, None, :]
    x1, x2 = jnp.split(x_BTHK.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTHK.dtype)
