"""Attention MoE (`attn_moe`, LLaMA-MoE v2 2411.15708): the experts of an attention layer are
its KV groups.

Expert e owns kv head e (k/v projections), its H/G query heads and their rows of the output
projection. A router (softmax over G, top-k, renormalized, times `scale`) sends each token to
k experts, and **each expert attends only over the tokens routed to it** — the authors compact
each expert's sequence (keeping the original RoPE positions) and keep a per-expert KV cache.
With static shapes the same thing is a per-group key mask: key s is visible to expert e iff
token s was routed to e. The output is Σ_e w_te · scale · o_e. With every token routed to every
expert and w·scale = 1 it is exactly the dense GQA layer it was cut from
(`jaxllm.models.from_dense.attention_moe_from_dense`).

Shapes: B batch, T queries, S keys, H query heads, G kv heads = experts, K head dim.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from pydantic import Field

from jaxllm.layers.base import LayerConfig, cast, dense, param
from jaxllm.layers.positions import rope
from jaxllm.layers.registry import register_mixer
from jaxllm.ops import moe_routing as R

Cache = dict[str, jax.Array]


class AttnMoEConfig(LayerConfig):
    top_k: int = Field(2, ge=1, description="kv-group experts per token (≤ n_kv_heads)")
    scale: float = Field(1.0, gt=0, description="scale_factor_attn (the authors use 4.0 for 7/8)")
    renormalize: bool = True
    rope_theta: float = Field(10000.0, gt=0)
    lb_loss: float = Field(0.01, ge=0, description="Mixtral load-balancing loss weight")


def attend_routed(q_BTHK, k_BSGK, v_BSGK, routed_BSG, q_pos_BT, k_pos_BS, segment_ids=None):
    """[B, T, G, H/G, K] float32: per kv group e, causal attention of every query over the keys
    routed to e (plus itself, so that rows of unrouted queries stay finite; their output is
    discarded by a zero weight)."""
    b, t, h, kd = q_BTHK.shape
    g = k_BSGK.shape[2]
    q = q_BTHK.astype(jnp.float32).reshape(b, t, g, h // g, kd)
    s_BGJTS = jnp.einsum("BTGJK,BSGK->BGJTS", q, k_BSGK.astype(jnp.float32)) * kd**-0.5
    causal_BTS = k_pos_BS[:, None, :] <= q_pos_BT[:, :, None]
    self_BTS = k_pos_BS[:, None, :] == q_pos_BT[:, :, None]
    visible_BGTS = causal_BTS[:, None] & (
        routed_BSG.transpose(0, 2, 1)[:, :, None, :] | self_BTS[:, None]
    )
    if segment_ids is not None:
        visible_BGTS = visible_BGTS & (
            segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
        )
    s_BGJTS = jnp.where(visible_BGTS[:, :, None], s_BGJTS, -jnp.inf)
    p = jax.nn.softmax(s_BGJTS, axis=-1)
    return jnp.einsum("BGJTS,BSGK->BTGJK", p, v_BSGK.astype(jnp.float32))


@register_mixer("attn_moe", AttnMoEConfig)
class AttentionMoE(nnx.Module):
    """x: [B, T, D] → [B, T, D]; the KV cache also keeps which expert each cached token went
    to, so decoding attends over the same per-expert token sets as the parallel pass."""

    def __init__(self, cfg: AttnMoEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, h, g, k = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        if cfg.top_k > g:
            raise ValueError(f"attn_moe top_k={cfg.top_k} exceeds the {g} kv-group experts")
        std, pd = cfg.init_std, cfg.param_dtype
        out_std = std / (2 * cfg.n_layers) ** 0.5
        self.wq = param(rngs, (d, h, k), ("embed", "heads", "head_dim"), std=std, dtype=pd)
        self.wk = param(rngs, (d, g, k), ("embed", "kv_heads", "head_dim"), std=std, dtype=pd)
        self.wv = param(rngs, (d, g, k), ("embed", "kv_heads", "head_dim"), std=std, dtype=pd)
        self.wo = param(rngs, (h, k, d), ("heads", "head_dim", "embed"), std=out_std, dtype=pd)
        self.w_router = param(rngs, (d, g), ("embed", None), std=std)

    def init_cache(self, batch: int, max_len: int) -> Cache:
        c = self.cfg
        shape = (batch, max_len, c.n_kv_heads, c.head_dim)
        return {
            "k": jnp.zeros(shape, c.compute_dtype),
            "v": jnp.zeros(shape, c.compute_dtype),
            "routed": jnp.zeros((batch, max_len, c.n_kv_heads), bool),
            "end": jnp.zeros((), jnp.int32),
        }

    def route(self, x_BTD: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(weights_BTG float32 with w·scale of the chosen experts, routed_BTG bool)."""
        c = self.cfg
        b, t, _ = x_BTD.shape
        logits = jnp.einsum("BTD,DG->BTG", x_BTD.astype(jnp.float32), self.w_router[...])
        routing, probs = R.route(
            logits.reshape(b * t, -1), kind="softmax", top_k=c.top_k,
            renormalize=c.renormalize, scale=c.scale,
        )  # fmt: skip
        if c.lb_loss > 0:
            lb = R.load_balancing_loss(routing, probs)
            self.sow(nnx.Intermediate, "metric_attn_moe_lb_loss", lb)
            self.sow(nnx.Intermediate, "aux_loss", c.lb_loss * lb)
        onehot = jax.nn.one_hot(routing.experts_TK, c.n_kv_heads)
        w_BTG = jnp.einsum("TKG,TK->TG", onehot, routing.weights_TK).reshape(b, t, -1)
        routed_BTG = jnp.sum(onehot, axis=1).reshape(b, t, -1) > 0
        return w_BTG, routed_BTG

    def __call__(
        self,
        x_BTD: jax.Array,
        *,
        positions_BT: jax.Array,
        segment_ids_BT: jax.Array | None = None,
        cache: Cache | None = None,
    ) -> tuple[jax.Array, Any]:
        w_BTG, routed_BTG = self.route(x_BTD)
        return self.forward(x_BTD, w_BTG, routed_BTG, positions_BT, segment_ids_BT, cache)

    def forward(self, x_BTD, w_BTG, routed_BTG, positions_BT, segment_ids_BT=None, cache=None):
        """The layer for a given routing (tests force every expert with weight 1)."""
        c = self.cfg
        dt = c.compute_dtype
        x_BTD = x_BTD.astype(dt)
        q = dense(x_BTD, cast(self.wq, dt), "BTD,DHK->BTHK", name="q")
        k = dense(x_BTD, cast(self.wk, dt), "BTD,DGK->BTGK", name="k")
        q, k = rope(q, positions_BT, c.rope_theta), rope(k, positions_BT, c.rope_theta)
        v = dense(x_BTD, cast(self.wv, dt), "BTD,DGK->BTGK", name="v")
        if cache is None:
            o = attend_routed(q, k, v, routed_BTG, positions_BT, positions_BT, segment_ids_BT)
        else:
            end = cache["end"]
            upd = jax.lax.dynamic_update_slice_in_dim
            k_all = upd(cache["k"], k.astype(cache["k"].dtype), end, axis=1)
            v_all = upd(cache["v"], v.astype(cache["v"].dtype), end, axis=1)
            r_all = upd(cache["routed"], routed_BTG, end, axis=1)
            b, t, s = x_BTD.shape[0], x_BTD.shape[1], k_all.shape[1]
            q_pos = jnp.broadcast_to((end + jnp.arange(t))[None], (b, t))
            k_pos = jnp.broadcast_to(jnp.arange(s)[None], (b, s))
            # slots not yet written sit at positions > every query: the causal mask hides them
            o = attend_routed(q, k_all, v_all, r_all, q_pos, k_pos)
            cache = {"k": k_all, "v": v_all, "routed": r_all, "end": end + t}
        o_BTGJK = o * w_BTG[..., None, None]
        o_BTHK = o_BTGJK.reshape(*o_BTGJK.shape[:2], c.n_heads, c.head_dim).astype(dt)
        return dense(o_BTHK, cast(self.wo, dt), "BTHK,HKD->BTD", name="o"), cache

    @staticmethod
    def token_mixing_flops(cfg: AttnMoEConfig, seq_len: int) -> float:
        """The active experts' attention only: a token's query heads go to top_k of the G
        experts, and each expert attends over the tokens routed to it, T·top_k/G of them under
        balanced routing, so the dense causal count is scaled by (top_k/G)² (the layer's
        static-shape form masks instead of compacting, but the work it needs is this)."""
        active = cfg.top_k / cfg.n_kv_heads
        return 2.0 * seq_len * cfg.n_heads * (cfg.head_dim + cfg.head_dim) * 0.5 * active**2

    @staticmethod
    def inactive_params(cfg: AttnMoEConfig) -> int:
        """Projection weights a token leaves idle: the q/o rows of the H/G heads and the k/v
        head of each of the G − top_k experts it is not routed to; the router is always active."""
        d, h, g, k = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        per_expert = 2 * d * (h // g) * k + 2 * d * k
        return (g - cfg.top_k) * per_expert
