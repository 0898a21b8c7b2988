"""HGRN2 token mixer: a gated linear RNN with outer-product state expansion (arXiv 2404.07904).

Per head (H = d_model / K heads of K state channels and V = d_model / H values):

    f_t = γ + (1 − γ) σ(W_f x_t),   k_t = 1 − f_t,   q_t = SiLU(W_q x_t),   i_t = W_i x_t,
    S_t = diag(f_t) S_{t−1} + k_tᵀ i_t,   o_t = q_t S_t,   y_t = W_o RMSNorm(o_t),

the core being `jaxllm.ops.gated_linear_attention` with log_gate = log f (no 1/√K scaling).

The forget gate's lower bound γ grows with depth, so upper layers keep longer memories. fla
computes γ_l = cumsum(softmax(Γ, layers))_l − Γ's first share from a parameter shared by all
layers; NNX modules here are tree-shaped (no shared parameter), so each layer owns one logit
β_l and the bound is built layer by layer through the decoder's carry:

    1 − γ_l = (1 − γ_{l−1}) σ(−β_l),   γ_0 = 0,

monotone in l by construction; β_l starts at logit(1/(L − l + 1)), which gives γ_l = l/L at
initialisation — fla's starting point. Everything is kept in log space (log(1 − γ)), so
k = 1 − f = exp(log(1 − γ) + log σ(−z)) never cancels.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx
from pydantic import Field

from jaxllm.layers.base import ATTN_OUT, LayerConfig, cast, dense, param, tag
from jaxllm.layers.lightning import linear_attention_flops
from jaxllm.layers.linear_paths import linear_mix
from jaxllm.layers.norms import rms_norm
from jaxllm.layers.registry import register_mixer
from jaxllm.ops.gated_linear_attention import DEFAULT_CHUNK_SIZE as GLA_CHUNK_SIZE
from jaxllm.parallel.core.rules import constrain

Cache = dict[str, jax.Array]
_ACT = ("batch", "length", "act_heads", None)
CARRY_KEY = "hgrn2_log1m_lower_bound"


class HGRN2Config(LayerConfig):
    expand_ratio: int | None = Field(
        None, ge=1, description="state channels K per head (H = d_model / K); None = head_dim"
    )
    lower_bound: bool = Field(True, description="the learned, layer-monotone forget-gate floor")
    chunk_size: int | None = Field(None, ge=1)
    impl: Literal["auto", "reference", "xla", "pallas"] = Field(
        "auto",
        description="the gated linear attention op's (auto: the Pallas kernel on TPU / GPU, "
        "else xla); pallas: the kernel everywhere (interpreted on the CPU)",
    )

    @property
    def has_bound(self) -> bool:
        """Layer 0 has no lower bound; every later layer raises the previous one's."""
        return self.lower_bound and self.layer_index > 0

    def scan_key(self) -> dict:
        return {**super().scan_key(), "has_bound": self.has_bound}


