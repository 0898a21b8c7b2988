"""FP8-LM optimization levels (Peng et al., arXiv 2310.18313; MS-AMP) as an optax wrapper.

- ``O1``: the gradients enter the optimizer as FP8 E4M3 with one float32 scale per tensor
  (MS-AMP's weight-gradient format). On a data-parallel mesh they are the output of the FP8
  all-reduce (`jaxllm.parallel.fp8_allreduce`: shared scale, automatic scaling μ), which the train
  step runs; otherwise this wrapper quantizes them with the scale ``448 / amax``. Optimizer
  states and master weights stay float32.
- ``O2``: O1, plus the optimizer's first moment (``mu`` of AdamW and CAME) stored as FP8
  E4M3 with a per-tensor float32 scale and the second moment (``nu`` / CAME's ``v*``, ``res*``)
  in float16, both with a per-tensor float32 scale (``format max / amax``). They are
  dequantized to float32 for the update and re-quantized after it, as MS-AMP's AdamW does.
  The second moment's scale matters: ``g²`` of per-token-averaged gradients reaches 1e-10,
  under float16's smallest subnormal (6e-8). bfloat16 would keep the range without a scale
  but its 8-bit mantissa cannot hold Adam's ``(1 - β2) g²`` increments (0.1% of ``v`` at
  β2 = 0.999 is below bfloat16's 0.4% spacing), so ``v`` would stall.

Master weights are the float32 parameters (the paper's 2-byte figure uses FP16 master weights
with a per-tensor scale; see `train_state_bytes_per_param`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxllm.precision.fp8 import E4M3, qdq, scale_from_amax, to_fp8

FIRST_MOMENTS = ("mu",)
SECOND_MOMENTS = ("nu", "v_row", "v_col", "v", "res_row", "res_col")


class ScaledFP8(NamedTuple):
    """A tensor stored as ``data / scale``: ``data`` low precision (FP8 E4M3 for the first
    moment, float16 for the second), ``scale`` float32."""

    data: jax.Array
    scale: jax.Array


def _scaled(x: jax.Array, dtype) -> ScaledFP8:
    if jnp.dtype(dtype) == jnp.dtype(E4M3):
        s = scale_from_amax(jnp.max(jnp.abs(x)), E4M3)
        return ScaledFP8(to_fp8(x, E4M3, s), s)
    fmax = float(jnp.finfo(dtype).max)
    amax = jnp.max(jnp.abs(x))
    # half the range: the float32 product must not round past the 16-bit max
    s = jnp.where(amax > 0, fmax / 2 / jnp.where(amax > 0, amax, 1.0), 1.0).astype(jnp.float32)
    return ScaledFP8((x * s).astype(dtype), s)


def _field(path) -> str:
    names = [getattr(p, "name", getattr(p, "key", None)) for p in path]
    return next((str(n) for n in names if n in FIRST_MOMENTS + SECOND_MOMENTS), "")


def _compress(state: Any, v_dtype) -> Any:
    def one(path, x):
        if not (isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating)):
            return x
        f = _field(path)
        if f in FIRST_MOMENTS:
            return _scaled(x, E4M3)
        if f in SECOND_MOMENTS:
            return _scaled(x, v_dtype)
        return x

    return jax.tree_util.tree_map_with_path(one, state)


def _expand(state: Any) -> Any:
    def one(path, x):
        if isinstance(x, ScaledFP8):
            return x.data.astype(jnp.float32) / x.scale
        return x

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, ScaledFP8))


def fp8_gradients(grads: Any) -> Any:
    """O1: every gradient tensor through FP8 E4M3 with a per-tensor scale (values returned
    dequantized, float32)."""

    def one(g):
        s = scale_from_amax(jnp.max(jnp.abs(g.astype(jnp.float32))), E4M3)
        return qdq(g, E4M3, s)

    return jax.tree.map(one, grads)


def fp8_lm(
    inner: optax.GradientTransformation,
    level: str = "O1",
    v_dtype=jnp.float16,
    grads_in_fp8: bool = False,
) -> optax.GradientTransformation:
    """Wrap `inner` (AdamW, CAME, or a chain holding one) at FP8-LM `level` ("O1" | "O2").

    `grads_in_fp8`: the gradients already come out of the FP8 data-parallel all-reduce
    (`jaxllm.parallel.fp8_allreduce`), E4M3 with a per-tensor scale: they are not quantized again
    (a second per-tensor scale would round them twice)."""
    if level not in ("O1", "O2"):
        raise ValueError(f"precision.fp8_level={level!r}: use O1 or O2")
    o2 = level == "O2"

    def init(params):
        state = inner.init(params)
        return _compress(state, v_dtype) if o2 else state

    def update(grads, state, params=None):
        if not grads_in_fp8:
            grads = fp8_gradients(grads)
        full = _expand(state) if o2 else state
        updates, full = inner.update(grads, full, params)
        return updates, (_compress(full, v_dtype) if o2 else full)

    return optax.GradientTransformation(init, update)


def train_state_bytes_per_param(params: Any, opt_state: Any, grad_bytes: float) -> dict:
    """Bytes per parameter of master weights, gradients (as the optimizer receives them) and
    optimizer states, from the arrays' own sizes (scales and counters included)."""
    n = sum(x.size for x in jax.tree.leaves(params))
    nbytes = lambda t: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(t))
    out = {"master": nbytes(params) / n, "grad": grad_bytes, "optimizer": nbytes(opt_state) / n}
    out["total"] = out["master"] + out["grad"] + out["optimizer"]
    return out
