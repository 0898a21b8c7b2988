"""Channel mixers: SwiGLU (LLaMA)."""

from __future__ import annotations

import jax
from flax import nnx

from jaxllm.layers.base import LayerConfig, cast, dense, param, tag
from jaxllm.layers.registry import register_ffn
from jaxllm.ops.activations import swiglu
from jaxllm.parallel.core.rules import constrain


class SwiGLUConfig(LayerConfig):
    pass


@register_ffn("swiglu", SwiGLUConfig)
class SwiGLU(nnx.Module):
    """y = W_down (silu(W_gate x) ⊙ W_up x). x: [B, T, D] → [B, T, D]."""

    def __init__(self, cfg: SwiGLUConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, f, std, pd = cfg.d_model, cfg.d_ff, cfg.init_std, cfg.param_dtype
        # Output projections are scaled by depth (GPT-2 / OLMo) so the residual stream's
        # variance does not grow with the number of layers.
        out_std = std / (2 * cfg.n_layers) ** 0.5
        self.w_gate = param(rngs, (d, f), ("embed", "mlp"), std=std, dtype=pd)
        self.w_up = param(rngs, (d, f), ("embed", "mlp"), std=std, dtype=pd)
        self.w_down = param(rngs, (f, d), ("mlp", "embed"), std=out_std, dtype=pd)

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        dt = self.cfg.compute_dtype
        x_BTD = x_BTD.astype(dt)
        gate_BTF = dense(x_BTD, cast(self.w_gate, dt), "BTD,DF->BTF", name="gate")
        up_BTF = dense(x_BTD, cast(self.w_up, dt), "BTD,DF->BTF", name="up")
        h_BTF = constrain(swiglu(gate_BTF, up_BTF), ("batch", "length", "act_mlp"))
        h_BTF = tag(h_BTF, "mlp_hidden")
        return dense(h_BTF, cast(self.w_down, dt), "BTF,FD->BTD", name="down")
