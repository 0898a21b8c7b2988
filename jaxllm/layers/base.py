"""What every layer shares: its small config's model-wide dims, parameter creation with
logical axes, and dtype handling (float32 master weights, compute in `dtype`)."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from pydantic import BaseModel, ConfigDict, Field

from jaxllm.precision import active_spec, project

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

    def scan_key(self) -> dict:
        """What makes two layers of the stack one program (`jaxllm.models.scan`): every option
        but `layer_index`. A layer whose structure depends on its index (CLA's producer, Cog's
        plain-softmax layers) adds what it derives from it; a layer whose numbers depend on it
        (TNL's decay) reads the index at run time instead (`uses_layer`)."""
        return self.model_dump(exclude={"layer_index"})


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
    rules in `jaxllm.parallel.core.rules`. `init`: normal(std) | zeros | ones."""
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


def dense(x: jax.Array, w: jax.Array, eq: str, *, name: str = "proj") -> jax.Array:
    """A dense projection ``einsum(eq, x, w)``, e.g. ``dense(x_BTD, w_DF, "BTD,DF->BTF")``.

    Every weight projection of a layer (q/k/v/o, MLP, experts) goes through here so the train
    step can run it in FP8 or ExMy (`jaxllm.precision.project`; plain einsum otherwise).
    `eq` must be ``"x,w->y"`` with the contraction as the letters shared by x and w only.
    `name` labels the projection's FP8 scaling state. Keep the embedding, the head, norms and
    routers on plain `jnp.einsum`: they stay in high precision.
    """
    frac, spec = _OFFLOAD_FRACTION.get(), active_spec()
    token_wise = eq[:2] == "BT" and eq.split("->")[1][:2] == "BT"
    if frac and token_wise and (spec is None or not spec.active):
        # MEMO's token split (`host_offload`): project the first ⌊α·T⌋ tokens and the rest
        # apart, so the backward recomputes only the rest (a projection over all T tokens
        # would be replayed whole and sliced). Low-precision projections stay whole: their
        # per-tensor scales and delayed-scaling keys would change with the split.
        cut = int(frac * x.shape[1])
        if 0 < cut < x.shape[1]:
            head = project(x[:, :cut], w, eq, name=name)
            return jnp.concatenate([head, project(x[:, cut:], w, eq, name=name)], axis=1)
    return project(x, w, eq, name=name)


# Activations the remat policies (jaxllm.training.remat) refer to by name. MEMO (SIGMOD'25)
# always offloads LAYER_INPUT and ATTN_OUT; of the others a fraction of tokens may be offloaded.
LAYER_INPUT, ATTN_OUT = "layer_in", "attn_out"
SKELETAL = ("mixer_in", "q", "k", "v", "mixer_out", "ffn_in", "mlp_hidden")
# α of `host_offload` while tracing inside it; None outside.
_OFFLOAD_FRACTION: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "jaxllm_offload_fraction", default=None
)


@contextlib.contextmanager
def host_offload(fraction: float) -> Iterator[None]:
    """While tracing inside: `tag` names the first ⌊fraction·T⌋ tokens of skeletal activations
    apart (``name + "_off"``) and `dense` projects them apart, for the `offload` policy."""
    token = _OFFLOAD_FRACTION.set(fraction)
    try:
        yield
    finally:
        _OFFLOAD_FRACTION.reset(token)


def tag(x_BT: jax.Array, name: str) -> jax.Array:
    """Name an activation [B, T, ...] for remat policies (`checkpoint_name`).

    Inside `host_offload(α)` a skeletal activation's first ⌊α·T⌋ tokens are named
    ``name + "_off"`` (offloaded by the `offload` policy) and the rest stay unnamed
    (recomputed) — MEMO's token-wise split.
    """
    frac = _OFFLOAD_FRACTION.get()
    if frac and name in SKELETAL:
        cut = int(frac * x_BT.shape[1])
        if cut >= x_BT.shape[1]:
            return checkpoint_name(x_BT, name + "_off")
        if cut > 0:
            head = checkpoint_name(x_BT[:, :cut], name + "_off")
            return jnp.concatenate([head, x_BT[:, cut:]], axis=1)
    return checkpoint_name(x_BT, name)
