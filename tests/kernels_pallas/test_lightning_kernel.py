"""The lightning attention Pallas kernels through their entry point, in interpret mode on the
CPU (the TPU kernel, and the GPU one with backend="gpu"), against
`lightning_attention_reference`: output, final state and the gradients of q, k, v, the
log decay and the initial state, with a cotangent on the final state too.
The same with packed documents (segment_ids: the state reset at each document start) against
`lightning_attention_packed_reference`.

Tolerances as tests/ops/test_lightning_attention.py (fla's `assert_close`): float32 RMS ratio
1e-5; bfloat16 5e-3 against the reference given the same bfloat16 inputs.
"""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from jaxllm.ops.lightning_attention import lightning_attention, lightning_attention_reference
from jaxllm.ops.lightning_attention_packed import (
    lightning_attention_packed,
    lightning_attention_packed_reference,
)
from kernels_pallas.lightning_attention import gpu_available, tpu
from kernels_pallas.lightning_attention import lightning_attention as kernel_attention
from tests.helpers import assert_close, cuda_lowering

F32_RATIO = 1e-5
BF16_RATIO = 5e-3
# The entry point's arguments that pick each kernel on this CPU: the TPU kernel is its default
# here, the GPU (Triton) kernel runs only when asked for, interpreted.
BACKENDS = {"tpu": {}, "gpu": {"backend": "gpu", "interpret": True}}


def _backend_kw(backend):
    # Without the GPU module the entry point would quietly interpret the TPU kernel instead.
    assert backend == "tpu" or gpu_available()
    return BACKENDS[backend]


def _log_decay(kind, H):
    if kind == "none":
        return None
    if kind == "strong":  # λ = 0.3: λ^T underflows to 0 within a block
        return jnp.full((H,), np.log(0.3), jnp.float32)
    assert kind == "tnl"
    return -(2.0 ** (-8.0 * (np.arange(H) + 1) / H)).astype(np.float32)


def _inputs(B, T, H, K, V, dtype, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 6)
    # randn/√K keeps q·k O(1), as the anchors' randn/10 at their head dims.
    q = (jax.random.normal(keys[0], (B, T, H, K)) / np.sqrt(K)).astype(dtype)
    k = (jax.random.normal(keys[1], (B, T, H, K)) / np.sqrt(K)).astype(dtype)
    v = jax.random.normal(keys[2], (B, T, H, V)).astype(dtype)
    s0 = jax.random.normal(keys[3], (B, H, K, V))
    do = jax.random.normal(keys[4], (B, T, H, V)).astype(dtype)
    dsT = jax.random.normal(keys[5], (B, H, K, V))
    return q, k, v, s0, do, dsT


def _vjp(fn, q, k, v, g, s0, do, dsT):
    """(o, final state, (dq, dk, dv, dg, ds0)) of fn(q, k, v, g, s0) = (o, final state)."""
    (o, sT), vjp = jax.vjp(fn, q, k, v, g, s0)
    return o, sT, vjp((do, dsT))


def _differentiable(g, H):
    """No decay as log λ = 0, so that its gradient (at λ = 1) is compared too."""
    return jnp.zeros((H,), jnp.float32) if g is None else g


GRAD_NAMES = ("dq", "dk", "dv", "dlog_decay", "ds0")


