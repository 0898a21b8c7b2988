"""Ahead-of-time compiles for an NVIDIA H200 from this CPU host (marker `gpu_aot`, needs jax's
CUDA plugin: the `cuda` extra). XLA:GPU compiles for the target description with its real
passes, Triton and ptxas (`jaxllm.parallel.core.topology`), so the Pallas Triton kernels are
compiled for sm_90 here, inside Hopper's shared-memory limit:
- the lightning kernel forward and backward (with the decay's gradient, packed or not), the
  GLA kernel forward and backward (packed), the FP8 GEMM for both operand pairs and both
  scalings;
- the flash-attention kernels (forward, dq, dk/dv) at head dims 64 to 256 with GQA;
- jax's Mosaic GPU grouped GEMMs behind `grouped_matmul(impl="mosaic_gpu")`, where XLA's
  ragged_dot computes every group's dense product;
- `ops.attention(impl="auto")` picks cuDNN flash attention (forward and backward custom
  calls) for causal GQA, and the Triton flash kernel for packed rows, with no [T, S] float32
  scores.
cuDNN builds its graphs on the device, so a cuDNN call compiling here says nothing of whether
cuDNN accepts it: that stays with the `gpu` tests."""

import re

import jax
import jax.numpy as jnp
import pytest

from jaxllm import compile as aot
from jaxllm.ops.attention import attention
from jaxllm.precision.grouped_matmul import grouped_matmul
from kernels_pallas.flash_attention import flash_attention
from kernels_pallas.fp8_matmul import fp8_matmul
from kernels_pallas.gated_linear_attention import gated_linear_attention
from kernels_pallas.lightning_attention import lightning_attention

pytestmark = [
    pytest.mark.gpu_aot,
    pytest.mark.skipif(not aot.cuda_available(), reason="needs jax's CUDA plugin (.[cuda])"),
]

TRITON = 'custom_call_target="__gpu$xla.gpu.triton"'
CUDNN = re.compile(r'custom_call_target="__cudnn\$fmha\w*"')


@pytest.fixture(scope="module")
def h200():
    """One compile-only H200."""
    return aot.topology_devices(aot.parse_topology("h200"))[0]


@pytest.fixture(scope="module")
def spec(h200):
    """ShapeDtypeStruct on one compile-only H200."""
    sharding = jax.sharding.SingleDeviceSharding(h200)
    return lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _compiled(fn, *args) -> str:
    return jax.jit(fn).trace(*args).lower().compile().as_text()


B, T, H = 2, 1000, 4  # an odd length: the kernels pad it


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_lightning_kernel_compiles_for_h200(spec, packed, head_dim):
    def loss(q, k, v, g, seg):
        o = lightning_attention(q, k, v, g, segment_ids=seg if packed else None)
        return jnp.sum(o.astype(jnp.float32) ** 2)

    x = spec((B, T, H, head_dim))
    hlo = _compiled(jax.grad(loss, argnums=(0, 1, 2, 3)), x, x, x, spec((H,), jnp.float32),
                    spec((B, T), jnp.int32))  # fmt: skip
    # forward, dq sweep, dk/dv (+ decay) sweep; no interpret-mode loop beside them
    assert hlo.count(TRITON) == 3
    assert "while(" not in hlo


def test_gla_kernel_compiles_for_h200(spec):
    def loss(q, k, v, g, seg, s0):
        o, sT = gated_linear_attention(q, k, v, g, segment_ids=seg, initial_state=s0,
                                       return_final_state=True)  # fmt: skip
        return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(sT**2)

    K = 128
    x = spec((B, T, H, K))
    args = (x, x, x, spec((B, T, H, K), jnp.float32), spec((B, T), jnp.int32),
            spec((B, H, K, K), jnp.float32))  # fmt: skip
    hlo = _compiled(jax.grad(loss, argnums=(0, 1, 2, 3, 5)), *args)
    assert hlo.count(TRITON) >= 3
    assert "while(" not in hlo


