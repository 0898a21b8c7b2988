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
    head still counts once). Attention: QKᵀ and PV each cost 2·T·H·K per token, halved by the
    causal mask (as MaxText counts it), in every softmax layer.
    """
    matmul_params = n_params - n_embedding + (n_embedding if cfg.tie_embeddings else 0)
    # Channel mixers that use only part of their weights per token (mixtures of experts) say
    # how many they leave idle through an `inactive_params(layer_cfg)` hook: MFU counts the
    # active parameters only.
    ffn = registry.ffn(cfg.ffn)
    inactive = getattr(ffn.cls, "inactive_params", None)
    if inactive is not None:
        options = cfg.ffns.get(cfg.ffn, {})
        matmul_params -= sum(
            inactive(layer_config(cfg, ffn, options, i)) for i in range(cfg.n_layers)
        )
    softmax_layers = sum(name == "softmax" for name in cfg.mixer_names())
    attn = softmax_layers * 2 * 2 * seq_len * cfg.n_heads * cfg.qk_head_dim * 0.5
    # Mixers with their own token mixing (linear attention: chunked products and the state)
    # say what it costs per token through a `token_mixing_flops(layer_cfg, seq_len)` hook.
    for index, name in enumerate(cfg.mixer_names()):
        entry = registry.mixer(name)
        count = getattr(entry.cls, "token_mixing_flops", None)
        if count is not None:
            attn += count(layer_config(cfg, entry, cfg.mixers.get(name, {}), index), seq_len)
    return 3.0 * (2.0 * matmul_params + attn)
