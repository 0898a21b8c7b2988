"""`kernels_pallas.fp8_matmul`: the TPU (Mosaic) and GPU (Triton) kernels in Pallas interpret
mode against the float32 reference, the platform dispatch, and the Triton lowering for CUDA
(traced and lowered on this CPU: Pallas → Triton IR; PTX compilation needs a GPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.fp8_matmul import fp8_matmul, fp8_matmul_reference

E4M3, E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2


def _operands(m, k, n, a_dtype, b_dtype, scales, seed=0):
    ka, kb, ksa, ksb = jax.random.split(jax.random.key(seed), 4)
    a = (jax.random.normal(ka, (m, k)) * 4).astype(a_dtype)
    b = (jax.random.normal(kb, (k, n)) * 4).astype(b_dtype)
    g = -(-k // 128)
    shapes = {
        "tensor": ((), ()),
        "block": ((m, g), (g, -(-n // 128))),  # DeepSeek-V3: 1×128 and 128×128
        "column": ((m, g), (g, n)),  # 128×1 groups on b (a weight-gradient GEMM)
        "mixed": ((), (g, -(-n // 128))),  # a per-tensor scale beside a fine-grained one
    }[scales]
    sa = jax.random.uniform(ksa, shapes[0], minval=0.25, maxval=4.0)
    sb = jax.random.uniform(ksb, shapes[1], minval=0.25, maxval=4.0)
    return a, b, sa, sb


def _check(out, ref, out_dtype):
    assert out.shape == ref.shape and out.dtype == jnp.dtype(out_dtype)
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    # f32: only the summation order differs; bf16: one rounding of the output
    rtol = 2e-6 if out_dtype == jnp.float32 else 2**-8
    np.testing.assert_allclose(out, ref, rtol=rtol, atol=rtol * np.abs(ref).max())


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize(
    "scales,a_dtype,b_dtype,out_dtype",
    [
        ("tensor", E4M3, E4M3, jnp.float32),
        ("tensor", E5M2, E4M3, jnp.bfloat16),
        ("block", E5M2, E4M3, jnp.bfloat16),
        ("column", E4M3, E5M2, jnp.float32),
        ("mixed", E4M3, E4M3, jnp.float32),
    ],
)
def test_matches_reference(backend, scales, a_dtype, b_dtype, out_dtype):
    # odd sizes: every dim padded; K spans three 128-groups and (block_k=256) two K steps
    a, b, sa, sb = _operands(50, 300, 200, a_dtype, b_dtype, scales)
    blocks = dict(block_m=32, block_n=128, block_k=256)
    kw = dict(out_dtype=out_dtype, backend=backend, interpret=True, **blocks)
    f = jax.jit(lambda *x: fp8_matmul(*x, **kw))
    _check(f(a, b, sa, sb), fp8_matmul_reference(a, b, sa, sb, out_dtype=out_dtype), out_dtype)


def test_fine_grained_scales_applied_per_group():
    # a per-group scale that differs between the two halves of one 256-wide K block must not
    # be confused with per-tensor scaling
    a = jnp.ones((32, 256), E4M3)
    b = jnp.ones((256, 128), E4M3)
    sa = jnp.array([[1.0, 3.0]] * 32)
    sb = jnp.array([[2.0], [5.0]])
    out = fp8_matmul(a, b, sa, sb, out_dtype=jnp.float32, interpret=True, block_k=256)
    np.testing.assert_array_equal(out, jnp.full((32, 128), 128 * (1 * 2 + 3 * 5), jnp.float32))


def test_tpu_interpreter_detects_no_races():
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc

    params = pltpu.InterpretParams(
        detect_races=True, uninitialized_memory="nan", num_cores_or_threads=2
    )
    a, b, sa, sb = _operands(64, 256, 128, E4M3, E4M3, "block", seed=1)
    out = fp8_matmul(a, b, sa, sb, out_dtype=jnp.float32, backend="tpu", interpret=params,
                     block_m=32, block_n=128, block_k=128)  # fmt: skip
    assert not ipc.races.races_found
    _check(out, fp8_matmul_reference(a, b, sa, sb, out_dtype=jnp.float32), jnp.float32)


def test_default_dispatch_on_cpu_interprets_the_tpu_kernel():
    a, b, sa, sb = _operands(40, 200, 130, E4M3, E5M2, "block", seed=2)
    jaxpr = str(jax.make_jaxpr(lambda *x: fp8_matmul(*x))(a, b, sa, sb))
    assert "platform_index" in jaxpr and "fp8_matmul_group_scale" in jaxpr
    out = jax.jit(fp8_matmul)(a, b, sa, sb)
    _check(out, fp8_matmul_reference(a, b, sa, sb), jnp.bfloat16)


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(a_scale=jnp.ones((40, 3))), "a_scale"),
        (dict(b_scale=jnp.ones((3, 2))), "b_scale"),
        (dict(a=jnp.ones((40, 200), jnp.bfloat16)), "float8"),
        (dict(out_dtype=jnp.float16), "out_dtype"),
        (dict(block_k=192), "multiple of 128"),
    ],
)
def test_rejects_bad_arguments(bad, match):
    a, b, sa, sb = _operands(40, 200, 130, E4M3, E4M3, "block")
    kw = dict(a=a, b=b, a_scale=sa, b_scale=sb, out_dtype=jnp.bfloat16, block_k=None)
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        fp8_matmul(kw["a"], kw["b"], kw["a_scale"], kw["b_scale"], out_dtype=kw["out_dtype"],
                   block_k=kw["block_k"], interpret=True)  # fmt: skip


@pytest.mark.parametrize("scales", ["tensor", "block"])
@pytest.mark.parametrize("b_dtype", [E4M3, E5M2])
def test_triton_lowering_for_cuda(scales, b_dtype, monkeypatch, capsys):
    """The default dispatch lowered for CUDA picks the Triton kernel, and Pallas lowers it to
    Triton IR: an FP8 ``tt.dot`` with float32 results (bf16 for mixed formats, which Pallas's
    Triton dot does not take). Compiling that IR to PTX needs a GPU."""
    from jax.experimental import pallas as pl

    from kernels_pallas.fp8_matmul import gpu

    call = pl.pallas_call
    monkeypatch.setattr(gpu.pl, "pallas_call", lambda *a, **k: call(*a, **k, debug=True))
    a, b, sa, sb = _operands(256, 512, 256, E4M3, b_dtype, scales)
    lowered = jax.jit(fp8_matmul).trace(a, b, sa, sb).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert "__gpu$xla.gpu.triton" in text and "tpu_custom_call" not in text
    dots = [line for line in capsys.readouterr().out.splitlines() if "tt.dot" in line]
    tile = f"tensor<128x128x{'f8E4M3FN' if b_dtype == E4M3 else 'bf16'}>"
    assert dots and all(f"{tile} * {tile}" in d for d in dots), dots
    assert all("-> tensor<128x128xf32>" in d for d in dots)


@pytest.mark.parametrize("precision", [None, jax.lax.DotAlgorithmPreset.ANY_F8_ANY_F8_F32])
def test_triton_lowering_rejects_mixed_fp8_dot(precision):
    """Why gpu.py upcasts E5M2 × E4M3 tiles to bfloat16: Pallas's Triton lowering (jax 0.10.2)
    rejects an FP8 dot of two formats, and the FP8 dot-algorithm presets. Should this fail
    after a jax upgrade, the lowering takes the pair: give `gpu._tile_dot` the FP8 dot."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    def kernel(a_ref, b_ref, o_ref):
        o_ref[...] = jax.lax.dot(
            a_ref[...], b_ref[...], precision=precision, preferred_element_type=jnp.float32
        )

    call = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((128, 128), jnp.float32),
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
    )
    a, b = jax.ShapeDtypeStruct((128, 128), E5M2), jax.ShapeDtypeStruct((128, 128), E4M3)
    if precision is None:
        error, match = ValueError, "same element type, but got: f8E5M2 and f8E4M3FN"
    else:
        error, match = NotImplementedError, "Unsupported dot algorithm: ANY_F8_ANY_F8_F32"
    with pytest.raises(error, match=match):
        jax.jit(call).trace(a, b).lower(lowering_platforms=("cuda",))
