"""`attention(impl="auto")` chooses by the platform it is lowered for, not the host's.

From this CPU host: lowered for TPU, the packed GQA training step is the splash kernel (a
Mosaic call for the forward, the dq and the dk/dv sweeps), compiled (`tpu_aot`) it holds no
[T, S] buffer; the cache path (absolute positions) keeps the XLA form there. Lowered for
CUDA, packed rows take the Triton flash kernel (`kernels_pallas.flash_attention`; no cuDNN on
this host to check the plain rows' cuDNN call, whose trace would raise here: with the CUDA
plugin, tests/kernels_pallas/test_gpu_aot.py compiles both for an H200). With libtpu
(`tpu_aot`): a llama train step compiled for v5p, splash against impl="xla". On a GPU (`gpu`):
the cuDNN call or the flash kernel is in the program and agrees with the reference.
"""

import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from jaxllm import compile as aot
from jaxllm.ops.attention import attention, attention_blocked, attention_reference
from jaxllm.parallel.core.mesh import make_mesh
from jaxllm.parallel.core.rules import use_rules
from jaxllm.parallel.sequence import attention_sp
from tests.helpers import assert_close, cuda_lowering, tiny

MOSAIC = "tpu_custom_call"
B, T, H, G, K = 2, 384, 4, 2, 128


def _abstract(dtype=jnp.bfloat16, t=T, kd=K):
    sds = jax.ShapeDtypeStruct
    return sds((B, t, H, kd), dtype), sds((B, t, G, kd), dtype), sds((B, t, G, kd), dtype)


def _train_text(platform, **kw):
    def loss(q, k, v, seg):
        return jnp.sum(attention(q, k, v, segment_ids_BT=seg, **kw).astype(jnp.float32) ** 2)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    seg = jax.ShapeDtypeStruct((B, T), jnp.int32)
    return grad.trace(*_abstract(), seg).lower(lowering_platforms=(platform,)).as_text()


def _scores(text, t=T, s=T):
    """Tensors in the StableHLO text with a trailing [t, s] (scores, probabilities, masks)."""
    return re.findall(rf"tensor<(?:\d+x)*{t}x{s}x\w+>", text)


def test_auto_lowers_to_splash_for_tpu():
    text = _train_text("tpu")
    assert text.count(f"stablehlo.custom_call @{MOSAIC}") == 3
    xla = _train_text("tpu", impl="xla")
    assert MOSAIC not in xla and any("xf32>" in x for x in _scores(xla))


@pytest.mark.tpu_aot
@pytest.mark.skipif(not aot.tpu_available(), reason="needs libtpu (pip install .[tpu])")
@pytest.mark.parametrize("kd", [64, 80, 128])
def test_compiled_for_tpu_holds_no_scores(kd):
    """Compiled for a v5p chip, the packed GQA gradient holds no buffer of T×T elements. The
    StableHLO above still types the cond's slots for the XLA branch's residuals, which the
    splash branch fills with zeros; XLA drops them with the branch not taken. (At this small
    T the temporaries are not smaller than XLA's, 5.8 vs 5.0 MB at K=64: the train step
    below compares them at a real length.)"""
    sharding = SingleDeviceSharding(aot.topology_devices(aot.parse_topology("v5p:2x2x1"))[0])
    args = [*_abstract(kd=kd), jax.ShapeDtypeStruct((B, T), jnp.int32)]
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding) for a in args]
    hlo = {}
    for impl in ("auto", "xla"):

        def loss(q, k, v, seg, impl=impl):
            o = attention(q, k, v, segment_ids_BT=seg, impl=impl)
            return jnp.sum(o.astype(jnp.float32) ** 2)

        hlo[impl] = (
            jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*args).lower().compile().as_text()
        )
    square = rf"\w+\[(?:\d+,)*{T},{T}\]"
    assert hlo["auto"].count(f'custom_call_target="{MOSAIC}"') == 3
    assert not re.search(square, hlo["auto"]) and re.search(square, hlo["xla"])


