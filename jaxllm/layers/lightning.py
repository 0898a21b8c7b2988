"""Linear-attention token mixers built on lightning attention: TNL (`lightning`) and cosFormer2
(`cosformer2`).

Both decode from an O(1) recurrent state (no KV cache): their cache is
``{"state": [B, H, K', V] float32, "end": int32}`` and a call with T new tokens continues it,
so prefill and one-token decoding are one path. Packed rows (`segment_ids_BT`) reset the state
at each document start (`jaxllm.ops.lightning_attention_packed`).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx
from pydantic import Field

from jaxllm.layers.base import ATTN_OUT, LayerConfig, cast, dense, param, tag
from jaxllm.layers.linear_paths import linear_mix
from jaxllm.layers.lrpe import lrpe, lrpe_theta
from jaxllm.layers.norms import rms_norm
from jaxllm.layers.registry import register_mixer
from jaxllm.layers.srms import srms_norm
from jaxllm.ops.lightning_attention_packed import DEFAULT_CHUNK_SIZE
from jaxllm.parallel.core.rules import constrain

Cache = dict[str, jax.Array]
_ACT = ("batch", "length", "act_heads", None)


def alibi_slopes(n_heads: int) -> list[float]:
    """ALiBi's head slopes (Press et al.): 2^(−8(h+1)/H) for H a power of two; otherwise those of
    the nearest smaller power of two, then every other slope of the next one."""

    def pow2(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n_heads).is_integer():
        return pow2(n_heads)
    closest = 2 ** math.floor(math.log2(n_heads))
    return pow2(closest) + alibi_slopes(2 * closest)[0::2][: n_heads - closest]


def tnl_log_decay(
    n_heads: int, layer_index: int, n_layers: int, kind: Literal["official", "fla"] = "official"
) -> jax.Array:
    """log λ [H] of one TNL layer (float32, ≤ 0).

    official (lightning-attention `_build_slope_tensor`, TNL's Hugging Face code):
    λ_{h,l} = exp(−s_h · (1 − l/(L−1) + 1e−5)) with s_h the ALiBi slopes, so layer 0 decays
    fastest and the last layer barely decays. fla (`chunk_lightning_attn`):
    log λ_{h,l} = −(8/H)·h·(1 − l/L), head 0 never decays. The two are not interchangeable:
    a checkpoint trained with one is wrong under the other.
    """
    if kind == "official":
        depth = layer_index / (n_layers - 1) if n_layers > 1 else 0.0
        s = jnp.asarray(alibi_slopes(n_heads), jnp.float32)
        return -s * (1.0 - depth + 1e-5)
    if kind == "fla":
        h = jnp.arange(n_heads, dtype=jnp.float32)
        return -(8.0 / n_heads) * h * (1.0 - layer_index / n_layers)
    raise ValueError(f"unknown decay {kind!r}")


def linear_attention_flops(h: int, k: int, v: int, chunk: int, seq_len: int) -> float:
    """Forward FLOPs per token of chunked linear attention, projections excluded: inside a
    chunk q·k and scores·v over the causal half (C·(K + V) per head, as softmax attention is
    counted), plus q·S and the kᵀv state update (4·K·V per head)."""
    c = min(chunk, seq_len)
    return float(h * (c * (k + v) + 4 * k * v))


def _proj(rngs, cfg, std):
    d, h, k, pd = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.param_dtype
    return param(rngs, (d, h, k), ("embed", "heads", "head_dim"), std=std, dtype=pd)


def _out_proj(rngs, cfg):
    d, h, k, pd = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.param_dtype
    out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
    return param(rngs, (h, k, d), ("heads", "head_dim", "embed"), std=out_std, dtype=pd)


class LightningConfig(LayerConfig):
    decay: Literal["official", "fla", "none"] = Field(
        "official", description="per-head, per-layer decay: official TNL slopes, fla's, or none"
    )
    lrpe: bool = Field(False, description="LRPE on q and k (doubles the state's key dim)")
    output_gate: Literal["linear", "low_rank_sigmoid"] = Field(
        "linear",
        description="u = W_u x (TNL 2023) | σ(W_2 W_1 x) through a head_dim bottleneck (the "
        "Lightning Attention / scaling-law TNL: 12ld² + 2ld²/h parameters)",
    )
    chunk_size: int | None = Field(None, ge=1, description="lightning attention chunk")
    impl: Literal["auto", "reference", "xla", "pallas"] = Field(
        "auto", description="the lightning op's (auto: the Pallas kernel on TPU / GPU, else xla)"
    )


@register_mixer("lightning", LightningConfig)
class Lightning(nnx.Module):
    """TNL's NormLinearAttention: q, k = SiLU(W x) (LRPE optional), v = W_v x, u = W_u x,
    o = lightning(q, k, v; λ), y = W_o (u ⊙ SRMSNorm(o)). x: [B, T, D] → [B, T, D].

    The decay is a fixed per-head, per-layer schedule (`tnl_log_decay`), not a parameter.
    """

    uses_layer = True

    def __init__(self, cfg: LightningConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.wq, self.wk = _proj(rngs, cfg, cfg.init_std), _proj(rngs, cfg, cfg.init_std)
        self.wv = _proj(rngs, cfg, cfg.init_std)
        if cfg.output_gate == "linear":
            self.wu = _proj(rngs, cfg, cfg.init_std)
        else:
            d, h, k, pd = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.param_dtype
            self.w_gate_down = param(rngs, (d, k), ("embed", None), std=cfg.init_std, dtype=pd)
            up_axes = (None, "heads", "head_dim")
            self.w_gate_up = param(rngs, (k, h, k), up_axes, std=cfg.init_std, dtype=pd)
        self.wo = _out_proj(rngs, cfg)
        if cfg.lrpe:
            # Kept flat (1-D) so the optimizer's decay mask (matrices only) leaves it alone.
            theta = lrpe_theta(cfg.n_heads, cfg.head_dim).reshape(-1)
            self.theta = nnx.Param(theta, axes=("norm",))

    @staticmethod
    def token_mixing_flops(cfg: LightningConfig, seq_len: int) -> float:
        k = 2 * cfg.head_dim if cfg.lrpe else cfg.head_dim
        chunk = cfg.chunk_size or DEFAULT_CHUNK_SIZE
        return linear_attention_flops(cfg.n_heads, k, cfg.head_dim, chunk, seq_len)

    def log_decay(self, layer: int | jax.Array | None = None) -> jax.Array | None:
        """log λ [H] of layer `layer` (None = `cfg.layer_index`; an int32 scalar when the
        decoder scans its layers, then looked up in the table of every layer's decay)."""
        c = self.cfg
        if c.decay == "none":
            return None
        if layer is None or isinstance(layer, int):
            index = c.layer_index if layer is None else layer
            return tnl_log_decay(c.n_heads, index, c.n_layers, c.decay)
        table_LH = jnp.stack(
            [tnl_log_decay(c.n_heads, i, c.n_layers, c.decay) for i in range(c.n_layers)]
        )
        return table_LH[layer]

    def init_cache(self, batch: int, max_len: int) -> Cache:
        del max_len  # O(1) state: the length does not matter
        c = self.cfg
        k = 2 * c.head_dim if c.lrpe else c.head_dim
        return {
            "state": jnp.zeros((batch, c.n_heads, k, c.head_dim), jnp.float32),
            "end": jnp.zeros((), jnp.int32),
        }

    def __call__(
        self,
        x_BTD: jax.Array,
        *,
        positions_BT: jax.Array,
        segment_ids_BT: jax.Array | None = None,
        cache: Cache | None = None,
        layer: int | jax.Array | None = None,
    ) -> tuple[jax.Array, Any]:
        c = self.cfg
        dt = c.compute_dtype
        x_BTD = x_BTD.astype(dt)
        q_BTHK = jax.nn.silu(dense(x_BTD, cast(self.wq, dt), "BTD,DHK->BTHK", name="q"))
        k_BTHK = jax.nn.silu(dense(x_BTD, cast(self.wk, dt), "BTD,DHK->BTHK", name="k"))
        v_BTHK = dense(x_BTD, cast(self.wv, dt), "BTD,DHK->BTHK", name="v")
        if c.output_gate == "linear":
            u_BTHK = dense(x_BTD, cast(self.wu, dt), "BTD,DHK->BTHK", name="u")
        else:
            g_BTR = dense(x_BTD, cast(self.w_gate_down, dt), "BTD,DR->BTR", name="gate_down")
            g_BTHK = dense(g_BTR, cast(self.w_gate_up, dt), "BTR,RHK->BTHK", name="gate_up")
            u_BTHK = jax.nn.sigmoid(g_BTHK)
        if c.lrpe:
            theta_HK = self.theta[...].reshape(c.n_heads, -1)
            q_BTHK = lrpe(q_BTHK, positions_BT, theta_HK)
            k_BTHK = lrpe(k_BTHK, positions_BT, theta_HK)
        q_BTHK = tag(constrain(q_BTHK, _ACT), "q")
        k_BTHK = tag(constrain(k_BTHK, _ACT), "k")
        v_BTHK = tag(constrain(v_BTHK, _ACT), "v")
        o_BTHK, cache = linear_mix(
            "lightning", q_BTHK, k_BTHK, v_BTHK, self.log_decay(layer),
            segment_ids_BT=segment_ids_BT, cache=cache, chunk_size=c.chunk_size, impl=c.impl,
        )  # fmt: skip
        b, t, h, k = o_BTHK.shape
        # SRMSNorm over the whole width (h·k), as TNL normalises after merging the heads.
        o_BTHK = srms_norm(o_BTHK.reshape(b, t, h * k), c.norm_eps).reshape(b, t, h, k)
        o_BTHK = tag(constrain(u_BTHK * o_BTHK.astype(dt), _ACT), ATTN_OUT)
        return dense(o_BTHK, cast(self.wo, dt), "BTHK,HKD->BTD", name="o"), cache


class CosFormer2Config(LayerConfig):
    rotary_fraction: float = Field(
        0.5, gt=0, le=1, description="share of the head dim with the cosine re-weighting"
    )
    gate_rank: int | None = Field(None, ge=1, description="output gate bottleneck; None = K")
    chunk_size: int | None = Field(None, ge=1)
    impl: Literal["auto", "reference", "xla", "pallas"] = Field(
        "auto", description="the lightning op's (auto: the Pallas kernel on TPU / GPU, else xla)"
    )


@register_mixer("cosformer2", CosFormer2Config)
class CosFormer2(nnx.Module):
    """cosFormer2: linear attention without decay, q, k = SiLU(W x) with a learnable cosine
    re-weighting (LRPE) on the first `rotary_fraction` of the head dim, a per-head RMSNorm on
    the output gated by σ(W_2 W_1 x) (low rank), then W_o. x: [B, T, D] → [B, T, D].

    Without decay the state is a plain running sum; the output norm makes the layer invariant
    to its growing scale.
    """

    def __init__(self, cfg: CosFormer2Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, h, k, std, pd = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.init_std, cfg.param_dtype
        self.n_rot = max(1, round(cfg.rotary_fraction * k))
        r = cfg.gate_rank or k
        self.wq, self.wk, self.wv = (_proj(rngs, cfg, std) for _ in range(3))
        self.wo = _out_proj(rngs, cfg)
        # Frequencies and norm scale are flat (1-D): no weight decay on them.
        self.theta = nnx.Param(lrpe_theta(h, self.n_rot).reshape(-1), axes=("norm",))
        self.w_gate_down = param(rngs, (d, r), ("embed", None), std=std, dtype=pd)
        self.w_gate_up = param(rngs, (r, h, k), (None, "heads", "head_dim"), std=std, dtype=pd)
        self.norm_scale = param(rngs, (h * k,), ("norm",), init="ones")

    @staticmethod
    def token_mixing_flops(cfg: CosFormer2Config, seq_len: int) -> float:
        k = cfg.head_dim + max(1, round(cfg.rotary_fraction * cfg.head_dim))
        chunk = cfg.chunk_size or DEFAULT_CHUNK_SIZE
        return linear_attention_flops(cfg.n_heads, k, cfg.head_dim, chunk, seq_len)

    def init_cache(self, batch: int, max_len: int) -> Cache:
        del max_len
        c = self.cfg
        shape = (batch, c.n_heads, c.head_dim + self.n_rot, c.head_dim)
        return {"state": jnp.zeros(shape, jnp.float32), "end": jnp.zeros((), jnp.int32)}

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
        q_BTHK = jax.nn.silu(dense(x_BTD, cast(self.wq, dt), "BTD,DHK->BTHK", name="q"))
        k_BTHK = jax.nn.silu(dense(x_BTD, cast(self.wk, dt), "BTD,DHK->BTHK", name="k"))
        v_BTHK = tag(
            constrain(dense(x_BTD, cast(self.wv, dt), "BTD,DHK->BTHK", name="v"), _ACT), "v"
        )
        theta_HR = self.theta[...].reshape(c.n_heads, self.n_rot)
        q_BTHK = tag(constrain(lrpe(q_BTHK, positions_BT, theta_HR), _ACT), "q")
        k_BTHK = tag(constrain(lrpe(k_BTHK, positions_BT, theta_HR), _ACT), "k")
        o_BTHK, cache = linear_mix(
            "lightning", q_BTHK, k_BTHK, v_BTHK, None, segment_ids_BT=segment_ids_BT, cache=cache,
            chunk_size=c.chunk_size, impl=c.impl,
        )  # fmt: skip
        gate_BTR = dense(x_BTD, cast(self.w_gate_down, dt), "BTD,DR->BTR", name="gate_down")
        gate_BTHK = dense(gate_BTR, cast(self.w_gate_up, dt), "BTR,RHK->BTHK", name="gate_up")
        scale_HK = self.norm_scale[...].reshape(c.n_heads, c.head_dim)
        o_BTHK = rms_norm(o_BTHK, scale_HK, c.norm_eps).astype(dt)
        o_BTHK = tag(constrain(jax.nn.sigmoid(gate_BTHK) * o_BTHK, _ACT), ATTN_OUT)
        return dense(o_BTHK, cast(self.wo, dt), "BTHK,HKD->BTD", name="o"), cache
