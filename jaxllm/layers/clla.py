"""Cross-layer latent attention (`clla`; Yang et al. 2410.15252, assembled from MLA + CLA).

The producer of each group of `share_factor` layers (layer_index % f == 0) down-projects x to
a latent of C = latent_dim + rope_dim channels, c = x W_dkv: the first latent_dim channels
(RMS-normalised) carry content, the last rope_dim are the raw decoupled RoPE key k_r, one for
all heads (as in MLA). The latent is quantised to int8 / int4 with one float16 scale per
`quant_group` channels; training sees the quantise-dequantise values through a straight-through
estimator, and the cache stores only the codes and scales. Every layer of the group reads the
shared (dequantised) latent through its own up-projections:

    k = [c W_uk^l ; rope(k_r)]  [B, S, G, K + R],  v = c W_uv^l  [B, S, G, K],
    q = x W_q^l = [q_c ; rope(q_r)]  [B, T, H, K + R],  o = softmax(q kᵀ / √(K+R)) v.

Consumers' caches hold only the position counter, and the producer passes the latent to them
through the decoder's per-pass `carry`.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx
from pydantic import Field, model_validator

from jaxllm.layers.attn_common import AttnVariantConfig, Cache, append, out_std
from jaxllm.layers.base import cast, dense, param
from jaxllm.layers.norms import rms_norm
from jaxllm.layers.positions import rope
from jaxllm.layers.registry import register_mixer
from jaxllm.ops.attention import attention


class CLLAConfig(AttnVariantConfig):
    latent_dim: int = Field(64, ge=2, description="content channels of the shared latent")
    rope_dim: int = Field(16, ge=0, description="decoupled RoPE key channels (0: no RoPE)")
    share_factor: int = Field(2, ge=1, description="layers per latent group")
    quant: Literal["none", "int8", "int4"] = "int4"
    quant_group: int = Field(16, ge=2, description="latent channels per float16 scale")
    impl: Literal["auto", "reference", "xla", "cudnn"] = "auto"

    @model_validator(mode="after")
    def _check(self) -> CLLAConfig:
        c = self.latent_dim + self.rope_dim
        if self.quant != "none" and c % self.quant_group:
            raise ValueError(
                f"quant_group={self.quant_group} must divide latent_dim + rope_dim = {c}"
            )
        if self.quant_group % 2 or self.rope_dim % 2:
            raise ValueError("quant_group and rope_dim must be even (int4 packs two per byte)")
        return self

    def scan_key(self) -> dict:
        return {**super().scan_key(), "producer": self.layer_index % self.share_factor == 0}


QMAX = {"int8": 127, "int4": 7}


def quantize(c_BTC: jax.Array, bits: str, group: int) -> tuple[jax.Array, jax.Array]:
    """Symmetric per-group codes and float16 scales: c ≈ codes · scale.

    → codes [B, T, C] int8 in [-qmax, qmax], scales [B, T, C/group] float16.
    """
    b, t, c = c_BTC.shape
    x = c_BTC.astype(jnp.float32).reshape(b, t, c // group, group)
    amax = jnp.max(jnp.abs(x), axis=-1)
    # float16 scales, floored at a normal float16 so that an all-zero group divides safely.
    scale = jnp.maximum(amax / QMAX[bits], 1e-4).astype(jnp.float16)
    codes = jnp.clip(jnp.round(x / scale.astype(jnp.float32)[..., None]), -QMAX[bits], QMAX[bits])
    return codes.astype(jnp.int8).reshape(b, t, c), scale


def dequantize(codes_BTC: jax.Array, scale_BTG: jax.Array, group: int) -> jax.Array:
    b, t, c = codes_BTC.shape
    x = codes_BTC.astype(jnp.float32).reshape(b, t, c // group, group)
    return (x * scale_BTG.astype(jnp.float32)[..., None]).reshape(b, t, c)


def pack_int4(codes_BTC: jax.Array) -> jax.Array:
    """Two signed 4-bit codes per uint8: channel 2i in the low nibble, 2i+1 in the high."""
    u = (codes_BTC.astype(jnp.int32) & 0xF).astype(jnp.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed_BTC2: jax.Array) -> jax.Array:
    p = packed_BTC2.astype(jnp.int32)
    lo, hi = p & 0xF, (p >> 4) & 0xF
    lo, hi = jnp.where(lo >= 8, lo - 16, lo), jnp.where(hi >= 8, hi - 16, hi)
    return jnp.stack([lo, hi], axis=-1).reshape(*p.shape[:-1], -1).astype(jnp.int8)


def fake_quant(c_BTC: jax.Array, bits: str, group: int) -> jax.Array:
    """Quantise-dequantise with a straight-through gradient (identity backward)."""
    if bits == "none":
        return c_BTC
    deq = dequantize(*quantize(c_BTC, bits, group), group).astype(c_BTC.dtype)
    return c_BTC + jax.lax.stop_gradient(deq - c_BTC)


@register_mixer("clla", CLLAConfig)
class CrossLayerLatentAttention(nnx.Module):
    """x: [B, T, D] → [B, T, D]; reads/writes `carry["clla"]` (the dequantised latent)."""

    uses_carry = True

    def __init__(self, cfg: CLLAConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, h, g, k = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        lc, r = cfg.latent_dim, cfg.rope_dim
        std, pd = cfg.init_std, cfg.param_dtype
        self.producer = cfg.layer_index % cfg.share_factor == 0
        if self.producer:
            self.w_dkv = param(rngs, (d, lc + r), ("embed", None), std=std, dtype=pd)
            self.latent_norm = param(rngs, (lc,), (None,), init="ones")
        self.wq = param(rngs, (d, h, k + r), ("embed", "heads", "head_dim"), std=std, dtype=pd)
        up_std = lc**-0.5
        self.w_uk = param(rngs, (lc, g, k), (None, "kv_heads", "head_dim"), std=up_std, dtype=pd)
        self.w_uv = param(rngs, (lc, g, k), (None, "kv_heads", "head_dim"), std=up_std, dtype=pd)
        self.wo = param(rngs, (h, k, d), ("heads", "head_dim", "embed"), std=out_std(cfg), dtype=pd)
        if cfg.qk_norm:
            self.q_norm = param(rngs, (k,), ("head_dim",), init="ones")
            self.k_norm = param(rngs, (k,), ("head_dim",), init="ones")

    def init_cache(self, batch: int, max_len: int) -> Cache:
        c = self.cfg
        end = {"end": jnp.zeros((), jnp.int32)}
        if not self.producer:
            return end
        ch = c.latent_dim + c.rope_dim
        if c.quant == "none":
            return {"latent": jnp.zeros((batch, max_len, ch), c.compute_dtype), **end}
        width = ch // 2 if c.quant == "int4" else ch
        return {
            "codes": jnp.zeros(
                (batch, max_len, width), jnp.uint8 if c.quant == "int4" else jnp.int8
            ),
            "scales": jnp.zeros((batch, max_len, ch // c.quant_group), jnp.float16),
            **end,
        }

    def _latent(self, x_BTD: jax.Array) -> jax.Array:
        c = self.cfg
        lat = dense(x_BTD, cast(self.w_dkv, x_BTD.dtype), "BTD,DC->BTC", name="dkv")
        content = rms_norm(lat[..., : c.latent_dim], self.latent_norm[...], c.norm_eps)
        return jnp.concatenate([content, lat[..., c.latent_dim :]], axis=-1)

    def _write(self, cache: Cache, lat_BTC: jax.Array) -> tuple[Cache, jax.Array, Any, Any]:
        """Append the quantised latent; return the cache and the whole dequantised latent."""
        c = self.cfg
        t = lat_BTC.shape[1]
        if c.quant == "none":
            cache, qpos, kpos = append(cache, t, latent=lat_BTC)
            return cache, cache["latent"], qpos, kpos
        codes, scales = quantize(lat_BTC, c.quant, c.quant_group)
        stored = pack_int4(codes) if c.quant == "int4" else codes
        cache, qpos, kpos = append(cache, t, codes=stored, scales=scales)
        codes = unpack_int4(cache["codes"]) if c.quant == "int4" else cache["codes"]
        lat = dequantize(codes, cache["scales"], c.quant_group).astype(lat_BTC.dtype)
        return cache, lat, qpos, kpos

    def __call__(
        self, x_BTD, *, positions_BT, segment_ids_BT=None, cache=None, carry=None
    ) -> tuple[Any, Any]:
        c = self.cfg
        dt = c.compute_dtype
        x_BTD = x_BTD.astype(dt)
        t, k, r = x_BTD.shape[1], c.head_dim, c.rope_dim
        kw: dict[str, Any] = {"segment_ids_BT": segment_ids_BT}
        if self.producer:
            lat = self._latent(x_BTD)
            kpos_BS = positions_BT
            if cache is None:
                lat = fake_quant(lat, c.quant, c.quant_group)
            else:
                cache, lat, qpos, kpos_BS = self._write(cache, lat)
                kw = {"q_positions_BT": qpos, "kv_positions_BS": kpos_BS}
            kr_BS1R = lat[..., c.latent_dim :][:, :, None]
            if r:
                kr_BS1R = rope(kr_BS1R, jnp.broadcast_to(kpos_BS, lat.shape[:2]), c.rope_theta)
            shared = (lat[..., : c.latent_dim], kr_BS1R, kw)
            if carry is not None:
                carry["clla"] = shared
        else:
            if carry is None or "clla" not in carry:
                raise ValueError(f"clla layer {c.layer_index} needs its group's producer layer")
            shared = carry["clla"]
            if cache is not None:
                cache = {"end": cache["end"] + t}
        lat_BSC, kr_BS1R, kw = shared
        k_BSGK = dense(lat_BSC, cast(self.w_uk, dt), "BSC,CGK->BSGK", name="uk")
        v_BSGK = dense(lat_BSC, cast(self.w_uv, dt), "BSC,CGK->BSGK", name="uv")
        q_BTHX = dense(x_BTD, cast(self.wq, dt), "BTD,DHX->BTHX", name="q")
        q_BTHK, q_BTHR = q_BTHX[..., :k], q_BTHX[..., k:]
        if c.qk_norm:
            q_BTHK = rms_norm(q_BTHK, self.q_norm[...], c.norm_eps)
            k_BSGK = rms_norm(k_BSGK, self.k_norm[...], c.norm_eps)
        if r:
            q_BTHR = rope(q_BTHR, positions_BT, c.rope_theta)
            g = k_BSGK.shape[2]
            kr = jnp.broadcast_to(kr_BS1R, (*k_BSGK.shape[:2], g, r)).astype(dt)
            q_BTHK = jnp.concatenate([q_BTHK, q_BTHR], axis=-1)
            k_BSGK = jnp.concatenate([k_BSGK, kr], axis=-1)
        # The fused kernels want V's head dim equal to K's: pad V with zeros and drop them after.
        v_pad = jnp.pad(v_BSGK, [(0, 0)] * 3 + [(0, r)])
        o_BTHK = attention(q_BTHK, k_BSGK, v_pad, impl=c.impl, **kw)[..., :k]
        return dense(o_BTHK, cast(self.wo, dt), "BTHK,HKD->BTD", name="o"), cache

    @staticmethod
    def token_mixing_flops(cfg: CLLAConfig, seq_len: int) -> float:
        """QKᵀ over K + R channels (content and decoupled RoPE) and PV over K, halved by the
        causal mask; the latent's up-projections are weights and counted as such. (The zero
        padding of V up to K + R for the fused kernels is not model work and is not counted.)"""
        k, r = cfg.head_dim, cfg.rope_dim
        return 2.0 * seq_len * cfg.n_heads * ((k + r) + k) * 0.5
