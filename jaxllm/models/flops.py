"""Parameter and FLOP counts for throughput and MFU."""

from __future__ import annotations

import jax
from flax import nnx

from jaxllm.config import ModelConfig


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
    softmax_layers = sum(name == "softmax" for name in cfg.mixer_names())
    attn = softmax_layers * 2 * 2 * seq_len * cfg.n_heads * cfg.qk_head_dim * 0.5
    return 3.0 * (2.0 * matmul_params + attn)
