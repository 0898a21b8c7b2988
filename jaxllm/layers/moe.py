"""The `moe` channel mixer: a float32 router, routed SwiGLU experts (possibly of several widths,
HMoE), optional always-on shared experts (Hunyuan-Large, LLaMA-MoE v2's residual expert;
Qwen2-MoE's sigmoid-gated one), a dropless or a capacity execution path, and expert
parallelism when the mesh has an `expert` axis.

Routers: softmax top-k (renormalized or not), sigmoid (DeepSeek-V3), top-p (HMoE), hash
(PanGu-Σ random routed experts, which needs the token ids and their data domains: the decoder
passes both — the domain from the batch's `domain`, see `data.domains` — to channel mixers that
set `uses_tokens`). Balancing: Switch/Mixtral load-balancing loss (or HMoE's
parameter penalty), router z-loss, top-p's entropy loss, all sown as `aux_loss`; and the
DeepSeek auxiliary-loss-free bias, a parameter kept out of the optimizer: the layer sows its
update as `update_router_bias` and the train step adds it after the optimizer step (see
`jaxllm.training.step.apply_layer_updates`).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx
from pydantic import Field, model_validator

from jaxllm.layers.base import DIM_FIELDS, LayerConfig, param
from jaxllm.layers.mlp import SwiGLU, SwiGLUConfig
from jaxllm.layers.registry import register_ffn
from jaxllm.ops import moe_routing as R
from jaxllm.ops.moe import ExpertGroup, moe_experts
from jaxllm.parallel import expert as ep
from jaxllm.precision import active_spec, current_scaling


class MoEConfig(LayerConfig):
    n_experts: int = Field(8, ge=1, description="routed experts")
    top_k: int = Field(2, ge=1, description="choices per token (the most, for top_p)")
    expert_d_ff: int | list[int] | None = Field(
        None, description="routed expert width; a list (one per expert) = heterogeneous (HMoE)"
    )
    n_shared: int = Field(0, ge=0, description="always-on shared experts (Hunyuan: 1)")
    shared_d_ff: int | None = Field(None, ge=1, description="width per shared expert")
    shared_gate: bool = Field(
        False, description="scale the shared experts by sigmoid(x·g), g [D, 1] (Qwen2-MoE)"
    )
    router: Literal["softmax", "sigmoid", "top_p", "hash"] = "softmax"
    renormalize: bool = Field(True, description="weights / Σ over the chosen experts")
    top_p: float = Field(0.6, gt=0, le=1, description="top_p router threshold")
    scale: float = Field(1.0, gt=0, description="routed output scale (LLaMA-MoE scale_factor)")
    capacity_factor: float | None = Field(
        None, description="slots per expert = ceil(cf·T·K/E); None or ≤ 0 = dropless"
    )
    drop_policy: Literal["residual", "recycle"] = "residual"
    lb_loss: float = Field(0.01, ge=0, description="Switch/Mixtral load-balancing loss weight")
    size_penalty: bool = Field(False, description="HMoE P-penalty: LB loss weighted by size")
    z_loss: float = Field(0.0, ge=0, description="router z-loss weight")
    entropy_loss: float = Field(0.0, ge=0, description="router entropy loss weight (top_p)")
    aux_free_rate: float = Field(
        0.0, ge=0, description="DeepSeek aux-loss-free bias update rate γ; 0 = off"
    )
    n_domains: int = Field(1, ge=1, description="hash router: domain groups of experts")
    domain: int = Field(
        0, ge=0, description="hash router: the domain of tokens whose batch has no `domain`"
    )
    hash_seed: int = 0
    dense_layers: list[int] = Field(
        default_factory=list,
        description="layer indices (negative: from the end) that stay a dense SwiGLU of d_ff",
    )
    impl: Literal["auto", "reference", "dropless", "blocked", "capacity"] = Field(
        "auto",
        description="auto = capacity if capacity_factor > 0, else dropless (blocked on GPU)",
    )
    a2a: Literal["auto", "ragged", "dense"] = Field(
        "auto", description="expert-parallel exchange: ragged all-to-all or padded (CPU)"
    )

    @model_validator(mode="after")
    def _check(self) -> MoEConfig:
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k={self.top_k} exceeds n_experts={self.n_experts}")
        if self.shared_gate and not self.n_shared:
            raise ValueError("shared_gate scales the shared experts: set n_shared >= 1")
        if isinstance(self.expert_d_ff, list) and len(self.expert_d_ff) != self.n_experts:
            raise ValueError(
                f"expert_d_ff has {len(self.expert_d_ff)} widths for {self.n_experts} experts"
            )
        if self.router == "hash":
            if self.top_k != 1:
                raise ValueError("router=hash routes each token to one expert: set top_k=1")
            if self.n_experts % self.n_domains or self.domain >= self.n_domains:
                raise ValueError(
                    f"n_domains={self.n_domains} must divide n_experts={self.n_experts} "
                    f"and domain={self.domain} be below it"
                )
        return self

    def check_expert_axis(self, n: int) -> None:
        """Expert parallelism over `n` devices splits each run of equal-width experts evenly
        (`jaxllm.parallel.expert.expert_tables`); checked with the config, before any trace."""
        runs = [count for count, _ in width_groups(self.widths)]
        if any(r % n for r in runs):
            raise ValueError(
                f"parallel.mesh.expert={n} must divide the routed experts of each width "
                f"({'+'.join(map(str, runs))} in model.ffns.moe)"
            )

    @property
    def widths(self) -> list[int]:
        w = self.expert_d_ff if self.expert_d_ff is not None else self.d_ff
        return list(w) if isinstance(w, list) else [w] * self.n_experts

    @property
    def is_dense(self) -> bool:
        return any(i % self.n_layers == self.layer_index for i in self.dense_layers)

    def scan_key(self) -> dict:
        return {**super().scan_key(), "is_dense": self.is_dense}

    @property
    def dropless(self) -> bool:
        return self.capacity_factor is None or self.capacity_factor <= 0


class ExpertStack(nnx.Module):
    """E experts of one width F: w_gate, w_up [E, D, F], w_down [E, F, D]."""

    def __init__(self, n: int, d: int, f: int, std: float, out_std: float, pd, rngs):
        self.w_gate = param(rngs, (n, d, f), ("experts", "embed", "mlp"), std=std, dtype=pd)
        self.w_up = param(rngs, (n, d, f), ("experts", "embed", "mlp"), std=std, dtype=pd)
        self.w_down = param(rngs, (n, f, d), ("experts", "mlp", "embed"), std=out_std, dtype=pd)

    def weights(self) -> ExpertGroup:
        return (self.w_gate[...], self.w_up[...], self.w_down[...])


def width_groups(widths: list[int]) -> list[tuple[int, int]]:
    """[(count, width)] of consecutive runs of equal width; expert ids follow this order."""
    runs: list[list[int]] = []
    for w in widths:
        if runs and runs[-1][1] == w:
            runs[-1][0] += 1
        else:
            runs.append([1, w])
    return [(n, w) for n, w in runs]


@register_ffn("moe", MoEConfig)
class MoE(nnx.Module):
    """x: [B, T, D] → [B, T, D] = shared(x) + Σ_k w_k · expert_{e_k}(x); with `shared_gate`,
    shared(x) is scaled by sigmoid(x·g) (Qwen2-MoE)."""

    uses_tokens = True
    uses_layer = True

    def __init__(self, cfg: MoEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, std, pd = cfg.d_model, cfg.init_std, cfg.param_dtype
        out_std = std / (2 * cfg.n_layers) ** 0.5
        dims = cfg.model_dump(include=set(DIM_FIELDS))
        if cfg.is_dense:
            # PanGu-Σ's lower layers / LLaMA-MoE's first and last layers stay dense.
            self.dense = SwiGLU(SwiGLUConfig(**dims), rngs=rngs)
            return
        if cfg.router != "hash":
            self.w_router = param(rngs, (d, cfg.n_experts), ("embed", None), std=std)
        if cfg.aux_free_rate > 0:
            self.router_bias = param(rngs, (cfg.n_experts,), (None,), init="zeros")
        self.groups = nnx.List(
            [ExpertStack(n, d, f, std, out_std, pd, rngs) for n, f in width_groups(cfg.widths)]
        )
        if cfg.n_shared:
            width = cfg.n_shared * (cfg.shared_d_ff or cfg.widths[0])
            self.shared = SwiGLU(SwiGLUConfig(**{**dims, "d_ff": width}), rngs=rngs)
        if cfg.shared_gate:
            self.w_shared_gate = param(rngs, (d, 1), ("embed", None), std=std)

    @staticmethod
    def inactive_params(cfg: MoEConfig) -> int:
        """Routed-expert weights one token leaves idle (for active-parameter FLOPs / MFU): all
        but `top_k` experts of the mean size. For top-p routing top_k is the most a token may
        take, so this undercounts idle weights (an upper bound on the active FLOPs)."""
        if cfg.is_dense:
            return 0
        per_expert = [3 * cfg.d_model * f for f in cfg.widths]
        return int(sum(per_expert) - cfg.top_k * sum(per_expert) / len(per_expert))

    def route(
        self,
        x_TD: jax.Array,
        tokens_T: jax.Array | None,
        domain_T: jax.Array | None = None,
        layer: int | jax.Array | None = None,
    ):
        """(routing, scores_TE, logits_TE) in float32; scores/logits None for hash routing,
        whose tokens go to the experts of their domain (`domain_T`, else `cfg.domain`).
        `layer`: this layer's index (None = `cfg.layer_index`), which seeds the hash."""
        c = self.cfg
        layer = c.layer_index if layer is None else layer
        if c.router == "hash":
            if tokens_T is None:
                raise ValueError("router=hash needs the token ids (tokens_BT)")
            routing = R.hash_route(
                tokens_T,
                n_experts=c.n_experts,
                n_domains=c.n_domains,
                domain=c.domain if domain_T is None else domain_T,
                seed=c.hash_seed + layer,
            )
            return routing, None, None
        logits_TE = jnp.einsum(
            "TD,DE->TE", x_TD.astype(jnp.float32), self.w_router[...].astype(jnp.float32)
        )
        bias = self.router_bias[...] if c.aux_free_rate > 0 else None
        routing, scores_TE = R.route(
            logits_TE,
            kind=c.router,
            top_k=c.top_k,
            renormalize=c.renormalize,
            top_p=c.top_p,
            bias_E=bias,
            scale=c.scale,
        )
        return routing, scores_TE, logits_TE

    def __call__(
        self,
        x_BTD: jax.Array,
        *,
        tokens_BT: jax.Array | None = None,
        domain_BT: jax.Array | None = None,
        layer: int | jax.Array | None = None,
    ) -> jax.Array:
        """x: [B, T, D] → [B, T, D]. `layer`: the index in the stack (None = `cfg.layer_index`;
        an int32 scalar when the decoder scans its layers) seeds hash routing and recycling."""
        c = self.cfg
        layer = c.layer_index if layer is None else layer
        if c.is_dense:
            return self.dense(x_BTD)
        dt = c.compute_dtype
        b, t, d = x_BTD.shape
        x_TD = x_BTD.reshape(b * t, d).astype(dt)
        tokens_T = None if tokens_BT is None else tokens_BT.reshape(b * t)
        domain_T = None if domain_BT is None else domain_BT.reshape(b * t)
        routing, scores_TE, logits_TE = self.route(x_TD, tokens_T, domain_T, layer)
        self._sow_losses(routing, scores_TE, logits_TE)
        groups = [g.weights() for g in self.groups]
        capacity_factor = None if c.dropless else c.capacity_factor
        recycle_scores_TE = _scores_or_weights(scores_TE, routing, c.n_experts) * c.scale
        if ep.active():
            # The delayed-FP8 state is replicated outside the shard_map that holds each
            # device's experts: there they use current scaling, and take the keys of the
            # single-device experts (traced abstractly, nothing computed), so every later
            # projection reads its own state whichever path runs.
            if _delayed_fp8():
                jax.eval_shape(
                    lambda: self._local(
                        x_TD, routing, recycle_scores_TE, groups, capacity_factor, layer
                    )
                )
            with current_scaling():
                y_TD, stats = ep.expert_parallel_ffn(
                    x_TD,
                    routing,
                    recycle_scores_TE,
                    groups,
                    capacity_factor=capacity_factor,
                    drop_policy=c.drop_policy,
                    key=self._recycle_key(routing, layer),
                    a2a=c.a2a,
                    dtype=dt,
                )
        else:
            y_TD, stats = self._local(
                x_TD, routing, recycle_scores_TE, groups, capacity_factor, layer
            )
        if stats is not None:
            self.sow(nnx.Intermediate, "metric_moe_dropped_fraction", stats.dropped)
            self.sow(nnx.Intermediate, "metric_moe_recycled_fraction", stats.recycled)
        y_BTD = y_TD.reshape(b, t, d)
        if c.n_shared:
            shared_BTD = self.shared(x_BTD).astype(jnp.float32)
            if c.shared_gate:
                # Qwen2-MoE: a per-token sigmoid gate on the shared expert's output, [B, T, 1].
                gate_BT1 = jax.nn.sigmoid(
                    jnp.einsum(
                        "BTD,DO->BTO",
                        x_BTD.astype(jnp.float32),
                        self.w_shared_gate[...].astype(jnp.float32),
                    )
                )
                shared_BTD = gate_BT1 * shared_BTD
            y_BTD = y_BTD + shared_BTD
        return y_BTD.astype(dt)

    def _local(self, x_TD, routing, recycle_scores_TE, groups, capacity_factor, layer):
        c = self.cfg
        impl = c.impl
        if impl == "auto" and not c.dropless:
            impl = "capacity"
        if capacity_factor is None:
            if impl == "capacity":
                raise ValueError("impl=capacity needs capacity_factor > 0")
            return moe_experts(x_TD, routing, groups, impl=impl, dtype=c.compute_dtype), None
        cap = R.capacity_for(x_TD.shape[0], c.top_k, c.n_experts, capacity_factor)
        routing, slot_TK, stats = R.apply_capacity(
            routing,
            recycle_scores_TE,
            n_experts=c.n_experts,
            capacity=cap,
            policy=c.drop_policy,
            key=self._recycle_key(routing, layer),
        )
        y = moe_experts(
            x_TD, routing, groups, impl=impl, slot_TK=slot_TK, capacity=cap, dtype=c.compute_dtype
        )
        return y, stats

    def _recycle_key(self, routing: R.Routing, layer: int | jax.Array) -> jax.Array:
        # Recycling needs fresh randomness each step without an RNG stream in the train step:
        # a hash of this batch's routing, folded into a key fixed per layer.
        ids = jax.lax.stop_gradient(routing.experts_TK).astype(jnp.uint32).reshape(-1)
        mix = jnp.sum(ids * (jnp.arange(ids.shape[0], dtype=jnp.uint32) * jnp.uint32(2654435761)))
        return jax.random.fold_in(jax.random.key(layer), mix)

    def _sow_losses(self, routing, scores_TE, logits_TE) -> None:
        c = self.cfg
        load_E = R.expert_load(routing, c.n_experts)
        self.sow(nnx.Intermediate, "metric_moe_load_max", jnp.max(load_E) / jnp.mean(load_E))
        if c.router == "top_p":
            n_valid = jnp.sum(routing.valid_TK) / routing.valid_TK.shape[0]
            self.sow(nnx.Intermediate, "metric_moe_experts_per_token", n_valid)
        if scores_TE is None:
            return
        aux = jnp.zeros((), jnp.float32)
        if c.lb_loss > 0:
            size_w = None
            if c.size_penalty:
                widths = jnp.asarray(c.widths, jnp.float32)
                size_w = widths / jnp.mean(widths)
            # Sigmoid scores do not sum to 1: balance their per-token normalized form.
            probs_TE = scores_TE
            if c.router == "sigmoid":
                probs_TE = scores_TE / jnp.sum(scores_TE, axis=-1, keepdims=True)
            lb = R.load_balancing_loss(routing, probs_TE, size_w)
            self.sow(nnx.Intermediate, "metric_moe_lb_loss", lb)
            aux = aux + c.lb_loss * lb
        if c.z_loss > 0:
            z = R.router_z_loss(logits_TE)
            self.sow(nnx.Intermediate, "metric_moe_router_z_loss", z)
            aux = aux + c.z_loss * z
        if c.entropy_loss > 0:
            aux = aux + c.entropy_loss * R.router_entropy(scores_TE)
        if c.lb_loss > 0 or c.z_loss > 0 or c.entropy_loss > 0:
            self.sow(nnx.Intermediate, "aux_loss", aux)
        if c.aux_free_rate > 0:
            delta = R.aux_free_bias_update(jax.lax.stop_gradient(load_E), c.aux_free_rate)
            self.sow(nnx.Intermediate, "update_router_bias", delta)


def _delayed_fp8() -> bool:
    spec = active_spec()
    return spec is not None and spec.fp8 == "delayed"


def _scores_or_weights(scores_TE, routing: R.Routing, n_experts: int) -> jax.Array:
    """What a recycled choice's weight is read from: the router scores, or (hash routing,
    no scores) 1 for every expert."""
    if scores_TE is not None:
        return scores_TE
    return jnp.ones((routing.experts_TK.shape[0], n_experts), jnp.float32)
