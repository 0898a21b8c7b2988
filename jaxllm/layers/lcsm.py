"""LCSM: the Expand–Oscillation–Shrink (EOS) framework of linear sequence models as one mixer.

Per head, with a memory m_t ∈ R^{K×V} (Qin et al., "Unlocking the Secrets of Linear Complexity
Sequence Model from A Unified Perspective", arXiv 2405.17383):

    expand  e_t = act_e(W_e x_t) ∈ R^K        (the key)
    input   i_t = W_i x_t ∈ R^V               (the value)
    oscillation  m_t = diag(o_t) m_{t−1} + e_t i_tᵀ
    shrink  s_t = act_s(W_s x_t) ∈ R^K,  y_t = m_tᵀ s_t,   out = W_o RMSNorm(y)

The oscillation o_t picks the family member:
- `none`:   o = 1 (linear attention, cosFormer-like without re-weighting);
- `static`: o = λ_h, a learned per-head decay initialised from TNL's slopes (TNL-like); it
  learns through every impl, the lightning kernel included;
- `data`:   o_t = exp(log σ(W_o x_t) / τ), per channel and token (HGRN2 / GLA-like).
With `expand: one_minus_gate` (data oscillation only) e_t = 1 − o_t, HGRN2's tied key.
So TNL-, HGRN2- and linear-attention-like layers are points of one configuration space. The
static and no-decay memories run on lightning attention, the data-dependent one on gated
linear attention; both decode from the O(1) memory.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx
from pydantic import Field, model_validator

from jaxllm.layers.base import ATTN_OUT, LayerConfig, cast, dense, param, tag
from jaxllm.layers.lightning import linear_attention_flops, tnl_log_decay
from jaxllm.layers.linear_paths import linear_mix
from jaxllm.layers.norms import rms_norm
from jaxllm.layers.registry import register_mixer
from jaxllm.parallel.core.rules import constrain

Cache = dict[str, jax.Array]
_ACT = ("batch", "length", "act_heads", None)
_ACTIVATIONS = {
    "none": lambda x: x,
    "silu": jax.nn.silu,
    "sigmoid": jax.nn.sigmoid,
    "elu1": lambda x: jax.nn.elu(x) + 1.0,
}


class LCSMConfig(LayerConfig):
    oscillation: Literal["none", "static", "data"] = Field(
        "data", description="memory decay: none (λ=1), static (learned per head), data"
    )
    expand: Literal["none", "silu", "sigmoid", "elu1", "one_minus_gate"] = Field(
        "silu", description="activation of the expand (key) branch; one_minus_gate: e = 1 − o"
    )
    shrink: Literal["none", "silu", "sigmoid", "elu1"] = Field(
        "silu", description="activation of the shrink (query) branch"
    )
    state_dim: int | None = Field(
        None, ge=1, description="K, memory rows per head; None = head_dim"
    )
    tau: float = Field(16.0, gt=0, description="data oscillation temperature (EOS uses 16)")
    chunk_size: int | None = Field(None, ge=1)
    impl: Literal["auto", "reference", "xla", "pallas"] = Field(
        "auto",
        description="the memory op's (auto: the Pallas kernel on TPU / GPU, lightning for the "
        "static and no-decay memories, gated linear attention for data; else xla); pallas: "
        "the kernel everywhere (interpreted on the CPU)",
    )

    @model_validator(mode="after")
    def _check(self) -> LCSMConfig:
        if self.expand == "one_minus_gate" and self.oscillation != "data":
            raise ValueError("lcsm: expand=one_minus_gate needs oscillation=data")
        return self


@register_mixer("lcsm", LCSMConfig)
class LCSM(nnx.Module):
    """One EOS layer (see the module docstring). x: [B, T, D] → [B, T, D]."""

    def __init__(self, cfg: LCSMConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, h, v, std, pd = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.init_std, cfg.param_dtype
        k = cfg.state_dim or cfg.head_dim
        self.k = k
        axes = ("embed", "heads", "head_dim")
        self.ws = param(rngs, (d, h, k), axes, std=std, dtype=pd)
        self.wi = param(rngs, (d, h, v), axes, std=std, dtype=pd)
        if cfg.expand != "one_minus_gate":
            self.we = param(rngs, (d, h, k), axes, std=std, dtype=pd)
        if cfg.oscillation == "data":
            self.wg = param(rngs, (d, h, k), axes, std=std, dtype=pd)
        if cfg.oscillation == "static":
            # λ = exp(−softplus(ρ)) keeps the decay in (0, 1) while learning it.
            s = -tnl_log_decay(h, cfg.layer_index, cfg.n_layers, "official")
            self.decay_rho = nnx.Param(jnp.log(jnp.expm1(s)), axes=("heads",))
        out_std = std / (2 * cfg.n_layers) ** 0.5
        self.wo = param(rngs, (h, v, d), ("heads", "head_dim", "embed"), std=out_std, dtype=pd)
        self.norm_scale = param(rngs, (h * v,), ("norm",), init="ones")  # 1-D: not decayed

    @staticmethod
    def token_mixing_flops(cfg: LCSMConfig, seq_len: int) -> float:
        k = cfg.state_dim or cfg.head_dim
        chunk = cfg.chunk_size or 64
        return linear_attention_flops(cfg.n_heads, k, cfg.head_dim, chunk, seq_len)

    def init_cache(self, batch: int, max_len: int) -> Cache:
        del max_len
        c = self.cfg
        return {
            "state": jnp.zeros((batch, c.n_heads, self.k, c.head_dim), jnp.float32),
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
        del positions_BT
        c = self.cfg
        dt = c.compute_dtype
        x_BTD = x_BTD.astype(dt)
        s_BTHK = dense(x_BTD, cast(self.ws, dt), "BTD,DHK->BTHK", name="q")
        s_BTHK = tag(constrain(_ACTIVATIONS[c.shrink](s_BTHK), _ACT), "q")
        i_BTHV = tag(
            constrain(dense(x_BTD, cast(self.wi, dt), "BTD,DHV->BTHV", name="v"), _ACT), "v"
        )
        if c.oscillation == "data":
            z_BTHK = dense(x_BTD, cast(self.wg, dt), "BTD,DHK->BTHK", name="g").astype(jnp.float32)
            log_o_BTHK = jax.nn.log_sigmoid(z_BTHK) / c.tau
        if c.expand == "one_minus_gate":
            e_BTHK = -jnp.expm1(log_o_BTHK)
        else:
            e_BTHK = _ACTIVATIONS[c.expand](
                dense(x_BTD, cast(self.we, dt), "BTD,DHK->BTHK", name="k")
            )
        e_BTHK = tag(constrain(e_BTHK.astype(dt), _ACT), "k")
        kw = dict(segment_ids_BT=segment_ids_BT, cache=cache, chunk_size=c.chunk_size, impl=c.impl)
        if c.oscillation == "data":
            y_BTHV, cache = linear_mix("gla", s_BTHK, e_BTHK, i_BTHV, log_o_BTHK, **kw)
        else:
            log_decay = -jax.nn.softplus(self.decay_rho[...]) if c.oscillation == "static" else None
            y_BTHV, cache = linear_mix("lightning", s_BTHK, e_BTHK, i_BTHV, log_decay, **kw)
        scale_HV = self.norm_scale[...].reshape(c.n_heads, c.head_dim)
        y_BTHV = rms_norm(y_BTHV, scale_HV, c.norm_eps).astype(dt)
        y_BTHV = tag(constrain(y_BTHV, _ACT), ATTN_OUT)
        return dense(y_BTHV, cast(self.wo, dt), "BTHV,HVD->BTD", name="o"), cache
