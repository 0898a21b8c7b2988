"""SGLU, TransNormerLLM's channel mixer: a gated linear unit without an activation."""

from __future__ import annotations

from typing import Literal

import jax
from flax import nnx
from pydantic import Field

from jaxllm.layers.base import LayerConfig, cast, dense, param, tag
from jaxllm.layers.registry import register_ffn
from jaxllm.parallel.core.rules import constrain

_ACTIVATIONS = {"none": lambda x: x, "silu": jax.nn.silu, "sigmoid": jax.nn.sigmoid}


class SGLUConfig(LayerConfig):
    activation: Literal["none", "silu", "sigmoid"] = Field(
        "none", description="on the first branch; TNL uses none (simple GLU)"
    )


@register_ffn("sglu", SGLUConfig)
class SGLU(nnx.Module):
    """y = W_3 (act(W_1 x) ⊙ W_2 x), act = identity by default. x: [B, T, D] → [B, T, D]."""

    def __init__(self, cfg: SGLUConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, f, std, pd = cfg.d_model, cfg.d_ff, cfg.init_std, cfg.param_dtype
        out_std = std / (2 * cfg.n_layers) ** 0.5
        self.w1 = param(rngs, (d, f), ("embed", "mlp"), std=std, dtype=pd)
        self.w2 = param(rngs, (d, f), ("embed", "mlp"), std=std, dtype=pd)
        self.w3 = param(rngs, (f, d), ("mlp", "embed"), std=out_std, dtype=pd)

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        dt = self.cfg.compute_dtype
        x_BTD = x_BTD.astype(dt)
        a_BTF = dense(x_BTD, cast(self.w1, dt), "BTD,DF->BTF", name="glu1")
        b_BTF = dense(x_BTD, cast(self.w2, dt), "BTD,DF->BTF", name="glu2")
        h_BTF = _ACTIVATIONS[self.cfg.activation](a_BTF) * b_BTF
        h_BTF = tag(constrain(h_BTF, ("batch", "length", "act_mlp")), "mlp_hidden")
        return dense(h_BTF, cast(self.w3, dt), "BTF,FD->BTD", name="glu3")