def test_cache_positions_keep_the_xla_form_on_tpu():
    """A prefill of 2 tokens at positions 5, 6 against 384 slots: the [T, S] row is small."""
    _, k, v = _abstract()
    q = jax.ShapeDtypeStruct((B, 2, H, K), jnp.bfloat16)

    def prefill(q, k, v):
        qp, kp = (5 + jnp.arange(2))[None], jnp.arange(T)[None]
        return attention(q, k, v, q_positions_BT=qp, kv_positions_BS=kp)

    text = jax.jit(prefill).trace(q, k, v).lower(lowering_platforms=("tpu",)).as_text()
    assert MOSAIC not in text and _scores(text, 2, T)


def test_cuda_lowering_of_packed_rows_is_the_flash_kernel():
    """Packed bf16 rows lowered for CUDA (cuDNN or not): the Triton flash kernel (forward, dq,
    dk/dv); in float32 the blocked XLA form, 128 query rows at a time. (The StableHLO still
    types the cond's slots for the default branch's residuals; compiled for an H200,
    test_gpu_aot.py, no [T, S] float32 buffer is left.)"""
    with cuda_lowering():
        text = _train_text("cuda")
    assert "cudnn" not in text and MOSAIC not in text
    assert text.count("stablehlo.custom_call @__gpu$xla.gpu.triton") == 3

    def loss(q, k, v, seg):
        return jnp.sum(attention(q, k, v, segment_ids_BT=seg) ** 2)

    seg = jax.ShapeDtypeStruct((B, T), jnp.int32)
    with cuda_lowering():
        text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*_abstract(jnp.float32), seg)
        text = text.lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" not in text and any("xf32>" in x for x in _scores(text, 128, T))


def test_blocked_branch_compiles_without_scores():
    """What XLA makes of a platform_dependent whose taken branch is the blocked form: the
    cond's slots for the other branch's [T, S] residuals are gone once compiled. The CPU
    stands in for CUDA, which this host cannot compile for; the same holds for splash on TPU
    (test_compiled_for_tpu_holds_no_scores)."""
    q, k, v = (jnp.zeros(x.shape, jnp.float32) for x in _abstract())
    seg = jnp.zeros((B, T), jnp.int32)
    kw = {"causal": True, "scale": None, "segment_ids_BT": seg}
    blocked = lambda q, k, v: attention_blocked(q, k, v, block=128, **kw)
    xla = lambda q, k, v: attention(q, k, v, segment_ids_BT=seg, impl="xla")

    def loss(q, k, v):
        return jnp.sum(jax.lax.platform_dependent(q, k, v, cpu=blocked, default=xla) ** 2)

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile().as_text()
    assert not re.search(rf"\w+\[(?:\d+,)*{T},{T}\]", hlo)
    assert re.search(rf"f32\[(?:\d+,)*128,{T}\]", hlo)


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True])
def test_cudnn_on_gpu(packed):
    """On a GPU: plain causal GQA rows take cuDNN (its fused call in the program), packed rows
    the Triton flash kernel; both agree with the reference (outputs, gradients) at bf16
    tolerance."""
    ks = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(kk, x.shape, x.dtype) for kk, x in zip(ks, _abstract()))
    seg = jnp.asarray(jnp.arange(T)[None] >= jnp.array([[100], [7]]), jnp.int32)
    kw = {"segment_ids_BT": seg} if packed else {}

    def loss(impl):
        fn = attention if impl == "auto" else attention_reference
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, **kw).astype(jnp.float32)))

    text = jax.jit(jax.grad(loss("auto"), (0, 1, 2))).lower(q, k, v).as_text()
    assert ("__cudnn$fmha" in text) != packed
    assert ("__gpu$xla.gpu.triton" in text) == packed
    assert_close("o", attention_reference(q, k, v, **kw), jax.jit(attention)(q, k, v, **kw),
                 5e-3)  # fmt: skip
    got = jax.jit(jax.grad(loss("auto"), (0, 1, 2)))(q, k, v)
    want = jax.grad(loss("reference"), (0, 1, 2))(q, k, v)
    for name, a, w in zip("qkv", got, want):
        assert_close(f"d{name}", w, a, 5e-3)


