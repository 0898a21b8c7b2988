"""DAPE (`dape`) and DAPE-v2 (`dape2`): data-adaptive positional encoding (Zheng et al.,
2405.14722 / 2410.04798; code chuanyang-Zheng/DAPE, `DAPE.py`, NeoX `transformer.py`).

With S = q·kᵀ/√K (before the mask) and a positional bias B [H, T, S] (ALiBi, Kerple-log, FIRE
or none), the logits are S + B + f(S, B), then the causal softmax:

- `dape`:  f = Linear(2H→W) → LeakyReLU → Linear(W→H) across heads at every (t, s)
  (Linear(H→W) on S alone when there is no bias);
- `dape2`: f = Conv(2H→W, 1×k) → LeakyReLU → Conv(W→H, 1×k) along the key axis within one
  query row, on tril([S, B]) — the not-allowed (future, other-document) entries are zeroed
  first and the kernel never mixes query rows, so no future key leaks into a row. One
  deviation from the authors' T×T array: the hidden units up to k//2 keys past the array's
  end are computed rather than zero-padded, so that a row does not depend on how many masked
  key slots follow it (the full pass and decoding against a longer cache agree); only the
  last query row differs from the authors' form.

DAPE needs the score matrix by design: the logit of head h at (t, s) is a learned function
of every head's score at (t, s) (and, for `dape2`, of the k//2 neighbouring keys too), applied
before the softmax. No per-head fused or flash attention kernel can compute that, so this layer
materialises the [B, H, T, S] scores and the [B, W, T, S] hidden channels, as the authors'
code does, and takes no fast attention path: memory grows as T·S, so keep `data.seq_len`
modest. (A tiled form would need all heads of a key tile at once, plus a key halo for
`dape2`; it is not written.)
"""

from __future__ import annotations

import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx
from pydantic import Field

from jaxllm.layers.attn_common import QKVO, AttnVariantConfig, Cache, append, finish_qk, kv_cache
from jaxllm.layers.base import param
from jaxllm.layers.registry import register_mixer
from jaxllm.ops.attention import _mask_BTS


class DAPEConfig(AttnVariantConfig):
    rope: bool = Field(False, description="DAPE pairs with additive biases; RoPE optional")
    bias: Literal["alibi", "kerple", "fire", "none"] = "alibi"
    mlp_width: int = Field(32, ge=1, description="W, hidden channels of f")
    kernel: int = Field(3, ge=1, description="dape2: conv width along keys (odd)")
    fire_width: int = Field(32, ge=1)
    fire_init_L: float = Field(512.0, gt=0, description="FIRE's learned length threshold L")
    fire_init_c: float = Field(0.1, gt=0)


def alibi_slopes(h: int) -> jax.Array:
    """Press et al.'s geometric slopes 2^(-8i/H); for H not a power of two, the interleave."""

    def pow2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(h).is_integer():
        s = pow2(h)
    else:
        c = 2 ** math.floor(math.log2(h))
        s = pow2(c) + pow2(2 * c)[0::2][: h - c]
    return jnp.asarray(s, jnp.float32)


class PositionalBias(nnx.Module):
    """B [B|1, H, T, S] from query/key positions; zeros for `none`."""

    def __init__(self, cfg: DAPEConfig, *, rngs: nnx.Rngs):
        self.kind = cfg.bias
        h = cfg.n_heads
        if cfg.bias == "kerple":
            # Kerple-log: -p·log(1 + a·|t-s|), p, a > 0 per head (the authors init U(0,2), U(0,1)).
            self.p = nnx.Param(jax.random.uniform(rngs.params(), (h,)) * 2, axes=("heads",))
            self.a = nnx.Param(jax.random.uniform(rngs.params(), (h,)), axes=("heads",))
        if cfg.bias == "fire":
            w = cfg.fire_width
            self.w1 = param(rngs, (1, w), (None, "mlp"), std=1.0)
            self.b1 = param(rngs, (w,), ("mlp",), init="zeros")
            self.w2 = param(rngs, (w, h), ("mlp", "heads"), std=w**-0.5)
            self.c = nnx.Param(jnp.asarray(cfg.fire_init_c, jnp.float32))
            self.L = nnx.Param(jnp.asarray(cfg.fire_init_L, jnp.float32))
        self.h = h

    def __call__(self, qpos_BT: jax.Array, kpos_BS: jax.Array) -> jax.Array:
        rel_BTS = (qpos_BT[:, :, None] - kpos_BS[:, None, :]).astype(jnp.float32)
        if self.kind == "none":
            return jnp.zeros((1, self.h, 1, 1), jnp.float32)
        if self.kind == "alibi":
            return -alibi_slopes(self.h)[None, :, None, None] * jnp.abs(rel_BTS)[:, None]
        if self.kind == "kerple":
            p = jnp.maximum(self.p[...], 1e-2)[None, :, None, None]
            a = jnp.maximum(self.a[...], 1e-2)[None, :, None, None]
            return -p * jnp.log1p(a * jnp.abs(rel_BTS)[:, None])
        # FIRE (Li et al. 2310.04418): f_θ(ψ(t-s) / ψ(max(L, t))), ψ(x) = log(c·x + 1).
        c = jnp.abs(self.c[...])
        psi = lambda x: jnp.log1p(c * x)
        norm_BT1 = psi(jnp.maximum(jnp.abs(self.L[...]), qpos_BT.astype(jnp.float32)))[..., None]
        u = (psi(jnp.maximum(rel_BTS, 0.0)) / norm_BT1)[..., None]
        hid = jax.nn.relu(u @ self.w1[...] + self.b1[...])
        return jnp.moveaxis(hid @ self.w2[...], -1, 1)


