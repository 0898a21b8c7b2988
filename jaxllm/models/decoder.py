"""The decoder-only language model: embed → blocks → final norm → head."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.layers import registry
from jaxllm.layers.base import DIM_FIELDS, LAYER_INPUT, cast, param, tag
from jaxllm.layers.norms import RMSNorm
from jaxllm.layers.srms import SRMSNorm
from jaxllm.parallel.rules import constrain

_ACT = ("batch", "length", "act_embed")


def layer_config(cfg: ModelConfig, entry: registry.Entry, options: dict, index: int):
    """A layer's own small config: the model-wide dims, then the layer's options."""
    dims = {
        "d_model": cfg.d_model,
        "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.kv_heads,
        "head_dim": cfg.qk_head_dim,
        "d_ff": cfg.d_ff,
        "layer_index": index,
        "n_layers": cfg.n_layers,
        "norm_eps": cfg.norm_eps,
        "init_std": cfg.init_std,
        "dtype": cfg.dtype,
        "param_dtype": cfg.param_dtype,
    }
    assert set(dims) == set(DIM_FIELDS)
    return entry.config_cls(**{**dims, **options})


def _norm(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    """The block / final norm `model.norm` names: RMSNorm, or TNL's scale-free SRMSNorm."""
    cls = SRMSNorm if cfg.norm == "srms" else RMSNorm
    return cls(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)


def _uses_carry(mixer: nnx.Module) -> bool:
    return bool(getattr(type(mixer), "uses_carry", False))


class Block(nnx.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then + ffn(norm(x))."""

    def __init__(self, cfg: ModelConfig, index: int, *, rngs: nnx.Rngs):
        mixer_name = cfg.mixer_names()[index]
        mixer = registry.mixer(mixer_name)
        ffn = registry.ffn(cfg.ffn)
        self.mixer_norm = _norm(cfg, rngs)
        self.mixer = mixer.cls(
            layer_config(cfg, mixer, cfg.mixers.get(mixer_name, {}), index), rngs=rngs
        )
        self.ffn_norm = _norm(cfg, rngs)
        self.ffn = ffn.cls(layer_config(cfg, ffn, cfg.ffns.get(cfg.ffn, {}), index), rngs=rngs)

    def __call__(self, x_BTD, *, positions_BT, segment_ids_BT=None, cache=None, carry=None):
        # `carry` is a dict threaded through the blocks of one forward pass; only mixers that
        # declare `uses_carry = True` (cross-layer KV sharing) see it, and they may read what an
        # earlier layer wrote and write for later ones. Other mixers keep their signature.
        extra = {"carry": {} if carry is None else carry} if _uses_carry(self.mixer) else {}
        x_BTD = tag(x_BTD, LAYER_INPUT)
        h_BTD, cache = self.mixer(
            tag(self.mixer_norm(x_BTD), "mixer_in"),
            positions_BT=positions_BT,
            segment_ids_BT=segment_ids_BT,
            cache=cache,
            **extra,
        )
        x_BTD = tag(constrain(x_BTD + h_BTD.astype(x_BTD.dtype), _ACT), "mixer_out")
        # Channel mixers that declare `uses_tokens` (hash-routed MoE) get the token ids and
        # their data domains.
        ffn_extra = {}
        if getattr(type(self.ffn), "uses_tokens", False):
            ffn_extra = {k: (carry or {}).get(k) for k in ("tokens_BT", "domain_BT")}
        x_BTD = x_BTD + self.ffn(tag(self.ffn_norm(x_BTD), "ffn_in"), **ffn_extra).astype(
            x_BTD.dtype
        )
        return constrain(x_BTD, _ACT), cache


class Decoder(nnx.Module):
    """tokens [B, T] int → logits [B, T, vocab] float32.

    `positions` [B, T] default 0..T-1 (packed data passes per-document positions),
    `segment_ids` [B, T] keep packed documents from attending to each other; `domain` [B, T]
    (the batch's per-token data domain) goes to hash-routed MoE layers. With `cache`
    (from `init_cache`) the call also returns the updated cache: `(logits, cache)`.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = param(
            rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), std=cfg.init_std,
            dtype=cfg.param_dtype,
        )  # fmt: skip
        self.blocks = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.n_layers)])
        self.final_norm = _norm(cfg, rngs)
        if not cfg.tie_embeddings:
            self.head = param(
                rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), std=cfg.init_std,
                dtype=cfg.param_dtype,
            )  # fmt: skip

    def init_cache(self, batch: int, max_len: int | None = None) -> list[Any]:
        max_len = max_len or self.cfg.max_seq_len
        return [blk.mixer.init_cache(batch, max_len) for blk in self.blocks]

    def __call__(
        self,
        tokens_BT: jax.Array,
        *,
        positions_BT: jax.Array | None = None,
        segment_ids_BT: jax.Array | None = None,
        domain_BT: jax.Array | None = None,
        cache: list[Any] | None = None,
        remat: Callable[[Callable], Callable] | None = None,
    ):
        """remat: wraps the per-block function ``f(block, x_BTD, carry) -> (x_BTD, carry)``
        (e.g. in `nnx.remat` with a checkpoint policy; see jaxllm.training.remat); training
        only (no cache)."""
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        b, t = tokens_BT.shape
        if positions_BT is None:
            start = 0 if cache is None else cache[0]["end"]
            positions_BT = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
        x_BTD = jnp.take(cast(self.embed, dt), tokens_BT, axis=0)
        if cfg.scale_embedding:
            x_BTD = x_BTD * jnp.asarray(cfg.d_model**0.5, dt)
        x_BTD = constrain(x_BTD, _ACT)
        new_cache = []
        carry: dict[str, Any] = {"tokens_BT": tokens_BT}
        if domain_BT is not None:
            carry["domain_BT"] = domain_BT
        if remat is not None and cache is None:

            def run(blk, x_BTD, carry):
                carry = dict(carry)
                x_BTD, _ = blk(x_BTD, positions_BT=positions_BT, segment_ids_BT=segment_ids_BT,
                               carry=carry)  # fmt: skip
                return x_BTD, carry

            run = remat(run)
            for blk in self.blocks:
                x_BTD, carry = run(blk, x_BTD, carry)
        else:
            for i, blk in enumerate(self.blocks):
                x_BTD, layer_cache = blk(
                    x_BTD,
                    positions_BT=positions_BT,
                    segment_ids_BT=segment_ids_BT,
                    cache=None if cache is None else cache[i],
                    carry=carry,
                )
                new_cache.append(layer_cache)
        x_BTD = self.final_norm(x_BTD)
        w_DV = cast(self.embed, dt).T if cfg.tie_embeddings else cast(self.head, dt)
        logits_BTV = jnp.einsum("BTD,DV->BTV", x_BTD, w_DV, preferred_element_type=jnp.float32)
        logits_BTV = constrain(logits_BTV, ("batch", "length", "act_vocab"))
        return logits_BTV if cache is None else (logits_BTV, new_cache)
