"""The gated linear attention Pallas kernels through their entry point, in interpret mode on
the CPU (the TPU kernel, and the GPU one with backend="gpu"), against
`gated_linear_attention_reference`: output, final state and the gradients of q, k, v, the log
gates and the initial state, with random cotangents on the output and the final state (fla's
loss), gates of three strengths (fla's logsigmoid(randn) / normalizer), odd lengths and head
dims, several grid blocks and V tiles, and packed documents.

Tolerances as fla's `assert_close` for GLA: RMS ratio 1e-5 in float32 (5e-5 for the gates'
gradient, a reverse cumulative sum of terms that cancel: with strong gates it is small against
them, 1.3e-5 measured; fla's float32 test allows it an absolute 2e-4); 5e-3 with bfloat16
inputs against the float32 reference given the same inputs. Interpret mode cannot see what
only a real lowering rejects: the Triton lowering runs here too (`test_lowers_for_cuda`), the
Mosaic one in test_gla_aot.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.ops.gated_linear_attention import gated_linear_attention_reference
from kernels_pallas.gated_linear_attention import gated_linear_attention, gpu_available
from tests.helpers import assert_close, cuda_lowering

RATIO = {"float32": 1e-5, "bfloat16": 5e-3}
DG_RATIO = {"float32": 5e-5, "bfloat16": 5e-3}
NAMES = ("o", "final state", "dq", "dk", "dv", "dg", "dh0")


def _inputs(B, T, H, K, V, dtype, normalizer, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 7)
    q = (jax.random.normal(keys[0], (B, T, H, K)) / np.sqrt(K)).astype(dtype)
    k = (jax.random.normal(keys[1], (B, T, H, K)) / np.sqrt(K)).astype(dtype)
    v = jax.random.normal(keys[2], (B, T, H, V)).astype(dtype)
    g = jax.nn.log_sigmoid(jax.random.normal(keys[3], (B, T, H, K))) / normalizer
    h0 = jax.random.normal(keys[4], (B, H, K, V))
    do = jax.random.normal(keys[5], (B, T, H, V)).astype(dtype)
    dhT = jax.random.normal(keys[6], (B, H, K, V))
    return (q, k, v, g, h0), (do, dhT)


def _segments(B, T, cuts):
    """[B, T] document ids: row 0 cut at `cuts`, the others one document."""
    ids = np.zeros((B, T), np.int32)
    for cut in cuts:
        ids[0, cut:] += 1
    return jnp.asarray(ids)


def _value_and_grads(fn, primals, cotangents):
    (o, hT), vjp = jax.vjp(lambda *x: fn(*x), *primals)
    return (o, hT, *vjp(cotangents))


# (backend, dtype, B, T, H, K, V, gate normalizer, document cuts of row 0, kernel kwargs):
# normalizer 0.1 makes gates of ≈ −7 per token, whose sums over a 16-token sub-chunk
# overflow exp in float32 unless every factor is formed as exp(≤ 0).
# Both kernels run chunk.py's math: the slow cases repeat a feature on the other backend.
CASES = [
    ("tpu", "float32", 2, 100, 2, 60, 48, 1.0, (), {}),
    ("tpu", "float32", 1, 130, 2, 32, 256, 10.0, (), dict(block_t=64, block_v=128)),
    ("tpu", "float32", 2, 150, 1, 64, 64, 0.1, (1, 40, 41, 100), dict(block_t=64)),
    pytest.param("gpu", "float32", 2, 100, 2, 32, 48, 0.1, (), {}, marks=pytest.mark.slow),
    ("gpu", "float32", 2, 130, 1, 64, 128, 1.0, (30, 64, 65), dict(block_v=32)),
    pytest.param("tpu", "bfloat16", 2, 200, 2, 64, 64, 1.0, (70,), {}, marks=pytest.mark.slow),
    ("gpu", "bfloat16", 2, 200, 2, 64, 64, 1.0, (), {}),
]


@pytest.mark.parametrize(
    "backend,dtype,B,T,H,K,V,normalizer,cuts,kw", CASES, ids=lambda x: str(x).replace(" ", "")
)
def test_matches_reference(backend, dtype, B, T, H, K, V, normalizer, cuts, kw):
    if backend == "gpu":
        # Without the GPU module the entry point would quietly interpret the TPU kernel.
        assert gpu_available()
        kw = dict(kw, backend="gpu", interpret=True)
    primals, cotangents = _inputs(B, T, H, K, V, jnp.dtype(dtype), normalizer)
    seg = _segments(B, T, cuts) if cuts else None

    def kernel(q, k, v, g, h0):
        return gated_linear_attention(
            q, k, v, g, initial_state=h0, return_final_state=True, segment_ids=seg, **kw
        )

    def reference(q, k, v, g, h0):
        return gated_linear_attention_reference(
            q, k, v, g, initial_state=h0, return_final_state=True, segment_ids_BT=seg
        )

    got = _value_and_grads(jax.jit(kernel), primals, cotangents)
    want = _value_and_grads(jax.jit(reference), primals, cotangents)
    for name, w, x in zip(NAMES, want, got, strict=True):
        assert x.dtype == w.dtype, name
        assert_close(name, w, x, (DG_RATIO if name == "dg" else RATIO)[dtype])


def test_document_starts_get_no_gate_gradient():
    """A document's first gate decays a state that the reset discards: its gradient is exactly
    zero, as the reference's."""
    (q, k, v, g, h0), (do, dhT) = _inputs(1, 90, 1, 64, 64, jnp.float32, 1.0)
    seg = _segments(1, 90, (17, 64))

    def loss(g):
        o, hT = gated_linear_attention(
            q, k, v, g, initial_state=h0, return_final_state=True, segment_ids=seg
        )
        return jnp.sum(o * do) + jnp.sum(hT * dhT)

    dg = jax.grad(loss)(g)
    assert np.all(np.asarray(dg[0, [17, 64]]) == 0.0)
    assert np.all(np.abs(np.asarray(dg[0, [16, 18, 63, 65]])) > 0.0)


