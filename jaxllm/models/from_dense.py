"""Mixtures of experts cut from a dense model (LLaMA-MoE v1/v2, 2406.16554 / 2411.15708).

MLP-MoE: a SwiGLU is separable over its F neurons, FFN(x) = Σ_n down_n · silu(gate_n·x)(up_n·x),
so splitting the neurons into E disjoint sets gives E experts whose sum is the dense FFN. The
split is `sequential` (the authors' default), `random` (a seeded permutation) or `clustered`
(balanced k-means on the neurons' gate vectors, as v1's clustering split); an optional
always-on residual expert (v2's "1 + 7") takes the first `residual_d_ff` neurons of that order.

Attention-MoE: the experts are the KV groups of a GQA layer (`jaxllm.layers.attention_moe`).

With all experts active and unit combine weights both equal the dense layer (tested); the
routers are new (random init), so the converted model needs continued training, as in the
papers.
"""

from __future__ import annotations

from typing import Literal

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.layers.attention import Attention
from jaxllm.layers.attention_moe import AttentionMoE, AttnMoEConfig
from jaxllm.layers.mlp import SwiGLU
from jaxllm.layers.moe import MoE, MoEConfig

SplitMethod = Literal["sequential", "random", "clustered"]


def neuron_order(
    w_gate_DF: np.ndarray, n_experts: int, method: SplitMethod = "sequential", seed: int = 0
) -> np.ndarray:
    """[F] a permutation of the neurons; consecutive blocks of F/E are the experts."""
    f = w_gate_DF.shape[1]
    if method == "sequential":
        return np.arange(f)
    rng = np.random.default_rng(seed)
    if method == "random":
        return rng.permutation(f)
    if method == "clustered":
        return _balanced_kmeans(np.asarray(w_gate_DF, np.float64).T, n_experts, rng)
    raise ValueError(f"unknown split method {method!r}")


def _balanced_kmeans(feats_FD: np.ndarray, k: int, rng, iters: int = 10) -> np.ndarray:
    """Neurons grouped into k equal clusters of similar gate vectors: k-means (cosine) whose
    assignment step fills clusters greedily by distance, each up to F/k members."""
    f = feats_FD.shape[0]
    size = f // k
    x = feats_FD / np.maximum(np.linalg.norm(feats_FD, axis=1, keepdims=True), 1e-12)
    centres = x[rng.choice(f, k, replace=False)]
    for _ in range(iters):
        sim = x @ centres.T  # [F, k]
        assign = np.full(f, -1)
        room = np.full(k, size)
        for flat in np.argsort(-sim, axis=None):
            n, c = divmod(int(flat), k)
            if assign[n] < 0 and room[c] > 0:
                assign[n], room[c] = c, room[c] - 1
        centres = np.stack([x[assign == c].mean(0) for c in range(k)])
        centres /= np.maximum(np.linalg.norm(centres, axis=1, keepdims=True), 1e-12)
    return np.concatenate([np.flatnonzero(assign == c) for c in range(k)])


def moe_from_dense(
    dense: SwiGLU,
    cfg: MoEConfig,
    *,
    method: SplitMethod = "sequential",
    seed: int = 0,
) -> MoE:
    """An MoE layer whose experts (and residual expert, when `cfg.n_shared == 1`) partition the
    neurons of `dense`. Needs d_ff = n_shared·shared_d_ff + n_experts·expert_d_ff."""
    w_gate = np.asarray(dense.w_gate[...])
    w_up, w_down = np.asarray(dense.w_up[...]), np.asarray(dense.w_down[...])
    f = w_gate.shape[1]
    widths = cfg.widths
    if len(set(widths)) != 1 or cfg.n_shared > 1:
        raise ValueError("from_dense splits into equal experts and at most one residual expert")
    shared = cfg.n_shared * (cfg.shared_d_ff or widths[0])
    if shared + sum(widths) != f:
        raise ValueError(f"{shared} residual + {sum(widths)} expert neurons ≠ dense d_ff {f}")
    order = neuron_order(w_gate[:, shared:] if method == "clustered" else w_gate,
                         cfg.n_experts, method, seed)  # fmt: skip
    if method == "clustered":
        order = np.concatenate([np.arange(shared), shared + order])
    moe = MoE(cfg.model_copy(update={"d_ff": f}), rngs=nnx.Rngs(seed))
    routed = order[shared:].reshape(cfg.n_experts, widths[0])
    grp = moe.groups[0]
    grp.w_gate[...] = jnp.asarray(np.stack([w_gate[:, i] for i in routed]))
    grp.w_up[...] = jnp.asarray(np.stack([w_up[:, i] for i in routed]))
    grp.w_down[...] = jnp.asarray(np.stack([w_down[i, :] for i in routed]))
    if shared:
        res = order[:shared]
        moe.shared.w_gate[...] = jnp.asarray(w_gate[:, res])
        moe.shared.w_up[...] = jnp.asarray(w_up[:, res])
        moe.shared.w_down[...] = jnp.asarray(w_down[res, :])
    return moe


def attention_moe_from_dense(dense: Attention, cfg: AttnMoEConfig, seed: int = 0) -> AttentionMoE:
    """The attention-MoE of a dense GQA layer: the same q/k/v/o weights (expert e = kv head e
    with its query heads), plus a new router."""
    if getattr(dense.cfg, "qk_norm", False) or getattr(dense.cfg, "qkv_bias", False):
        raise ValueError("attention_moe_from_dense handles plain GQA (no QK-norm, no biases)")
    moe = AttentionMoE(cfg, rngs=nnx.Rngs(seed))
    for name in ("wq", "wk", "wv", "wo"):
        getattr(moe, name)[...] = getattr(dense, name)[...]
    return moe
