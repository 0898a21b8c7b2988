"""The GPU (Triton) lightning attention kernels against the quadratic reference.

On the CPU the kernels run in Pallas interpret mode, forward and backward, compared with
`lightning_attention_reference` through `jax.vjp` with a random output cotangent and a random
final-state cotangent. Inputs are laid out and zero-padded here the way the wrapper does it
([B, H, T, K], T up to a multiple of block_t). Tolerances as tests/ops/test_lightning_attention.py
(fla's `assert_close`): RMS(Δ)/RMS(ref) ≤ 1e-5 in float32, ≤ 5e-3 with bfloat16 inputs.

Interpret mode cannot see what only the Triton lowering rejects (an op without a Triton rule,
a tile that is not a power of two), so `test_lowers_for_cuda` runs the Pallas → Triton IR
lowering on the CPU, with and without document resets, and the ops' impl="auto" is lowered
for CUDA to see that it picks these kernels. Triton's own compile (shared memory, registers)
needs a GPU. The kernels with resets (segment_ids) are compared with the packed reference
through their entry point in test_lightning_kernel.py (backend="gpu").
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.ops.lightning_attention import lightning_attention, lightning_attention_reference
from jaxllm.ops.lightning_attention_packed import lightning_attention_packed
from kernels_pallas.lightning_attention import gpu, gpu_available
from tests.helpers import assert_close, cuda_lowering

RATIO = {jnp.float32: 1e-5, jnp.bfloat16: 5e-3}
_STATIC = ("seq_len", "block_t", "block_v")


def _log_decay(kind, H):
    """Per-head log λ, different for each head so that a wrong head index shows."""
    if kind == "none":
        return jnp.zeros((H,), jnp.float32)
    if kind == "strong":  # λ from 0.6 down to 0.37
        return -jnp.linspace(0.5, 1.0, H, dtype=jnp.float32)
    assert kind == "tnl"  # the official slopes: λ from 0.84 up to 0.996
    return -jnp.asarray(2.0 ** (-8.0 * (np.arange(H) + 1) / H), jnp.float32)


def _to_kernel_layout(x_BTHX, block_t, extra_blocks=0):
    """[B, T, H, X] → [B, H, T', X] with T zero-padded up to a multiple of block_t (plus
    extra_blocks whole blocks of padding)."""
    T = x_BTHX.shape[1]
    pad = -T % block_t + extra_blocks * block_t
    return jnp.pad(jnp.swapaxes(x_BTHX, 1, 2), ((0, 0), (0, 0), (0, pad), (0, 0)))


def _from_kernel_layout(x_BHTX, T):
    return jnp.swapaxes(x_BHTX[:, :, :T], 1, 2)


@functools.partial(jax.jit, static_argnames=(*_STATIC, "extra_blocks"))
def _kernel_vjp(q, k, v, g_H, s0, do, dsT, *, seq_len, block_t, block_v, extra_blocks):
    blocks = dict(seq_len=seq_len, block_t=block_t, block_v=block_v, interpret=True)
    q_, k_, v_, do_ = (_to_kernel_layout(x, block_t, extra_blocks) for x in (q, k, v, do))
    o, sT = gpu.forward(q_, k_, v_, g_H, s0, **blocks)
    grads = gpu.backward(q_, k_, v_, g_H, s0, do_, dsT, **blocks)
    dq, dk, dv = (_from_kernel_layout(x, seq_len) for x in grads[:3])
    return _from_kernel_layout(o, seq_len), sT, (dq, dk, dv, grads[3])


@jax.jit
def _reference_vjp(q, k, v, g_H, s0, do, dsT):
    def f(q, k, v, s0):
        return lightning_attention_reference(
            q, k, v, g_H, initial_state=s0, return_final_state=True
        )

    (o, sT), vjp = jax.vjp(f, q, k, v, s0)
    return o, sT, vjp((do, dsT))


def _check_against_reference(B, H, T, K, V, dtype, decay, block_t, block_v, extra_blocks=0, seed=0):
    keys = jax.random.split(jax.random.key(seed), 6)
    q, k = (jax.random.normal(key, (B, T, H, K), dtype) for key in keys[:2])
    v, do = (jax.random.normal(key, (B, T, H, V), dtype) for key in keys[2:4])
    s0, dsT = (jax.random.normal(key, (B, H, K, V), jnp.float32) for key in keys[4:])
    g_H = _log_decay(decay, H)
    want = _reference_vjp(q, k, v, g_H, s0, do, dsT)
    blocks = dict(block_t=block_t, block_v=block_v, extra_blocks=extra_blocks)
    got = _kernel_vjp(q, k, v, g_H, s0, do, dsT, seq_len=T, **blocks)
    ratio = RATIO[dtype]
    assert got[0].dtype == dtype and got[1].dtype == jnp.float32
    assert_close("o", want[0], got[0], ratio)
    assert_close("final state", want[1], got[1], ratio)
    for name, w, g in zip(("dq", "dk", "dv", "ds0"), want[2], got[2], strict=True):
        assert g.dtype == w.dtype, f"{name}: dtype {g.dtype} != {w.dtype}"
        assert_close(name, w, g, ratio)


@pytest.mark.parametrize(
    "T, K, V, dtype, decay, block_v, extra_blocks",
    [
        # A partial block then a whole block of padding (no decay over either); two V tiles.
        (37, 64, 64, jnp.float32, "strong", 32, 1),
        (200, 128, 128, jnp.float32, "none", 64, 0),  # partial last block, no decay
        (1, 64, 64, jnp.bfloat16, "strong", 64, 0),  # a single real token
        (200, 64, 128, jnp.bfloat16, "tnl", 128, 0),  # one V tile
        (200, 128, 128, jnp.bfloat16, "strong", 64, 0),
    ],
)
def test_matches_reference(T, K, V, dtype, decay, block_v, extra_blocks):
    _check_against_reference(2, 2, T, K, V, dtype, decay, 64, block_v, extra_blocks)


@pytest.mark.slow
@pytest.mark.parametrize("block_t, block_v", [(16, 16), (32, 32), (64, 64), (128, 128)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matches_reference_long(block_t, block_v, dtype):
    _check_against_reference(2, 4, 1000, 128, 128, dtype, "tnl", block_t, block_v, seed=1)


@pytest.mark.slow
def test_head_dim_padded_to_power_of_two():
    # K = 192 (a multiple of 64, as the wrapper pads) is zero-padded to 256 inside.
    _check_against_reference(2, 2, 130, 192, 64, jnp.float32, "tnl", 64, 32)


def _lower_for_cuda(dtype, K, V, block_t, block_v, packed=False):
    """The StableHLO text of forward and backward lowered for CUDA (Pallas → Triton IR).
    T = 192 and H = 3 are not powers of two: only the tiles have to be. packed: with document
    runs (resets)."""
    B, H, T = 2, 3, 192
    sds = jax.ShapeDtypeStruct
    args = (sds((B, H, T, K), dtype), sds((B, H, T, K), dtype), sds((B, H, T, V), dtype))
    args += (sds((H,), jnp.float32), sds((B, H, K, V), jnp.float32))
    cotangents = (sds((B, H, T, V), dtype), sds((B, H, K, V), jnp.float32))
    run = sds((B, T), jnp.int32) if packed else None
    blocks = dict(seq_len=130, block_t=block_t, block_v=block_v)

    def fwd(*args, run_BT):
        return gpu.forward(*args, run_BT=run_BT, **blocks)

    def bwd(*args, run_BT):
        return gpu.backward(*args, run_BT=run_BT, **blocks)

    lower = dict(lowering_platforms=("cuda",))
    with cuda_lowering():
        return (
            jax.jit(fwd).trace(*args, run_BT=run).lower(**lower).as_text(),
            jax.jit(bwd).trace(*args, *cotangents, run_BT=run).lower(**lower).as_text(),
        )


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize(
    "dtype, K, V, block_t, block_v",
    [
        *((dtype, 128, 128, *gpu.FALLBACK_BLOCK_SIZES) for dtype in (jnp.float32, jnp.bfloat16)),
        *((dtype, 128, 128, *sizes) for _, sizes in gpu.BLOCK_SIZES for dtype in RATIO),
        (jnp.bfloat16, 64, 192, 64, 64),
        (jnp.bfloat16, 192, 64, 64, 64),  # K padded to 256 inside
    ],
)
def test_lowers_for_cuda(dtype, K, V, block_t, block_v, packed):
    fwd, bwd = _lower_for_cuda(dtype, K, V, block_t, block_v, packed)
    assert fwd.count("__gpu$xla.gpu.triton") == 1
    assert bwd.count("__gpu$xla.gpu.triton") == 2


@pytest.mark.parametrize("packed", [False, True])
def test_ops_auto_lowers_to_the_gpu_kernel_for_cuda(packed):
    """jaxllm.ops' impl="auto", differentiated and lowered for CUDA: the Triton forward, dq
    sweep and dk/dv sweep, with the document runs among their operands when packed."""
    assert gpu_available()
    B, T, H, K = 2, 100, 2, 64
    sds = jax.ShapeDtypeStruct
    x = sds((B, T, H, K), jnp.bfloat16)
    seg = sds((B, T), jnp.int32)

    def loss(q, k, v, seg):
        g = -jnp.ones((H,), jnp.float32)
        if packed:
            o = lightning_attention_packed(q, k, v, g, seg, impl="auto")
        else:
            o = lightning_attention(q, k, v, g, impl="auto")
        return jnp.sum(o.astype(jnp.float32) ** 2)

    with cuda_lowering():
        lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, x, x, seg)
        text = lowered.lower(lowering_platforms=("cuda",)).as_text()
    calls = [line for line in text.splitlines() if "__gpu$xla.gpu.triton" in line]
    assert len(calls) == 3
    # the document runs (documents.mask_inputs) are the only int32 operands
    assert all(("xi32>" in c) == packed for c in calls), calls


def test_default_block_sizes():
    assert gpu.default_block_sizes("NVIDIA H100 80GB HBM3") == (64, 64)
    assert gpu.default_block_sizes("NVIDIA A100-SXM4-40GB") == (64, 32)
    assert gpu.default_block_sizes("NVIDIA GeForce RTX 4090") == gpu.FALLBACK_BLOCK_SIZES


def test_rejects_bad_blocks():
    x = jnp.zeros((1, 1, 64, 64), jnp.float32)
    s = jnp.zeros((1, 1, 64, 64), jnp.float32)
    g = jnp.zeros((1,), jnp.float32)
    with pytest.raises(ValueError, match="power of two"):
        gpu.forward(x, x, x, g, s, seq_len=64, block_t=48, block_v=64, interpret=True)
    with pytest.raises(ValueError, match="multiples"):
        gpu.forward(x, x, x, g, s, seq_len=64, block_t=128, block_v=64, interpret=True)
    with pytest.raises(ValueError, match="seq_len"):
        gpu.forward(x, x, x, g, s, seq_len=65, block_t=64, block_v=64, interpret=True)