@pytest.mark.parametrize("packed", [False, True])
def test_lowers_for_cuda(packed):
    """Differentiated and lowered for CUDA (Pallas → Triton IR, on this CPU): the forward, dq
    and dk/dv kernels, and no interpret-mode loop beside them."""
    x = jax.ShapeDtypeStruct((2, 200, 2, 128), jnp.bfloat16)
    g = jax.ShapeDtypeStruct((2, 200, 2, 128), jnp.float32)
    seg = jax.ShapeDtypeStruct((2, 200), jnp.int32) if packed else None

    def loss(q, g, seg):
        o = gated_linear_attention(q, q, q, g, segment_ids=seg, backend="gpu")
        return jnp.sum(o.astype(jnp.float32) ** 2)  # sum(o) would need no forward kernel

    with cuda_lowering():
        text = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(x, g, seg)
        text = text.lower(lowering_platforms=("cuda",)).as_text()
    for name in ("fwd", "bwd_dq", "bwd_dkdv"):
        assert text.count(f"gated_linear_attention_{name}") >= 1, name
    assert "while" not in text


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True])
def test_triton_kernel_on_gpu(packed):
    """On a GPU: the compiled Triton kernels (the default dispatch) against the reference at
    the HGRN2 head size, bfloat16 tolerance."""
    B, T, H, K = 2, 1000, 4, 128
    primals, cotangents = _inputs(B, T, H, K, K, jnp.bfloat16, 1.0)
    seg = _segments(B, T, (300, 301, 777)) if packed else None

    def kernel(*x):
        kw = dict(initial_state=x[4], return_final_state=True, segment_ids=seg)
        return gated_linear_attention(*x[:4], **kw)

    def reference(*x):
        kw = dict(initial_state=x[4], return_final_state=True, segment_ids_BT=seg)
        return gated_linear_attention_reference(*x[:4], **kw)

    got = _value_and_grads(jax.jit(kernel), primals, cotangents)
    want = _value_and_grads(jax.jit(reference), primals, cotangents)
    for name, w, x in zip(NAMES, want, got, strict=True):
        assert_close(name, w, x, RATIO["bfloat16"])
