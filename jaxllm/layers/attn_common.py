"""Pieces the softmax-attention variants share: the options every variant has (GQA comes from
the model dims; RoPE and QK-norm from here), q/k/v projections, and the KV-cache append."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx
from pydantic import Field

from jaxllm.layers.base import LayerConfig, cast, dense, param
from jaxllm.layers.norms import rms_norm
from jaxllm.layers.positions import rope

Cache = dict[str, jax.Array]


class AttnVariantConfig(LayerConfig):
    rope: bool = Field(True, description="rotary positions on q and k")
    rope_theta: float = Field(10000.0, gt=0)
    qk_norm: bool = Field(False, description="per-head RMSNorm on q and k")
    qk_norm_position: Literal["before_rope", "after_rope"] = Field(
        "before_rope", description="Hunyuan-Large normalises after RoPE"
    )


def out_std(cfg: LayerConfig) -> float:
    return cfg.init_std / (2 * cfg.n_layers) ** 0.5


def finish_qk(
    x_BTHK: jax.Array, norm: nnx.Param | None, positions_BT: jax.Array, cfg: AttnVariantConfig
) -> jax.Array:
    """Apply this layer's QK-norm and RoPE to raw projections, in the configured order."""
    if norm is not None and cfg.qk_norm_position == "before_rope":
        x_BTHK = rms_norm(x_BTHK, norm[...], cfg.norm_eps)
    if cfg.rope:
        x_BTHK = rope(x_BTHK, positions_BT, cfg.rope_theta)
    if norm is not None and cfg.qk_norm_position == "after_rope":
        x_BTHK = rms_norm(x_BTHK, norm[...], cfg.norm_eps)
    return x_BTHK


class QKVO(nnx.Module):
    """q [D, H, K], k/v [D, G, K], o [H, K, D] projections and the optional q/k norm scales."""

    def __init__(self, cfg: AttnVariantConfig, *, rngs: nnx.Rngs, kv: bool = True):
        d, h, g, k = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        std, pd = cfg.init_std, cfg.param_dtype
        self.wq = param(rngs, (d, h, k), ("embed", "heads", "head_dim"), std=std, dtype=pd)
        if kv:
            self.wk = param(rngs, (d, g, k), ("embed", "kv_heads", "head_dim"), std=std, dtype=pd)
            self.wv = param(rngs, (d, g, k), ("embed", "kv_heads", "head_dim"), std=std, dtype=pd)
        self.wo = param(rngs, (h, k, d), ("heads", "head_dim", "embed"), std=out_std(cfg), dtype=pd)
        self.q_norm = param(rngs, (k,), ("head_dim",), init="ones") if cfg.qk_norm else None

    def q(self, x_BTD: jax.Array) -> jax.Array:
        return dense(x_BTD, cast(self.wq, x_BTD.dtype), "BTD,DHK->BTHK", name="q")

    def kv(self, x_BTD: jax.Array) -> tuple[jax.Array, jax.Array]:
        dt = x_BTD.dtype
        k_BTGK = dense(x_BTD, cast(self.wk, dt), "BTD,DGK->BTGK", name="k")
        v_BTGK = dense(x_BTD, cast(self.wv, dt), "BTD,DGK->BTGK", name="v")
        return k_BTGK, v_BTGK

    def o(self, o_BTHK: jax.Array) -> jax.Array:
        return dense(o_BTHK, cast(self.wo, o_BTHK.dtype), "BTHK,HKD->BTD", name="o")


def kv_cache(cfg: LayerConfig, batch: int, max_len: int) -> Cache:
    shape = (batch, max_len, cfg.n_kv_heads, cfg.head_dim)
    dt = cfg.compute_dtype
    return {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt), "end": jnp.zeros((), jnp.int32)}


def append(cache: Cache, t: int, **new: jax.Array) -> tuple[Cache, jax.Array, jax.Array]:
    """Write the T new entries of each named [B, T, ...] array at the cache's end.

    Returns the updated cache (end advanced by t), query positions [1, T] and key positions
    [1, S] for masking against the whole buffer (unwritten slots lie in the future).
    """
    end = cache["end"]
    out = dict(cache)
    for name, x in new.items():
        out[name] = jax.lax.dynamic_update_slice_in_dim(cache[name], x.astype(cache[name].dtype),
                                                        end, axis=1)  # fmt: skip
    s = next(iter(out[n] for n in new)).shape[1]
    out["end"] = end + t
    return out, (end + jnp.arange(t))[None], jnp.arange(s)[None]