class DAPE(QKVO):
    """Shared body of `dape` and `dape2`; `conv` picks the 1×k form of f."""

    conv = False

    def __init__(self, cfg: DAPEConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.cfg = cfg
        h, w = cfg.n_heads, cfg.mlp_width
        self.k_norm = (
            param(rngs, (cfg.head_dim,), ("head_dim",), init="ones") if cfg.qk_norm else None
        )
        self.bias = PositionalBias(cfg, rngs=rngs)
        c_in = h if cfg.bias == "none" else 2 * h
        taps = cfg.kernel if self.conv else 1
        self.f1 = param(rngs, (taps, c_in, w), (None, "heads", "mlp"), std=(taps * c_in) ** -0.5)
        self.f1_b = param(rngs, (w,), ("mlp",), init="zeros")
        self.f2 = param(rngs, (taps, w, h), (None, "mlp", "heads"), std=(taps * w) ** -0.5)
        self.f2_b = param(rngs, (h,), ("heads",), init="zeros")

    def init_cache(self, batch: int, max_len: int) -> Cache:
        return kv_cache(self.cfg, batch, max_len)

    def _f(self, x_BCTS: jax.Array) -> jax.Array:
        """Channel mixing (taps = 1) or a 1×k convolution along S ('same' zero padding)."""

        def layer(x, w_KIO, b_O):
            taps = w_KIO.shape[0]
            xp = jnp.pad(x, [(0, 0)] * 3 + [(taps // 2, taps - 1 - taps // 2)])
            s = x.shape[-1]
            y = sum(jnp.einsum("BITS,IO->BOTS", xp[..., j : j + s], w_KIO[j]) for j in range(taps))
            return y + b_O[None, :, None, None]

        hid = jax.nn.leaky_relu(layer(x_BCTS, self.f1[...], self.f1_b[...]), 0.01)
        return layer(hid, self.f2[...], self.f2_b[...])

    def __call__(self, x_BTD, *, positions_BT, segment_ids_BT=None, cache=None) -> tuple[Any, Any]:
        c = self.cfg
        x_BTD = x_BTD.astype(c.compute_dtype)
        t, h, g = x_BTD.shape[1], c.n_heads, c.n_kv_heads
        q_BTHK = finish_qk(self.q(x_BTD), self.q_norm, positions_BT, c)
        k_BSGK, v_BSGK = self.kv(x_BTD)
        k_BSGK = finish_qk(k_BSGK, self.k_norm, positions_BT, c)
        qpos, kpos, kseg = positions_BT, positions_BT, segment_ids_BT
        if cache is not None:
            cache, qpos, kpos = append(cache, t, k=k_BSGK, v=v_BSGK)
            k_BSGK, v_BSGK, kseg = cache["k"], cache["v"], None
        s = k_BSGK.shape[1]
        allowed_BTS = _mask_BTS(qpos, kpos, segment_ids_BT, kseg, t, s, True)
        k = jnp.repeat(k_BSGK.astype(jnp.float32), h // g, axis=2)
        v = jnp.repeat(v_BSGK.astype(jnp.float32), h // g, axis=2)
        s_BHTS = jnp.einsum("BTHK,BSHK->BHTS", q_BTHK.astype(jnp.float32), k) * c.head_dim**-0.5
        b_BHTS = jnp.broadcast_to(self.bias(qpos, kpos), s_BHTS.shape)
        feats = s_BHTS if c.bias == "none" else jnp.concatenate([s_BHTS, b_BHTS], axis=1)
        if self.conv:
            # tril before the kernel sees the row, so a future key never reaches an allowed entry.
            feats = jnp.where(allowed_BTS[:, None], feats, 0.0)
        if self.conv:
            # The second conv reads hidden units up to k//2 keys to the right, which (through
            # the first conv) depend on allowed entries; extra zero columns make them exist at
            # the array's edge too, so a row's result does not depend on how many (masked) key
            # slots follow it: the full pass and a decode step against a longer cache agree.
            e = 2 * (c.kernel // 2)
            f = self._f(jnp.pad(feats, [(0, 0)] * 3 + [(0, e)]))[..., :s]
        else:
            f = self._f(feats)
        logits = s_BHTS + b_BHTS + f
        logits = jnp.where(allowed_BTS[:, None], logits, -jnp.inf)
        m = jnp.max(logits, axis=-1, keepdims=True)
        p = jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0))
        denom = jnp.sum(p, axis=-1, keepdims=True)
        p = p / jnp.where(denom == 0, 1.0, denom)
        o_BTHK = jnp.einsum("BHTS,BSHV->BTHV", p, v).astype(x_BTD.dtype)
        return self.o(o_BTHK), cache

    @classmethod
    def token_mixing_flops(cls, cfg: DAPEConfig, seq_len: int) -> float:
        """QKᵀ and PV, plus f (and FIRE's bias MLP) at every score, all over the causal half of
        the [T, S] scores as attention is counted: f is real work per score, 2·taps·(C·W + W·H)
        FLOPs per (t, s) with C = H or 2H input channels."""
        h, w = cfg.n_heads, cfg.mlp_width
        taps = cfg.kernel if cls.conv else 1
        c_in = h if cfg.bias == "none" else 2 * h
        per_score = 2.0 * taps * (c_in * w + w * h)
        if cfg.bias == "fire":
            per_score += 2.0 * (cfg.fire_width + cfg.fire_width * h)
        scores = seq_len * 0.5
        return 2.0 * seq_len * h * (cfg.head_dim + cfg.head_dim) * 0.5 + scores * per_score


class DAPE2Config(DAPEConfig):
    pass


register_mixer("dape", DAPEConfig)(DAPE)


@register_mixer("dape2", DAPE2Config)
class DAPE2(DAPE):
    conv = True
