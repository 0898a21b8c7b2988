"""Cross-layer attention (`cla`; Brandon et al. 2405.12981, as in Hunyuan-Large).

In every group of `share_factor` consecutive layers the first (layer_index % f == 0) owns k/v
projections; the others own only q/o and reuse the producer's K/V. As in Hunyuan's code, what
is shared is the raw projection, before RoPE and before the K norm: each layer applies RoPE and
its own K norm. The producer hands the shared K/V to later layers through the decoder's
per-pass `carry` dict (so modules stay tree-shaped) and, with a cache, keeps the only cache of
its group; consumers' caches hold just the position counter, so the cache shrinks by f.

What the cache stores: with `tie_k_norm` (consumers use the producer's K norm) or no QK-norm
the K is the same for every layer of a group, so the finished (normed, rotated) K is stored.
With untied K norms the raw K is stored and each layer finishes it when it reads the cache.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
from pydantic import Field

from jaxllm.layers.attn_common import QKVO, AttnVariantConfig, Cache, append, finish_qk, kv_cache
from jaxllm.layers.base import param
from jaxllm.layers.registry import register_mixer
from jaxllm.ops.attention import attention


class CLAConfig(AttnVariantConfig):
    share_factor: int = Field(2, ge=1, description="layers per K/V group (CLA-f)")
    tie_k_norm: bool = Field(
        False, description="one K norm per group (the producer's), so the cache holds final K"
    )
    impl: Literal["auto", "reference", "xla", "cudnn"] = "auto"

    def scan_key(self) -> dict:
        return {**super().scan_key(), "producer": self.layer_index % self.share_factor == 0}


@register_mixer("cla", CLAConfig)
class CrossLayerAttention(QKVO):
    """x: [B, T, D] → [B, T, D]. Reads/writes `carry["cla"]` = (raw-or-final K, V, finished)."""

    uses_carry = True

    def __init__(self, cfg: CLAConfig, *, rngs):
        self.producer = cfg.layer_index % cfg.share_factor == 0
        super().__init__(cfg, rngs=rngs, kv=self.producer)
        self.cfg = cfg
        owns_norm = cfg.qk_norm and (self.producer or not cfg.tie_k_norm)
        self.k_norm = (
            param(rngs, (cfg.head_dim,), ("head_dim",), init="ones") if owns_norm else None
        )
        # K is finished once by the producer when every layer of the group would finish it alike.
        self.shared_final = not cfg.qk_norm or cfg.tie_k_norm

    def init_cache(self, batch: int, max_len: int) -> Cache:
        if self.producer:
            return kv_cache(self.cfg, batch, max_len)
        return {"end": jnp.zeros((), jnp.int32)}

    def __call__(
        self, x_BTD, *, positions_BT, segment_ids_BT=None, cache=None, carry=None
    ) -> tuple[Any, Any]:
        c = self.cfg
        x_BTD = x_BTD.astype(c.compute_dtype)
        t = x_BTD.shape[1]
        q_BTHK = finish_qk(self.q(x_BTD), self.q_norm, positions_BT, c)
        kw: dict[str, jax.Array | None] = {"segment_ids_BT": segment_ids_BT}
        kpos_BS = positions_BT
        if self.producer:
            k_BTGK, v_BTGK = self.kv(x_BTD)
            if self.shared_final:
                k_BTGK = finish_qk(k_BTGK, self.k_norm, positions_BT, c)
            if cache is not None:
                cache, qpos, kpos = append(cache, t, k=k_BTGK, v=v_BTGK)
                k_BTGK, v_BTGK = cache["k"], cache["v"]
                kw, kpos_BS = {"q_positions_BT": qpos, "kv_positions_BS": kpos}, kpos
            if carry is not None:
                carry["cla"] = (k_BTGK, v_BTGK, kpos_BS, kw)
        else:
            if carry is None or "cla" not in carry:
                raise ValueError(
                    f"cla layer {c.layer_index} reuses K/V of layer "
                    f"{c.layer_index - c.layer_index % c.share_factor}, which must be a cla layer "
                    "of the same model called in the same pass"
                )
            k_BTGK, v_BTGK, kpos_BS, kw = carry["cla"]
            if cache is not None:
                cache = {"end": cache["end"] + t}
        if not self.shared_final:
            k_BTGK = finish_qk(k_BTGK, self.k_norm, jnp.broadcast_to(kpos_BS, k_BTGK.shape[:2]), c)
        o_BTHK = attention(q_BTHK, k_BTGK, v_BTGK, impl=c.impl, **kw)
        return self.o(o_BTHK), cache

    @staticmethod
    def token_mixing_flops(cfg: CLAConfig, seq_len: int) -> float:
        """Every layer, producer or consumer, scores its own queries against the shared K/V:
        QKᵀ and PV halved by the causal mask, as softmax attention is counted."""
        return 2.0 * seq_len * cfg.n_heads * (cfg.head_dim + cfg.head_dim) * 0.5
