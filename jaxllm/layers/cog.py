"""Cog attention token mixer (`cog`): GQA softmax attention whose weights are signed,
`sign(P) ⊙ softmax(|P|)` (see `jaxllm.ops.cog_attention`).

The authors (trestad/CogAttn, `attn_type='np'`) keep the first and the last layer on plain
softmax for stability; `softmax_layers` (default [0, -1], negative indices count from the end)
reproduces that when every layer is `cog`, and `[]` makes every layer signed. The same
placement can be written with `model.layer_pattern` instead.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
from pydantic import Field

from jaxllm.layers.attn_common import QKVO, AttnVariantConfig, Cache, append, finish_qk, kv_cache
from jaxllm.layers.base import param
from jaxllm.layers.registry import register_mixer
from jaxllm.ops.attention import attention
from jaxllm.ops.cog_attention import cog_attention


class CogConfig(AttnVariantConfig):
    softmax_layers: list[int] = Field(
        default_factory=lambda: [0, -1],
        description="layers (negative = from the end) that stay plain softmax",
    )
    impl: Literal["auto", "reference", "chunked"] = Field(
        "auto", description="auto: chunked when the keys outnumber `block`, else reference"
    )
    block: int = Field(128, ge=1, description="keys per tile of the chunked online softmax")

    @property
    def signed(self) -> bool:
        """Whether this layer uses Cog's signed weights (not one of `softmax_layers`)."""
        return self.layer_index not in {i % self.n_layers for i in self.softmax_layers}

    def scan_key(self) -> dict:
        return {**super().scan_key(), "signed": self.signed}


@register_mixer("cog", CogConfig)
class CogAttention(QKVO):
    """x: [B, T, D] → [B, T, D]; with a cache the T new tokens attend to the whole prefix."""

    def __init__(self, cfg: CogConfig, *, rngs):
        super().__init__(cfg, rngs=rngs)
        self.cfg = cfg
        self.k_norm = (
            param(rngs, (cfg.head_dim,), ("head_dim",), init="ones") if cfg.qk_norm else None
        )
        self.signed = cfg.signed

    def init_cache(self, batch: int, max_len: int) -> Cache:
        return kv_cache(self.cfg, batch, max_len)

    def __call__(self, x_BTD, *, positions_BT, segment_ids_BT=None, cache=None) -> tuple[Any, Any]:
        c = self.cfg
        x_BTD = x_BTD.astype(c.compute_dtype)
        q_BTHK = finish_qk(self.q(x_BTD), self.q_norm, positions_BT, c)
        k_BTGK, v_BTGK = self.kv(x_BTD)
        k_BTGK = finish_qk(k_BTGK, self.k_norm, positions_BT, c)
        kw: dict[str, jax.Array | None] = {"segment_ids_BT": segment_ids_BT}
        if cache is not None:
            cache, qpos, kpos = append(cache, x_BTD.shape[1], k=k_BTGK, v=v_BTGK)
            k_BTGK, v_BTGK = cache["k"], cache["v"]
            kw = {"q_positions_BT": qpos, "kv_positions_BS": kpos}
        if self.signed:
            o_BTHK = cog_attention(q_BTHK, k_BTGK, v_BTGK, impl=c.impl, chunk=c.block, **kw)
        else:
            o_BTHK = attention(q_BTHK, k_BTGK, v_BTGK, impl="reference" if c.impl == "reference"
                               else "auto", **kw)  # fmt: skip
        return self.o(o_BTHK), cache

    @staticmethod
    def token_mixing_flops(cfg: CogConfig, seq_len: int) -> float:
        """As softmax attention (signed or not): QKᵀ and PV halved by the causal mask; the
        sign and |·| are elementwise."""
        return 2.0 * seq_len * cfg.n_heads * (cfg.head_dim + cfg.head_dim) * 0.5
