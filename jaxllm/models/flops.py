"""Parameter and FLOP counts for throughput and MFU."""

from __future__ import annotations

import jax
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.layers import registry
from jaxllm.models.decoder import layer_config


def param_count(model: nnx.Module) -> dict[str, int]:
    """{"total", "embedding"}: parameter counts (the embedding lookup does no matmul)."""
    params = nnx.state(model, nnx.Param)
    total = sum(x.size for x in jax.tree.leaves(params))
    emb = model.embed[...].size if hasattr(model, "embed") else 0
    return {"total": int(total), "embedding": int(emb)}


def flops_per_token(cfg: ModelConfig, n_params: int, n_embedding: int, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3 × forward).

    Matmuls: 2 FLOPs per weight per token for every weight but the embedding lookup (a tied
    head still counts once). Layers that use only part of their weights per token (mixtures of
    experts, in the FFN or the mixer) say how many they leave idle through an
    `inactive_params(layer_cfg)` hook, and MFU counts the active ones only.

    Token mixing: every token mixer reports its own forward FLOPs per token beyond its weights
    (attention scores and PV, a linear-attention state, ...) through a
    `token_mixing_flops(layer_cfg, seq_len)` hook; a mixer without one is an error, not a zero.
    """
    matmul_params = n_params - n_embedding + (n_embedding if cfg.tie_embeddings else 0)
    ffn = registry.ffn(cfg.ffn)
    mixing = 0.0
    for index, name in enumerate(cfg.mixer_names()):
        entry = registry.mixer(name)
        count = getattr(entry.cls, "token_mixing_flops", None)
        if count is None:
            raise TypeError(
                f"token mixer {name!r} ({entry.cls.__name__}) defines no "
                "token_mixing_flops(layer_cfg, seq_len): its FLOPs per token are unknown"
            )
        layer_cfg = layer_config(cfg, entry, cfg.mixers.get(name, {}), index)
        mixing += count(layer_cfg, seq_len)
        matmul_params -= _inactive(entry, layer_cfg)
        matmul_params -= _inactive(ffn, layer_config(cfg, ffn, cfg.ffns.get(cfg.ffn, {}), index))
    return 3.0 * (2.0 * matmul_params + mixing)


def _inactive(entry: registry.Entry, layer_cfg) -> int:
    inactive = getattr(entry.cls, "inactive_params", None)
    return 0 if inactive is None else inactive(layer_cfg)
