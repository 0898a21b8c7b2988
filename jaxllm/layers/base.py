"""What every layer shares: its small config's model-wide dims, parameter creation with
logical axes, and dtype handling (float32 master weights, compute in `dtype`)."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx
from pydantic import BaseModel, ConfigDict, Field

DTypeName = Literal["float32", "bfloat16", "float16"]


class LayerConfig(BaseModel):
    """Model-wide dims every mixer and channel mixer receives; subclasses add options."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    d_model: int = Field(256, ge=1)
    n_heads: int = Field(8, ge=1)
    n_kv_heads: int = Field(8, ge=1)
    head_dim: int = Field(32, ge=1)
    d_ff: int = Field(768, ge=1)
    layer_index: int = Field(0, ge=0, description="position in the stack (0-based)")
    n_layers: int = Field(1, ge=1)
    norm_eps: float = 1e-5
    init_std: float = 0.02
    dtype: DTypeName = "bfloat16"
    param_dtype: Literal["float32", "bfloat16"] = "float32"

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)


# Names of the layer-config fields the model fills in from `model.*`.
DIM_FIELDS = tuple(LayerConfig.model_fields)


def param(
    rngs: nnx.Rngs,
    shape: tuple[int, ...],
    axes: tuple[str | None, ...],
    *,
    std: float | None = None,
    init: str = "normal",
    dtype: str = "float32",
) -> nnx.Param:
    """A parameter annotated with logical axes (`axes`, one name per dim) for the sharding
    rules in `jaxllm.parallel.rules`. `init`: normal(std) | zeros | ones."""
    assert len(shape) == len(axes), (shape, axes)
    if init == "normal":
        value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    elif init == "zeros":
        value = jnp.zeros(shape, jnp.float32)
    elif init == "ones":
        value = jnp.ones(shape, jnp.float32)
    else:
        raise ValueError(f"unknown init {init!r}")
    return nnx.Param(value.astype(dtype), axes=axes)


def cast(p: nnx.Param, dtype) -> jax.Array:
    return p[...].astype(dtype)