@pytest.mark.parametrize("b_dtype", [jnp.float8_e4m3fn, jnp.float8_e5m2])
@pytest.mark.parametrize("scales", ["tensor", "block"])
def test_fp8_kernel_compiles_for_h200(spec, b_dtype, scales):
    m, k, n = 1024, 2048, 1024
    sa, sb = ((), ()) if scales == "tensor" else ((m, k // 128), (k // 128, n // 128))
    args = (spec((m, k), jnp.float8_e4m3fn), spec((k, n), b_dtype),
            spec(sa, jnp.float32), spec(sb, jnp.float32))  # fmt: skip
    hlo = _compiled(lambda a, b, sa, sb: fp8_matmul(a, b, sa, sb, backend="gpu"), *args)
    assert hlo.count(TRITON) == 1


@pytest.mark.parametrize(("h", "g", "head_dim"), [(32, 4, 64), (32, 8, 128), (8, 2, 256)])
def test_flash_kernel_compiles_for_h200(spec, h, g, head_dim):
    def loss(q, k, v, seg):
        o = flash_attention(q, k, v, segment_ids=seg)
        return jnp.sum(o.astype(jnp.float32) ** 2)

    t = 2048
    args = (spec((1, t, h, head_dim)), spec((1, t, g, head_dim)), spec((1, t, g, head_dim)),
            spec((1, t), jnp.int32))  # fmt: skip
    hlo = _compiled(jax.grad(loss, argnums=(0, 1, 2)), *args)
    assert hlo.count(TRITON) == 3  # forward, dq, dk/dv


def _attention_grads(packed: bool):
    def loss(q, k, v, seg):
        o = attention(q, k, v, causal=True, segment_ids_BT=seg if packed else None)
        return jnp.sum(o.astype(jnp.float32) ** 2)

    return jax.grad(loss, argnums=(0, 1, 2))


@pytest.mark.parametrize("packed", [False, True])
def test_attention_auto_on_h200(spec, packed):
    """Causal GQA: cuDNN flash attention forward and backward. Packed rows: the Triton flash
    kernel (no cuDNN path takes segment ids in jax 0.10, `cudnn_unsupported`); either way no
    float32 buffer of T × T scores."""
    t, K = 1024, 128
    q, kv = spec((B, t, 8, K)), spec((B, t, 2, K))
    hlo = _compiled(_attention_grads(packed), q, kv, kv, spec((B, t), jnp.int32))
    assert len(CUDNN.findall(hlo)) == (0 if packed else 2)
    assert hlo.count(TRITON) == (3 if packed else 0)
    assert not re.search(rf"f32\[(?:\d+,)*{t},{t}\]", hlo)


def test_mosaic_gpu_grouped_matmul_compiles_for_h200(spec, h200, monkeypatch):
    """grouped_matmul(impl="mosaic_gpu"): jax's Hopper kernels for Y, dX and dW (three Mosaic
    GPU calls), where XLA's ragged_dot is a dense product over every group. (jax's dW kernel
    asks `jax.devices()` for the SM count: the H200's here.)"""
    m, k, n, e = 4096, 256, 384, 8
    args = (spec((m, k)), spec((e, k, n)), spec((e,), jnp.int32))

    def loss(impl):
        fn = lambda x, w, s: grouped_matmul(x, w, s, impl=impl).astype(jnp.float32)
        return jax.grad(lambda x, w, s: jnp.sum(fn(x, w, s) ** 2), argnums=(0, 1))

    flops, _ = aot.loop_aware_flops(_compiled(loss("xla"), *args))
    assert flops >= e * 3 * 2 * m * k * n * 0.99  # ragged_dot: every group's dense product
    monkeypatch.setattr(jax, "devices", lambda *a: [h200])
    hlo = _compiled(loss("mosaic_gpu"), *args)
    assert hlo.count('custom_call_target="mosaic_gpu') == 3 and " dot(" not in hlo
