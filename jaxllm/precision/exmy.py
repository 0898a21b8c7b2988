"""ExMy fake quantization: round onto a small floating-point grid, compute in high precision.

The format is the one of the FP-quantization scaling law (Sun et al., ICML 2025, arXiv
2501.02423, "Capybara"): 1 sign bit, E exponent bits, M mantissa bits, IEEE-like bias
``2^(E-1) - 1``, subnormals, and *no* codes reserved for inf/NaN (the all-ones exponent holds
ordinary values). So the largest finite value is ``2^(2^(E-1)) · (2 - 2^-M)``: 480 for E4M3,
114688 for E5M2, 6 for E2M1, 28 for E3M2. Where a hardware format has no reserved codes the
grids coincide exactly (``float4_e2m1fn``, ``float6_e3m2fn``, ``float6_e2m3fn``); E4M3fn, E5M2
and bfloat16 (E8M7) coincide up to their reserved codes.

Rounding is to nearest, ties to even, done on the float32 bit pattern so that it is exact
(and immune to the flush-to-zero of float32 denormals that XLA does on CPU and GPU). E ≤ 8 and
M ≤ 23: every such grid is a subset of float32. For E = 8 the all-ones-exponent binade lies
beyond float32, so that grid is cut at bfloat16's largest finite value.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp

from jaxllm.errors import ConfigError

BlockSize = int | Literal["channel", "tensor"] | None


def exmy_bias(exponent_bits: int) -> int:
    """IEEE-like exponent bias ``2^(E-1) - 1`` (the paper's convention)."""
    return 2 ** (exponent_bits - 1) - 1


def exmy_max(exponent_bits: int, mantissa_bits: int) -> float:
    """Largest finite ExMy value with no reserved codes: ``2^(2^(E-1)) (2 - 2^-M)``.

    For E = 8 that is 2^128 (beyond float32); the float32-representable cut is returned.
    """
    _check(exponent_bits, mantissa_bits)
    emax = 2 ** (exponent_bits - 1) if exponent_bits < 8 else 127
    return math.ldexp(2.0 - 2.0**-mantissa_bits, emax)


def exmy_min_normal(exponent_bits: int) -> float:
    return math.ldexp(1.0, 1 - exmy_bias(exponent_bits))


def _check(e: int, m: int) -> None:
    if not (1 <= e <= 8 and 0 <= m <= 23):
        raise ValueError(f"ExMy needs 1 <= E <= 8 and 0 <= M <= 23, got E{e}M{m}")


def round_to_exmy(x: jax.Array, exponent_bits: int, mantissa_bits: int) -> jax.Array:
    """Round `x` to the nearest ExMy value (ties to even), saturating at ±`exmy_max`.

    No scaling, no gradient rule (see `quantize_exmy`). Returns float32; NaN stays NaN.
    """
    e, m = exponent_bits, mantissa_bits
    _check(e, m)
    x32 = x.astype(jnp.float32)
    # All on the bit pattern (abs, clamp, sign): float ops would flush denormals to zero.
    bits = jax.lax.bitcast_convert_type(x32, jnp.uint32)
    sign = bits & jnp.uint32(0x80000000)
    max_bits = jax.lax.bitcast_convert_type(jnp.float32(exmy_max(e, m)), jnp.uint32)
    a_bits = jnp.minimum(bits & jnp.uint32(0x7FFFFFFF), max_bits)
    shift = 23 - m
    if shift:
        # RNE on the bit pattern: add half an ulp minus one, plus the lsb (ties to even), then
        # truncate. A carry out of the mantissa bumps the exponent, which is what rounding up
        # across a power of two means. Exact for every normal float32 and, with E = 8, for the
        # target's subnormals (which are float32's denormals, with the same layout).
        lsb = (a_bits >> shift) & 1
        a_bits = (a_bits + jnp.uint32((1 << (shift - 1)) - 1) + lsb) & ~jnp.uint32((1 << shift) - 1)
    if e < 8:
        # Below the smallest normal the grid is evenly spaced by 2^(emin - M); every value
        # involved is a float32 normal (or rounds to zero), so power-of-two scaling is exact.
        emin = 1 - exmy_bias(e)
        a = jnp.abs(x32)
        sub = jnp.round(a * math.ldexp(1.0, m - emin)) * math.ldexp(1.0, emin - m)
        sub_bits = jax.lax.bitcast_convert_type(sub.astype(jnp.float32), jnp.uint32)
        a_bits = jnp.where(a < exmy_min_normal(e), sub_bits, a_bits)
    q = jax.lax.bitcast_convert_type(a_bits | sign, jnp.float32)
    q = jnp.where(jnp.isnan(x32), x32, q)
    return q


def _blocks(x: jax.Array, block_size: BlockSize, axis: int):
    """Move `axis` last and split it into blocks: ([..., n_blocks, block], undo)."""
    x = jnp.moveaxis(x, axis, -1)
    lead, n = x.shape[:-1], x.shape[-1]
    if block_size == "tensor":
        return x.reshape(1, -1), lambda y: jnp.moveaxis(y.reshape(*lead, n), -1, axis)
    b = n if block_size == "channel" else int(block_size)
    pad = -n % b
    xp = jnp.pad(x, [(0, 0)] * len(lead) + [(0, pad)])
    shaped = xp.reshape(*lead, (n + pad) // b, b)

    def undo(y):
        return jnp.moveaxis(y.reshape(*lead, n + pad)[..., :n], -1, axis)

    return shaped, undo


def quantize_exmy_reference(
    x: jax.Array,
    exponent_bits: int,
    mantissa_bits: int,
    *,
    block_size: BlockSize = None,
    axis: int = -1,
) -> jax.Array:
    """`quantize_exmy` without the straight-through gradient rule."""
    if block_size is None:
        return round_to_exmy(x, exponent_bits, mantissa_bits).astype(x.dtype)
    if isinstance(block_size, int) and block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    xb, undo = _blocks(x.astype(jnp.float32), block_size, axis)
    amax = jnp.max(jnp.abs(xb), axis=-1, keepdims=True)
    # S = FPmax / absmax (paper §2), kept in float32; all-zero blocks keep scale 1.
    safe = jnp.where(amax > 0, amax, 1.0)
    scale = jnp.where(amax > 0, exmy_max(exponent_bits, mantissa_bits) / safe, 1.0)
    q = round_to_exmy(xb * scale, exponent_bits, mantissa_bits) / scale
    return undo(q).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _quantize_ste(x, exponent_bits, mantissa_bits, block_size, axis):
    return quantize_exmy_reference(
        x, exponent_bits, mantissa_bits, block_size=block_size, axis=axis
    )


def _quantize_fwd(x, exponent_bits, mantissa_bits, block_size, axis):
    return _quantize_ste(x, exponent_bits, mantissa_bits, block_size, axis), None


def _quantize_bwd(exponent_bits, mantissa_bits, block_size, axis, _, g):
    return (g,)


_quantize_ste.defvjp(_quantize_fwd, _quantize_bwd)


def quantize_exmy(
    x: jax.Array,
    exponent_bits: int,
    mantissa_bits: int,
    *,
    block_size: BlockSize = None,
    axis: int = -1,
) -> jax.Array:
    """Fake-quantize `x` (any shape) to ExMy, returned in `x.dtype`, straight-through gradient.

    block_size: None — round onto the grid unscaled, saturating at ±`exmy_max(E, M)`;
    int B — one scale ``exmy_max / absmax`` per B consecutive elements along `axis` (the last
    block may be shorter); "channel" — one scale per row along `axis`; "tensor" — one scale.
    The scale is float32 (not a power of two), as in the paper; an all-zero block keeps 1.
    """
    return _quantize_ste(x, exponent_bits, mantissa_bits, block_size, axis)


def parse_exmy(spec: str) -> tuple[int, int, BlockSize]:
    """``"e4m3"`` → (4, 3, None); ``"e2m1/128"`` → (2, 1, 128); ``"e4m3/channel"``, ``/tensor``.

    Accepts ``bf16`` as E8M7. Raises ValueError with the accepted forms.
    """
    s = spec.strip().lower()
    fmt, _, block = s.partition("/")
    fmt = {"bf16": "e8m7", "bfloat16": "e8m7"}.get(fmt, fmt)
    try:
        if not fmt.startswith("e") or "m" not in fmt:
            raise ValueError
        e_str, m_str = fmt[1:].split("m")
        e, m = int(e_str), int(m_str)
        _check(e, m)
        bs: BlockSize
        if block in ("", "none"):
            bs = None
        elif block in ("channel", "tensor"):
            bs = block  # type: ignore[assignment]
        else:
            bs = int(block)
            if bs < 1:
                raise ValueError
    except ValueError:
        raise ValueError(
            f"{spec!r} is not an ExMy spec: use eEmM[/B|/channel|/tensor], e.g. e4m3/128 "
            "(1 <= E <= 8, 0 <= M <= 23)"
        ) from None
    return e, m, bs


def check_specs(quantize_cfg) -> None:
    """`ConfigError` naming the first field of `quantize_cfg` (a `QuantizeConfig`, the six
    GEMM inputs of `precision.quantize`) that holds no ExMy spec."""
    for name, spec in quantize_cfg.model_dump().items():
        if spec is not None:
            try:
                parse_exmy(spec)
            except ValueError as e:
                raise ConfigError(f"precision.quantize.{name}: {e}") from None
