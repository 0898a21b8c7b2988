"""Softmax attention token mixer: grouped-query heads, RoPE, optional QK-norm, KV cache."""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx
from pydantic import Field

from jaxllm.layers.base import ATTN_OUT, LayerConfig, cast, dense, param, tag
from jaxllm.layers.norms import rms_norm
from jaxllm.layers.positions import RopeScaling, rope
from jaxllm.layers.registry import register_mixer
from jaxllm.ops.attention import attention
from jaxllm.parallel import sequence
from jaxllm.parallel.core.rules import constrain

Cache = dict[str, jax.Array]


class AttentionConfig(LayerConfig):
    rope_theta: float = Field(10000.0, gt=0)
    rope_scaling: RopeScaling | None = Field(None, description="long-context RoPE scaling")
    qk_norm: bool = Field(False, description="RMSNorm on q and k per head (after projection)")
    qkv_bias: bool = Field(False, description="biases on the q, k, v projections (Qwen2)")
    out_bias: bool = Field(False, description="bias on the output projection")
    impl: Literal["auto", "reference", "xla", "cudnn"] = "auto"


@register_mixer("softmax", AttentionConfig)
class Attention(nnx.Module):
    """Multi-head causal attention with G kv heads shared by H/G query heads each.

    x: [B, T, D] → [B, T, D]. With a cache (from `init_cache`), the T new tokens are written at
    the cache's end and attend to everything before them: prefill and one-token decoding are
    the same code path.
    """

    def __init__(self, cfg: AttentionConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, h, g, k = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        std, pd = cfg.init_std, cfg.param_dtype
        out_std = std / (2 * cfg.n_layers) ** 0.5
        self.wq = param(rngs, (d, h, k), ("embed", "heads", "head_dim"), std=std, dtype=pd)
        self.wk = param(rngs, (d, g, k), ("embed", "kv_heads", "head_dim"), std=std, dtype=pd)
        self.wv = param(rngs, (d, g, k), ("embed", "kv_heads", "head_dim"), std=std, dtype=pd)
        self.wo = param(rngs, (h, k, d), ("heads", "head_dim", "embed"), std=out_std, dtype=pd)
        if cfg.qk_norm:
            self.q_norm = param(rngs, (k,), ("head_dim",), init="ones")
            self.k_norm = param(rngs, (k,), ("head_dim",), init="ones")
        if cfg.qkv_bias:
            self.bq = param(rngs, (h, k), ("heads", "head_dim"), init="zeros", dtype=pd)
            self.bk = param(rngs, (g, k), ("kv_heads", "head_dim"), init="zeros", dtype=pd)
            self.bv = param(rngs, (g, k), ("kv_heads", "head_dim"), init="zeros", dtype=pd)
        if cfg.out_bias:
            self.bo = param(rngs, (d,), ("embed",), init="zeros", dtype=pd)

    def init_cache(self, batch: int, max_len: int) -> Cache:
        c = self.cfg
        shape = (batch, max_len, c.n_kv_heads, c.head_dim)
        return {
            "k": jnp.zeros(shape, c.compute_dtype),
            "v": jnp.zeros(shape, c.compute_dtype),
            "end": jnp.zeros((), jnp.int32),
        }

    def __call__(
        self,
        x_BTD: jax.Array,
        *,
        positions_BT: jax.Array,
        segment_ids_BT: jax.Array | None = None,
        cache: Cache | None = None,
    ) -> tuple[jax.Array, Any]:
        c = self.cfg
        dt = c.compute_dtype
        x_BTD = x_BTD.astype(dt)
        q_BTHK = dense(x_BTD, cast(self.wq, dt), "BTD,DHK->BTHK", name="q")
        k_BTGK = dense(x_BTD, cast(self.wk, dt), "BTD,DGK->BTGK", name="k")
        v_BTGK = dense(x_BTD, cast(self.wv, dt), "BTD,DGK->BTGK", name="v")
        if c.qkv_bias:
            q_BTHK = q_BTHK + cast(self.bq, dt)
            k_BTGK = k_BTGK + cast(self.bk, dt)
            v_BTGK = v_BTGK + cast(self.bv, dt)
        if c.qk_norm:
            q_BTHK = rms_norm(q_BTHK, self.q_norm[...], c.norm_eps)
            k_BTGK = rms_norm(k_BTGK, self.k_norm[...], c.norm_eps)
        q_BTHK = constrain(rope(q_BTHK, positions_BT, c.rope_theta, c.rope_scaling), _ACT_Q)
        k_BTGK = constrain(rope(k_BTGK, positions_BT, c.rope_theta, c.rope_scaling), _ACT_KV)
        q_BTHK, k_BTGK = tag(q_BTHK, "q"), tag(k_BTGK, "k")
        v_BTGK = tag(constrain(v_BTGK, _ACT_KV), "v")

        if cache is None and (sp := sequence.active("softmax")) is not None:
            # a mesh with a `sequence` axis: all-gather / Ulysses (jaxllm.parallel.sequence)
            o_BTHK = sequence.attention_sp(
                q_BTHK, k_BTGK, v_BTGK, mesh=sp[0], impl=sp[1], segment_ids_BT=segment_ids_BT,
                attn_impl=c.impl,
            )  # fmt: skip
        elif cache is None:
            o_BTHK = attention(q_BTHK, k_BTGK, v_BTGK, segment_ids_BT=segment_ids_BT, impl=c.impl)
        else:
            end = cache["end"]
            k_BSGK = jax.lax.dynamic_update_slice_in_dim(cache["k"], k_BTGK, end, axis=1)
            v_BSGK = jax.lax.dynamic_update_slice_in_dim(cache["v"], v_BTGK, end, axis=1)
            t, s = x_BTD.shape[1], k_BSGK.shape[1]
            o_BTHK = attention(
                q_BTHK,
                k_BSGK,
                v_BSGK,
                q_positions_BT=(end + jnp.arange(t))[None],
                kv_positions_BS=jnp.arange(s)[None],
                impl=c.impl,
            )
            cache = {"k": k_BSGK, "v": v_BSGK, "end": end + t}
        o_BTHK = tag(constrain(o_BTHK, _ACT_Q), ATTN_OUT)
        y_BTD = dense(o_BTHK, cast(self.wo, dt), "BTHK,HKD->BTD", name="o")
        if c.out_bias:
            y_BTD = y_BTD + cast(self.bo, dt)
        return y_BTD, cache

    @staticmethod
    def token_mixing_flops(cfg: AttentionConfig, seq_len: int) -> float:
        """Forward FLOPs per token beyond the projections: QKᵀ and PV (2·T·H·K each), halved
        by the causal mask as MaxText counts them."""
        return 2.0 * seq_len * cfg.n_heads * (cfg.head_dim + cfg.head_dim) * 0.5


_ACT_Q = ("batch", "length", "act_heads", None)
_ACT_KV = ("batch", "length", "act_kv_heads", None)