@pytest.mark.tpu_aot
@pytest.mark.skipif(not aot.tpu_available(), reason="needs libtpu (pip install .[tpu])")
def test_splash_on_a_data_tensor_mesh_runs_per_device():
    """Under `use_rules` on data 2 × tensor 2 the kernel runs in a shard_map: each Mosaic call
    sees its device's 2 of 4 rows and 2 of 4 heads; nothing is gathered."""
    mesh = make_mesh({"data": 2, "tensor": 2},
                     devices=aot.topology_devices(aot.parse_topology("v5e:2x2")))  # fmt: skip
    b, t = 4, 512

    def sds(shape, spec, dtype=jnp.bfloat16):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

    x = P("data", None, "tensor")
    args = (sds((b, t, H, K), x), sds((b, t, G, K), x), sds((b, t, G, K), x),
            sds((b, t), P("data"), jnp.int32))  # fmt: skip

    def loss(q, k, v, seg):
        return jnp.sum(attention(q, k, v, segment_ids_BT=seg).astype(jnp.float32) ** 2)

    with use_rules(mesh):
        hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*args).lower().compile().as_text()
    calls = [line for line in hlo.splitlines() if f'custom_call_target="{MOSAIC}"' in line]
    assert len(calls) == 3
    assert all(f"bf16[{b // 2},{H // 2},{t},{K}]" in line for line in calls), calls
    assert "all-gather" not in hlo


@pytest.mark.tpu_aot
@pytest.mark.skipif(not aot.tpu_available(), reason="needs libtpu (pip install .[tpu])")
@pytest.mark.parametrize(("impl", "calls"), [("ulysses", 3), ("allgather", 0)])
def test_sequence_parallel_softmax_on_tpu(impl, calls):
    """Sequence parallelism over 4 chips: Ulysses attends whole rows per device, so splash;
    the all-gather form attends local queries at absolute positions, so the XLA form."""
    mesh = make_mesh({"data": 1, "sequence": 4},
                     devices=aot.topology_devices(aot.parse_topology("v5e:2x2")))  # fmt: skip
    t, g = 512, H  # Ulysses splits kv heads too: G = H keeps them unrepeated

    def sds(shape, dtype=jnp.bfloat16):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P(None, "sequence")))

    def loss(q, k, v, seg):
        o = attention_sp(q, k, v, mesh=mesh, impl=impl, segment_ids_BT=seg)
        return jnp.sum(o.astype(jnp.float32) ** 2)

    args = (sds((B, t, H, K)), sds((B, t, g, K)), sds((B, t, g, K)), sds((B, t), jnp.int32))
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*args).lower().compile().as_text()
    assert hlo.count(f'custom_call_target="{MOSAIC}"') == calls


@pytest.mark.slow  # two train-step compiles: ~80 s on 2 shared cores
@pytest.mark.tpu_aot
@pytest.mark.skipif(not aot.tpu_available(), reason="needs libtpu (pip install .[tpu])")
def test_llama_train_step_on_v5p_uses_splash():
    """A 2-layer llama-style step (head dim 128, GQA 2:1, bf16, packed batches of 1024 tokens)
    compiled for v5p:2x2x1: every layer's attention is the splash kernel (3 Mosaic calls),
    no f32 buffer of T×T elements is in the program, and XLA's temporaries are smaller than
    with impl="xla" (20.1 MB vs 36.7 MB when written)."""
    t = 1024
    temp, hlo = {}, {}
    for impl in ("auto", "xla"):
        cfg = tiny("model.d_model=256", "model.n_heads=2", "model.n_kv_heads=1",
                   "model.head_dim=128", f"model.max_seq_len={t}", f"data.seq_len={t}",
                   "model.dtype=bfloat16", f"model.mixers.softmax.impl={impl}")  # fmt: skip
        lowered, _ = aot.lower_train_step(cfg, aot.parse_topology("v5p:2x2x1"))
        compiled = lowered.compile()
        temp[impl] = compiled.memory_analysis().temp_size_in_bytes
        hlo[impl] = compiled.as_text()
    assert hlo["auto"].count(f'custom_call_target="{MOSAIC}"') == 3 * cfg.model.n_layers
    square = rf"f32\[(?:\d+,)*{t},{t}\]"
    assert not re.search(square, hlo["auto"]) and re.search(square, hlo["xla"])
    assert temp["auto"] < 0.7 * temp["xla"], temp
