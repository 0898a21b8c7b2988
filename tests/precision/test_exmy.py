"""ExMy fake quantization against ml_dtypes casting, exhaustively where the formats coincide."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxllm.precision.exmy import (
    exmy_max,
    parse_exmy,
    quantize_exmy,
    quantize_exmy_reference,
    round_to_exmy,
)

# (ml_dtypes type, E, M, bits, its largest finite value). The fn/e5m2/bf16 types reserve
# codes for inf/NaN, so they coincide with ExMy only up to their own max.
FORMATS = [
    (ml_dtypes.float8_e4m3fn, 4, 3, 8),
    (ml_dtypes.float8_e5m2, 5, 2, 8),
    (ml_dtypes.bfloat16, 8, 7, 16),
    (ml_dtypes.float4_e2m1fn, 2, 1, 4),
    (ml_dtypes.float6_e3m2fn, 3, 2, 6),
    (ml_dtypes.float6_e2m3fn, 2, 3, 6),
]
IDS = ["e4m3fn", "e5m2", "bf16", "e2m1fn", "e3m2fn", "e2m3fn"]


def _finite_grid(dt, bits: int) -> np.ndarray:
    """Every finite value of `dt`, ascending, as float32 (bit patterns enumerated)."""
    if bits in (8, 16):
        raw = np.arange(2**bits, dtype=np.uint8 if bits == 8 else np.uint16).view(dt)
    else:
        # sub-byte types: ml_dtypes stores one code per byte in the low bits
        raw = np.arange(2**bits, dtype=np.uint8).view(dt)
    v = raw.astype(np.float32)
    return np.unique(v[np.isfinite(v)])


def _same_bits(a, b) -> bool:
    return np.array_equal(np.asarray(a, np.float32).view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize(("dt", "e", "m", "bits"), FORMATS, ids=IDS)
def test_every_finite_value_is_a_fixed_point(dt, e, m, bits):
    grid = _finite_grid(dt, bits)
    assert _same_bits(round_to_exmy(jnp.asarray(grid), e, m), grid)


@pytest.mark.parametrize(("dt", "e", "m", "bits"), FORMATS, ids=IDS)
def test_midpoints_round_to_even_like_ml_dtypes(dt, e, m, bits):
    grid = _finite_grid(dt, bits)
    grid = grid[grid >= 0]
    # Midpoints (ties) and quarter points of every gap; all exact in float32.
    lo, hi = grid[:-1].astype(np.float64), grid[1:].astype(np.float64)
    pts = np.concatenate([(lo + hi) / 2, lo + (hi - lo) / 4, hi - (hi - lo) / 4]).astype(np.float32)
    pts = np.concatenate([pts, -pts])
    want = pts.astype(dt).astype(np.float32)
    assert _same_bits(round_to_exmy(jnp.asarray(pts), e, m), want)


@pytest.mark.parametrize(("dt", "e", "m", "bits"), FORMATS, ids=IDS)
def test_random_inputs_match_ml_dtypes(dt, e, m, bits):
    rng = np.random.default_rng(bits + e)
    fmax = float(ml_dtypes.finfo(dt).max)
    # log-uniform magnitudes from far below the smallest subnormal up to the format's max
    tiny = float(ml_dtypes.finfo(dt).smallest_subnormal)
    mag = np.exp(rng.uniform(np.log(tiny / 4), np.log(fmax), 200_000))
    x = (mag * rng.choice([-1, 1], mag.size)).astype(np.float32)
    x = x[np.abs(x) <= fmax]
    assert _same_bits(round_to_exmy(jnp.asarray(x), e, m), x.astype(dt).astype(np.float32))


def test_max_values_and_saturation():
    # no reserved codes: the all-ones exponent holds ordinary values
    assert exmy_max(4, 3) == 480.0
    assert exmy_max(5, 2) == 114688.0
    assert exmy_max(2, 1) == 6.0
    assert exmy_max(3, 2) == 28.0
    assert exmy_max(8, 7) == float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)
    # the top E4M3 binade is 256, 288, ..., 448, 480: 464 is a tie that goes to even (448)
    x = jnp.array([464.0, 470.0, 500.0, 1e30, -jnp.inf, jnp.inf, jnp.nan])
    q = np.asarray(round_to_exmy(x, 4, 3))
    np.testing.assert_array_equal(q[:6], [448.0, 480.0, 480.0, 480.0, -480.0, 480.0])
    assert np.isnan(q[6])


@pytest.mark.parametrize("block", [None, 4, 16, "channel", "tensor"])
def test_block_scaling_matches_numpy(block):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 37, 5)).astype(np.float32) * np.float32(3.0)
    x[0, :, 2] = 0.0  # an all-zero row keeps scale 1
    got = np.asarray(quantize_exmy(jnp.asarray(x), 2, 1, block_size=block, axis=1))
    xt = np.moveaxis(x, 1, -1)
    out = np.empty_like(xt)
    n = xt.shape[-1]
    size = {None: None, "channel": n, "tensor": None}.get(block, block)
    if block is None:
        out = xt.astype(ml_dtypes.float4_e2m1fn).astype(np.float32)
    elif block == "tensor":
        s = np.float32(6.0) / np.abs(xt).max()
        out = (xt * s).astype(ml_dtypes.float4_e2m1fn).astype(np.float32) / s
    else:
        for start in range(0, n, size):
            blk = xt[..., start : start + size]
            amax = np.abs(blk).max(-1, keepdims=True)
            s = np.where(amax > 0, np.float32(6.0) / np.where(amax > 0, amax, 1), 1).astype(
                np.float32
            )
            out[..., start : start + size] = (blk * s).astype(ml_dtypes.float4_e2m1fn).astype(
                np.float32
            ) / s
    # XLA may divide by the scale as a multiply by its reciprocal: one float32 rounding apart
    np.testing.assert_allclose(got, np.moveaxis(out, -1, 1), rtol=2.5e-7, atol=0)


def test_block_absmax_lands_on_the_format_max_and_dtype_is_kept():
    x = jnp.asarray(np.random.default_rng(2).standard_normal((4, 64)), jnp.bfloat16)
    q = quantize_exmy(x, 4, 3, block_size=32)
    assert q.dtype == jnp.bfloat16
    xb, qb = np.asarray(x, np.float32).reshape(4, 2, 32), np.asarray(q, np.float32)
    # the element of largest magnitude of each block is represented exactly
    np.testing.assert_allclose(np.abs(qb.reshape(4, 2, 32)).max(-1), np.abs(xb).max(-1), 1e-2)
    # E4M3 with a scale to the block max: relative error ≤ 2^-4 on the largest elements
    assert np.max(np.abs(qb - np.asarray(x, np.float32))) <= np.abs(xb).max() * 2**-4


def test_straight_through_gradient():
    x = jnp.linspace(-3.0, 3.0, 50)
    w = jnp.arange(50.0)
    g = jax.grad(lambda x: jnp.sum(w * quantize_exmy(x, 2, 1, block_size=8)))(x)
    np.testing.assert_array_equal(g, w)
    np.testing.assert_array_equal(
        quantize_exmy(x, 2, 1, block_size=8), quantize_exmy_reference(x, 2, 1, block_size=8)
    )


def test_parse_exmy():
    assert parse_exmy("e4m3") == (4, 3, None)
    assert parse_exmy("E2M1/128") == (2, 1, 128)
    assert parse_exmy("e4m3/channel") == (4, 3, "channel")
    assert parse_exmy("bf16/tensor") == (8, 7, "tensor")
    for bad in ("e9m3", "x4m3", "e4m3/0", "e4m3/rows", "e4"):
        with pytest.raises(ValueError, match="ExMy spec"):
            parse_exmy(bad)
