"""Model construction: `build(model_config, rngs)` returns the NNX decoder."""

from __future__ import annotations

from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.layers import registry
from jaxllm.models.decoder import Block, Decoder, scan_plan
from jaxllm.models.flops import flops_per_token, param_count
from jaxllm.models.scan import stack_params, unstack_params


def build(model_config: ModelConfig, rngs: nnx.Rngs | int = 0) -> Decoder:
    """The decoder for `model_config`; `rngs` may be an `nnx.Rngs` or an int seed.

    `ConfigError` first if a mixer name or option is not one the registry holds."""
    registry.check(model_config)
    if isinstance(rngs, int):
        rngs = nnx.Rngs(params=rngs)
    return Decoder(model_config, rngs=rngs)


__all__ = [
    "Block",
    "Decoder",
    "build",
    "flops_per_token",
    "param_count",
    "scan_plan",
    "stack_params",
    "unstack_params",
]
