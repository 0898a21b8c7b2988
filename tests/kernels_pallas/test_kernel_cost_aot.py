"""The FLOPs our Mosaic kernels declare (`kernels_pallas/cost.py`), compiled for a v5e chip
from this CPU host (marker `tpu_aot`, needs libtpu). XLA counts a custom call as 0 FLOPs; with
the estimates every kernel call is counted, and a linear-attention op's forward + backward by
the kernels lands near XLA's own count of the op's chunked XLA form (the same matmuls, chunked
its own way)."""

import functools

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import SingleDeviceSharding

from jaxllm import compile as aot
from jaxllm.ops import gated_linear_attention, lightning_attention
from kernels_pallas.fp8_matmul import tpu as fp8_tpu

pytestmark = [
    pytest.mark.tpu_aot,
    pytest.mark.skipif(not aot.tpu_available(), reason="needs libtpu (pip install .[tpu])"),
]
B, T, H, K = 2, 2048, 4, 128


@functools.cache
def _chip():
    return SingleDeviceSharding(aot.topology_devices(aot.parse_topology("v5e:2x2"))[0])


def _arg(shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=_chip())


def _count(fn, *args):
    """(FLOPs counted, kernel calls without an estimate) of fn's gradient, compiled."""
    loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32) ** 2)
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*args).lower().compile().as_text()
    return aot.loop_aware_flops(text)[0], aot.kernels_without_flops(text)


@pytest.mark.parametrize(
    "op, extra",
    [
        # a learned decay: the dk/dv sweep also computes its gradient
        (lightning_attention, lambda: _arg((H,), jnp.float32)),
        (gated_linear_attention, lambda: _arg((B, T, H, K), jnp.float32)),
    ],
)
def test_linear_attention_kernels_declare_their_matmuls(op, extra):
    x = _arg((B, T, H, K))
    g = extra()
    counts = {impl: _count(lambda q, k, v, g, impl=impl: op(q, k, v, g, impl=impl), x, x, x, g)
              for impl in ("pallas", "xla")}  # fmt: skip
    (kernel, uncounted), (xla, _) = counts["pallas"], counts["xla"]
    assert uncounted == 0
    # the same matmuls up to each form's chunking (and the XLA form's elementwise work)
    assert 0.5 * xla <= kernel <= 1.5 * xla, (kernel, xla)


def test_fp8_matmul_declares_its_product():
    m = n = k = 1024
    a = _arg((m, k), jnp.float8_e4m3fn)
    b = _arg((k, n), jnp.float8_e4m3fn)
    s = _arg((1,), jnp.float32)
    fn = lambda a, b, s: fp8_tpu.matmul_tensor_scale(
        a, b, s, out_dtype=jnp.bfloat16, blocks=(512, 512, 512)
    )
    text = jax.jit(fn).trace(a, b, s).lower().compile().as_text()
    assert aot.kernels_without_flops(text) == 0
    assert aot.loop_aware_flops(text)[0] == pytest.approx(2 * m * n * k, rel=1e-3)