@register_mixer("hgrn2", HGRN2Config)
class HGRN2(nnx.Module):
    """HGRN2 (see the module docstring). x: [B, T, D] → [B, T, D]; cache = the [B, H, K, V]
    float32 state."""

    uses_carry = True

    def __init__(self, cfg: HGRN2Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, std, pd = cfg.d_model, cfg.init_std, cfg.param_dtype
        k = cfg.expand_ratio or cfg.head_dim
        if d % k:
            raise ValueError(f"hgrn2: expand_ratio={k} must divide d_model={d}")
        h = d // k
        self.h, self.k, self.v = h, k, d // h
        axes = ("embed", "heads", "head_dim")
        self.wq = param(rngs, (d, h, k), axes, std=std, dtype=pd)
        self.wf = param(rngs, (d, h, k), axes, std=std, dtype=pd)
        self.wi = param(rngs, (d, h, self.v), axes, std=std, dtype=pd)
        out_std = std / (2 * cfg.n_layers) ** 0.5
        self.wo = param(rngs, (h, self.v, d), ("heads", "head_dim", "embed"), std=out_std, dtype=pd)
        # Scale and bound logits are flat (1-D), so the optimizer's decay mask skips them.
        self.norm_scale = param(rngs, (d,), ("norm",), init="ones")
        self.has_bound = cfg.has_bound
        if self.has_bound:
            p = 1.0 / (cfg.n_layers - cfg.layer_index + 1)
            beta = jnp.full((h * k,), math.log(p / (1.0 - p)), jnp.float32)
            self.lower_bound_logit = nnx.Param(beta, axes=("norm",))

    @staticmethod
    def token_mixing_flops(cfg: HGRN2Config, seq_len: int) -> float:
        k = cfg.expand_ratio or cfg.head_dim
        h = cfg.d_model // k
        chunk = cfg.chunk_size or GLA_CHUNK_SIZE
        return linear_attention_flops(h, k, cfg.d_model // h, chunk, seq_len)

    def init_cache(self, batch: int, max_len: int) -> Cache:
        del max_len
        return {
            "state": jnp.zeros((batch, self.h, self.k, self.v), jnp.float32),
            "end": jnp.zeros((), jnp.int32),
        }

    def gates(self, z_BTHK: jax.Array, carry: dict) -> tuple[jax.Array, jax.Array]:
        """(log f, k = 1 − f) from the gate pre-activation, float32; updates the carry."""
        z = z_BTHK.astype(jnp.float32)
        log1m_prev = carry.get(CARRY_KEY, jnp.zeros((self.h, self.k), jnp.float32))
        if not self.has_bound:
            carry[CARRY_KEY] = log1m_prev
            return jax.nn.log_sigmoid(z), jax.nn.sigmoid(-z)
        beta_HK = self.lower_bound_logit[...].astype(jnp.float32).reshape(self.h, self.k)
        log1m = log1m_prev + jax.nn.log_sigmoid(-beta_HK)
        carry[CARRY_KEY] = log1m
        log_bound = jnp.log(-jnp.expm1(log1m))
        log_f = jnp.logaddexp(log_bound, log1m + jax.nn.log_sigmoid(z))
        return log_f, jnp.exp(log1m + jax.nn.log_sigmoid(-z))

    def __call__(
        self,
        x_BTD: jax.Array,
        *,
        positions_BT: jax.Array,
        segment_ids_BT: jax.Array | None = None,
        cache: Cache | None = None,
        carry: dict | None = None,
    ) -> tuple[jax.Array, Any]:
        del positions_BT  # the recurrence is its own position signal
        c = self.cfg
        dt = c.compute_dtype
        carry = {} if carry is None else carry
        x_BTD = x_BTD.astype(dt)
        q_BTHK = jax.nn.silu(dense(x_BTD, cast(self.wq, dt), "BTD,DHK->BTHK", name="q"))
        z_BTHK = dense(x_BTD, cast(self.wf, dt), "BTD,DHK->BTHK", name="f")
        i_BTHV = dense(x_BTD, cast(self.wi, dt), "BTD,DHV->BTHV", name="i")
        log_f_BTHK, k_BTHK = self.gates(z_BTHK, carry)
        q_BTHK = tag(constrain(q_BTHK, _ACT), "q")
        k_BTHK = tag(constrain(k_BTHK.astype(dt), _ACT), "k")
        i_BTHV = tag(constrain(i_BTHV, _ACT), "v")
        o_BTHV, cache = linear_mix(
            "gla", q_BTHK, k_BTHK, i_BTHV, log_f_BTHK, segment_ids_BT=segment_ids_BT, cache=cache,
            chunk_size=c.chunk_size, impl=c.impl,
        )  # fmt: skip
        b, t = o_BTHV.shape[:2]
        # fla's g_norm: RMSNorm over the merged width with a learned scale.
        o_BTD = rms_norm(o_BTHV.reshape(b, t, -1), self.norm_scale[...], c.norm_eps)
        o_BTHV = tag(constrain(o_BTD.reshape(o_BTHV.shape).astype(dt), _ACT), ATTN_OUT)
        return dense(o_BTHV, cast(self.wo, dt), "BTHV,HVD->BTD", name="o"), cache