def _check(B, T, H, K, V, decay, dtype, seed=0, **kw):
    q, k, v, s0, do, dsT = _inputs(B, T, H, K, V, dtype, seed)
    g = _differentiable(_log_decay(decay, H), H)

    @jax.jit
    def both(q, k, v, g, s0, do, dsT):
        def kern(q, k, v, g, s0):
            return kernel_attention(q, k, v, g, initial_state=s0, return_final_state=True, **kw)

        def ref(q, k, v, g, s0):
            return lightning_attention_reference(
                q, k, v, g, initial_state=s0, return_final_state=True
            )

        return _vjp(kern, q, k, v, g, s0, do, dsT), _vjp(ref, q, k, v, g, s0, do, dsT)

    (o, sT, grads), (o_r, sT_r, grads_r) = both(q, k, v, g, s0, do, dsT)
    ratio = F32_RATIO if dtype == jnp.float32 else BF16_RATIO
    assert o.dtype == dtype and sT.dtype == jnp.float32
    assert_close("o", o_r, o, ratio)
    assert_close("final state", sT_r, sT, ratio)
    for name, ref, got in zip(GRAD_NAMES, grads_r, grads, strict=True):
        assert got.dtype == ref.dtype
        assert_close(name, ref, got, ratio)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "B,T,H,K,V,decay,dtype,kw",
    [
        (2, 37, 2, 64, 64, "strong", jnp.float32, {"block_t": 64}),  # one partial block
        (1, 200, 2, 48, 96, "tnl", jnp.float32, {"block_t": 64}),  # padded K, V; 4 blocks
        (1, 1, 2, 64, 64, "none", jnp.float32, {"block_t": 64}),  # a single token
        (1, 200, 2, 128, 128, "tnl", jnp.bfloat16, {"block_t": 64}),
        # 2 blocks of 2 chunks (the table's chunk is 128) and 2 V tiles (float32 partials)
        (1, 300, 2, 64, 256, "tnl", jnp.float32, {"block_t": 256, "block_v": 128}),
        # the default block sizes; K, V 192 (the GPU kernel pads K on to 256, and tiles V)
        (2, 130, 2, 192, 192, "strong", jnp.bfloat16, {}),
        (1, 1, 2, 96, 48, "tnl", jnp.bfloat16, {}),
    ],
)
def test_kernel_matches_reference(B, T, H, K, V, decay, dtype, kw, backend):
    _check(B, T, H, K, V, decay, dtype, **kw, **_backend_kw(backend))


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("decay", ["none", "strong", "tnl"])
def test_kernel_matches_reference_long(decay, dtype, backend):
    _check(2, 1000, 4, 128, 128, decay, dtype, seed=1, **_backend_kw(backend))


def test_no_races_or_uninitialized_reads():
    """The TPU interpreter, with two simulated TensorCores sharing the "parallel" axes, finds
    no data race; uninitialized scratch reads as NaN, so reading the state before it is set
    would fail the comparison."""
    interpret_pallas_call = importlib.import_module(
        "jax._src.pallas.mosaic.interpret.interpret_pallas_call"
    )
    params = pltpu.InterpretParams(
        detect_races=True, uninitialized_memory="nan", num_cores_or_threads=2
    )
    _check(2, 100, 2, 64, 64, "tnl", jnp.float32, block_t=64, interpret=params)
    assert interpret_pallas_call.races is not None
    assert not interpret_pallas_call.races.races_found


def test_gpu_backend_takes_tpu_interpret_params():
    """backend="gpu" with a `pltpu.InterpretParams` (the TPU interpreter's, which failed on an
    assertion when handed the Triton kernel) interprets the GPU kernel."""
    assert gpu_available()
    _check(1, 40, 2, 64, 64, "tnl", jnp.float32, backend="gpu", interpret=pltpu.InterpretParams())


def test_block_size_table():
    assert tpu.default_block_sizes("TPU v5 lite") == tpu.BLOCK_SIZES["v5e"]
    assert tpu.default_block_sizes("TPU v6 lite") == tpu.BLOCK_SIZES["v6e"]
    assert tpu.default_block_sizes("TPU v5") == tpu.BLOCK_SIZES["v5p"]
    assert tpu.default_block_sizes("cpu") == tpu.DEFAULT_BLOCK_SIZES
    for block_t, chunk in tpu.BLOCK_SIZES.values():
        assert block_t % chunk == 0 and chunk % 128 == 0


def test_ops_pallas_and_auto():
    """jaxllm.ops: impl="pallas" runs the kernel (interpreted here) and matches the reference;
    impl="auto" lowered for the CPU is exactly the XLA chunked form."""
    B, T, H, K, V = 1, 70, 2, 32, 16
    q, k, v, s0, do, dsT = _inputs(B, T, H, K, V, jnp.float32)
    g = _log_decay("tnl", H)

    def run(impl):
        def fn(q, k, v, g, s0):
            return lightning_attention(
                q, k, v, g, initial_state=s0, return_final_state=True, impl=impl
            )

        return jax.jit(lambda *a: _vjp(fn, *a))(q, k, v, g, s0, do, dsT)

    ref, pallas, auto, xla = (run(i) for i in ("reference", "pallas", "auto", "xla"))
    jax.tree.map(lambda r, p: assert_close("impl=pallas", r, p, F32_RATIO), ref, pallas)
    jax.tree.map(
        lambda a, x: np.testing.assert_array_equal(np.asarray(a), np.asarray(x)), auto, xla
    )


def test_log_decay_gradient_matches_finite_differences():
    """The decay is differentiable through the kernel (it used to be a constant with a zero
    gradient): along a random direction of log λ, the kernel's derivative of a loss on o and
    the final state equals a central difference of the packed reference in float64."""
    B, T, H, K, V = 2, 45, 2, 8, 8
    q, k, v, s0, do, dsT = _inputs(B, T, H, K, V, jnp.float32, seed=3)
    seg = jnp.asarray(np.stack([_segments(T, [11, 30], 4), _segments(T, [44], 0)]))
    g = _log_decay("tnl", H)
    direction = np.array([0.6, -0.8])

    def loss(g):
        o, sT = kernel_attention(
            q, k, v, g, initial_state=s0, return_final_state=True, segment_ids=seg, block_t=64
        )
        return jnp.sum(o * do) + jnp.sum(sT * dsT)

    dg = np.asarray(jax.jit(jax.grad(loss))(g), np.float64)
    assert np.all(dg != 0)
    eps = 1e-4
    with jax.enable_x64(True):
        x = [jnp.asarray(a, jnp.float64) for a in (q, k, v, s0, do, dsT, g, direction)]

        def loss64(g):
            o, sT = lightning_attention_packed_reference(
                *x[:3], g, seg, initial_state=x[3], return_final_state=True
            )
            return jnp.sum(o * x[4]) + jnp.sum(sT * x[5])

        fd = (loss64(x[6] + eps * x[7]) - loss64(x[6] - eps * x[7])) / (2 * eps)
    np.testing.assert_allclose(dg @ direction, float(fd), rtol=1e-4)


def test_bad_arguments():
    q, k, v, *_ = _inputs(1, 8, 2, 64, 64, jnp.float32)
    with pytest.raises(ValueError, match="backend"):
        kernel_attention(q, k, v, backend="rocm")
    with pytest.raises(ValueError, match="log_decay_H"):
        kernel_attention(q, k, v, jnp.zeros((3,)))
    with pytest.raises(ValueError, match="initial_state"):
        kernel_attention(q, k, v, initial_state=jnp.zeros((1, 2, 64, 32)))


def test_blocks_must_divide_the_arrays():
    """A block_v that does not divide V (here 192, K and V padded to multiples of 64) used to
    leave the last columns of o unwritten (NaN in interpret mode, garbage on a chip)."""
    q, k, v, *_ = _inputs(1, 64, 2, 64, 192, jnp.float32)
    with pytest.raises(ValueError, match="must divide"):
        kernel_attention(q, k, v, block_t=64, block_v=128)
    x = jnp.zeros((1, 2, 96, 128), jnp.float32)
    s = jnp.zeros((1, 2, 128, 128), jnp.float32)
    g = jnp.zeros((2,), jnp.float32)
    with pytest.raises(ValueError, match="must divide"):
        tpu.forward(x, x, x, g, s, seq_len=96, block_t=64, block_v=128, interpret=True)
    with pytest.raises(ValueError, match="seq_len"):
        tpu.backward(x, x, x, g, s, x, s, seq_len=97, block_t=32, block_v=128, interpret=True)


# Packed documents (segment_ids): the kernel's resets against
# `lightning_attention_packed_reference`, the token-by-token recurrence.


def _segments(T, starts, pad=0):
    """One row of ids: a new document at each position in `starts`, then `pad` tokens of id 0
    (ids 1 1 2 2 0 0: the padding is one more document)."""
    ids = np.ones(T, np.int32)
    for i, s in enumerate(sorted(starts)):
        ids[s:] = i + 2
    if pad:
        ids[T - pad :] = 0
    return ids


def _check_packed(segment_ids, H, K, V, decay, dtype, seed=0, **kw):
    B, T = segment_ids.shape
    q, k, v, s0, do, dsT = _inputs(B, T, H, K, V, dtype, seed)
    g = _differentiable(_log_decay(decay, H), H)
    seg = jnp.asarray(segment_ids)

    @jax.jit
    def both(q, k, v, g, s0, do, dsT):
        def kern(q, k, v, g, s0):
            return kernel_attention(
                q, k, v, g, initial_state=s0, return_final_state=True, segment_ids=seg, **kw
            )

        def ref(q, k, v, g, s0):
            return lightning_attention_packed_reference(
                q, k, v, g, seg, initial_state=s0, return_final_state=True
            )

        return _vjp(kern, q, k, v, g, s0, do, dsT), _vjp(ref, q, k, v, g, s0, do, dsT)

    (o, sT, grads), (o_r, sT_r, grads_r) = both(q, k, v, g, s0, do, dsT)
    ratio = F32_RATIO if dtype == jnp.float32 else BF16_RATIO
    assert o.dtype == dtype and sT.dtype == jnp.float32
    assert_close("o", o_r, o, ratio)
    assert_close("final state", sT_r, sT, ratio)
    for name, ref, got in zip(GRAD_NAMES, grads_r, grads, strict=True):
        assert_close(name, ref, got, ratio)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "rows,H,K,V,decay,dtype,kw",
    [
        # block_t 64 (= the chunk): resets exactly at the block boundaries 64 and 128, a
        # document over three blocks (row 1), trailing padding ids, a partial last block
        ([(150, [64, 100], 10), (150, [5, 128], 0)], 2, 64, 64, "tnl", jnp.float32,
         {"block_t": 64}),
        # odd T: rows like 1 1 2 2 0 0, a reset at the very last token, padded K and V
        ([(37, [9], 5), (37, [36], 0)], 2, 48, 96, "strong", jnp.float32, {"block_t": 64}),
        ([(150, [64, 100], 10), (150, [1, 2, 3, 140], 0)], 2, 128, 128, "tnl", jnp.bfloat16,
         {"block_t": 64}),
        # 2 chunks per block on TPU (reset at the chunk boundary 128 inside block 0, and at
        # the block boundary 256), 2 V tiles (float32 partials)
        ([(300, [128, 256], 20), (300, [200], 0)], 2, 64, 256, "tnl", jnp.float32,
         {"block_t": 256, "block_v": 128}),
        # the default block sizes (GPU: 32 tokens here), K, V 192; every token a document
        ([(70, range(1, 70), 0), (70, [31, 32, 64], 3)], 2, 192, 192, "strong", jnp.bfloat16,
         {}),
    ],
)  # fmt: skip
def test_packed_kernel_matches_reference(rows, H, K, V, decay, dtype, kw, backend):
    segment_ids = np.stack([_segments(T, starts, pad) for T, starts, pad in rows])
    _check_packed(segment_ids, H, K, V, decay, dtype, **kw, **_backend_kw(backend))


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("decay", ["none", "strong", "tnl"])
def test_packed_kernel_matches_reference_random_layouts(decay, dtype, backend):
    """Random documents (lengths 1 to 300) over 1000 tokens, the table's chunk of 128."""
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(3):
        starts = np.cumsum(rng.integers(1, 300, size=20))
        rows.append(_segments(1000, starts[starts < 1000], pad=int(rng.integers(0, 40))))
    kw = _backend_kw(backend)
    _check_packed(np.stack(rows), 2, 128, 128, decay, dtype, seed=1, block_t=256, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_kernel_one_document_is_the_unpacked_kernel(backend):
    """Constant ids: no reset, the same numbers as without segment_ids."""
    B, T, H, K, V = 2, 100, 2, 64, 64
    q, k, v, s0, *_ = _inputs(B, T, H, K, V, jnp.float32)
    g = _log_decay("tnl", H)
    kw = dict(initial_state=s0, return_final_state=True, block_t=64, **_backend_kw(backend))
    packed = kernel_attention(q, k, v, g, segment_ids=jnp.full((B, T), 3), **kw)
    plain = kernel_attention(q, k, v, g, **kw)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), packed, plain)


def test_packed_kernel_no_races_or_uninitialized_reads():
    interpret_pallas_call = importlib.import_module(
        "jax._src.pallas.mosaic.interpret.interpret_pallas_call"
    )
    params = pltpu.InterpretParams(
        detect_races=True, uninitialized_memory="nan", num_cores_or_threads=2
    )
    segment_ids = np.stack([_segments(100, [30, 64], 6), _segments(100, [70], 0)])
    _check_packed(segment_ids, 2, 64, 64, "tnl", jnp.float32, block_t=64, interpret=params)
    assert interpret_pallas_call.races is not None
    assert not interpret_pallas_call.races.races_found


def test_ops_packed_pallas_and_auto():
    """jaxllm.ops.lightning_attention_packed: impl="pallas" runs the kernel (interpreted here)
    and matches the reference; impl="auto" lowered for the CPU is exactly the XLA form."""
    B, T, H, K, V = 2, 70, 2, 32, 16
    q, k, v, s0, do, dsT = _inputs(B, T, H, K, V, jnp.float32)
    g = _log_decay("tnl", H)
    seg = jnp.asarray(np.stack([_segments(T, [20, 33], 7), _segments(T, [64], 0)]))

    def run(impl):
        def fn(q, k, v, g, s0):
            return lightning_attention_packed(
                q, k, v, g, seg, initial_state=s0, return_final_state=True, impl=impl
            )

        return jax.jit(lambda *a: _vjp(fn, *a))(q, k, v, g, s0, do, dsT)

    ref, pallas, auto, xla = (run(i) for i in ("reference", "pallas", "auto", "xla"))
    jax.tree.map(lambda r, p: assert_close("impl=pallas", r, p, F32_RATIO), ref, pallas)
    jax.tree.map(
        lambda a, x: np.testing.assert_array_equal(np.asarray(a), np.asarray(x)), auto, xla
    )


def test_packed_bad_arguments():
    q, k, v, *_ = _inputs(1, 8, 2, 64, 64, jnp.float32)
    with pytest.raises(ValueError, match="segment_ids"):
        kernel_attention(q, k, v, segment_ids=jnp.zeros((1, 7), jnp.int32))


# The decay gradient's extra work in the reverse sweeps (decay_grad=True) must get through the
# real lowerings too, which interpret mode does not exercise: Mosaic for TPU (ahead of time,
# needs libtpu) and Pallas → Triton IR for CUDA (no GPU needed).


@pytest.mark.tpu_aot
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("topology", ["v5e:2x2", "v6e:2x2"])
def test_decay_gradient_compiles_for_tpu(topology, packed):
    aot = importlib.import_module("jaxllm.compile")
    if not aot.tpu_available():
        pytest.skip("needs libtpu (pip install .[tpu])")
    from tests.kernels_pallas.test_lightning_aot import MOSAIC, _abstract, _device

    device = _device(topology)
    block_t, chunk = tpu.default_block_sizes(device.device_kind)
    B, H, T, K = 2, 4, 2048, 128
    kw = dict(seq_len=T - 3, block_t=block_t, block_v=K, chunk=chunk, decay_grad=True)

    def bwd(x, g, s, run):
        return tpu.backward(x, x, x, g, s, x, s, run_BT=run, **kw)

    args = (jax.ShapeDtypeStruct((B, H, T, K), jnp.bfloat16),
            jax.ShapeDtypeStruct((H,), jnp.float32),
            jax.ShapeDtypeStruct((B, H, K, K), jnp.float32),
            jax.ShapeDtypeStruct((B, T), jnp.int32) if packed else None)  # fmt: skip
    hlo = jax.jit(bwd).trace(*_abstract(args, device)).lower().compile().as_text()
    assert hlo.count(MOSAIC) == 2


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decay_gradient_lowers_for_cuda(dtype, packed):
    gpu = importlib.import_module("kernels_pallas.lightning_attention.gpu")
    B, H, T, K, V = 2, 2, 256, 128, 128
    x = jax.ShapeDtypeStruct((B, H, T, K), dtype)
    s = jax.ShapeDtypeStruct((B, H, K, V), jnp.float32)
    g = jax.ShapeDtypeStruct((H,), jnp.float32)
    run = jax.ShapeDtypeStruct((B, T), jnp.int32) if packed else None

    def bwd(x, g, s, run):
        return gpu.backward(x, x, x, g, s, x, s, run_BT=run, seq_len=T - 5, block_t=64,
                            block_v=64, decay_grad=True)  # fmt: skip

    with cuda_lowering():
        text = jax.jit(bwd).trace(x, g, s, run).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 2
