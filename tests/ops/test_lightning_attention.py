"""Lightning attention: the chunked form, the scan and the decode step against the quadratic form.

Tolerance policy (fla's `assert_close`): a result passes when max|Δ| ≤ 1e-6, or else when
RMS(Δ)/RMS(ref) ≤ ratio. float32: ratio 1e-5 for outputs, states and every gradient.
bfloat16 inputs: ratio 5e-3 (fla's) against the reference given the same bfloat16 inputs (both
compute in float32 and round o to bfloat16, so o's cotangent is rounded alike). Never loosen
these to make a test pass.
"""

import functools
import importlib

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.ops.lightning_attention import (
    lightning_attention,
    lightning_attention_recurrent,
    lightning_attention_reference,
    lightning_attention_step,
)
from tests.helpers import assert_close

# The module itself (the package's attribute of this name is the function).
la_module = importlib.import_module("jaxllm.ops.lightning_attention")

F32_RATIO = 1e-5
BF16_RATIO = 5e-3

# Jitted once here: run eagerly, every primitive would compile on its own for each new shape.
_STATIC = ("return_final_state", "chunk_size", "impl")
attention = jax.jit(lightning_attention, static_argnames=_STATIC)
reference = jax.jit(lightning_attention_reference, static_argnames=_STATIC[:1])
recurrent = jax.jit(lightning_attention_recurrent, static_argnames=_STATIC[:1])


def _log_decay(kind, H):
    """Per-head log λ: weak (λ≈0.999), strong (λ≈0.5), TNL's slopes, or none (λ=1)."""
    if kind == "weak":
        return jnp.full((H,), np.log(0.999), jnp.float32)
    if kind == "strong":
        return jnp.full((H,), np.log(0.5), jnp.float32)
    if kind == "tnl":
        return -(2.0 ** (-8.0 * (np.arange(H) + 1) / H)).astype(np.float32)
    assert kind == "none"
    return jnp.zeros((H,), jnp.float32)


def _inputs(B, T, H, K, V, decay, dtype=jnp.float32, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 6)
    q = jax.random.normal(keys[0], (B, T, H, K)).astype(dtype)
    k = jax.random.normal(keys[1], (B, T, H, K)).astype(dtype)
    v = jax.random.normal(keys[2], (B, T, H, V)).astype(dtype)
    S0 = jax.random.normal(keys[3], (B, H, K, V))
    do = jax.random.normal(keys[4], (B, T, H, V))
    dS = jax.random.normal(keys[5], (B, H, K, V))
    return q, k, v, _log_decay(decay, H), S0, do, dS


@functools.partial(jax.jit, static_argnames=("impl", "chunk_size", "segment_tokens"))
def _outputs_and_grads(q, k, v, g, S0, do, dS, impl, chunk_size=None, segment_tokens=None):
    """o, final state, and the grads of Σ o·do + Σ S·dS w.r.t. (q, k, v, log_decay, S0).

    segment_tokens, when given, overrides the module's segment length while this traces (it
    is a static argument, so each value gets its own compiled function).
    """
    fn = functools.partial(lightning_attention, impl=impl, chunk_size=chunk_size)

    def loss(q, k, v, g, S0):
        o, S = fn(q, k, v, g, initial_state=S0, return_final_state=True)
        return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(S * dS), (o, S)

    default_segment = la_module.SEGMENT_TOKENS
    la_module.SEGMENT_TOKENS = segment_tokens or default_segment
    try:
        grads, (o, S) = jax.grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(q, k, v, g, S0)
    finally:
        la_module.SEGMENT_TOKENS = default_segment
    return o, S, grads


NAMES = ("o", "final state", "dq", "dk", "dv", "dlog_decay", "dS0")


# (B, T, H, K, V, chunk_size, segment_tokens, decay): T not a multiple of the chunk, several
# segments of the outer scan, weak / strong / mixed / no decay. T=1 is an example of the
# property test below.
CASES = [
    (2, 63, 2, 8, 6, 16, None, "strong"),
    (1, 500, 2, 16, 8, None, None, "weak"),
    (1, 100, 2, 8, 8, 16, 32, "tnl"),
    (1, 77, 2, 8, 4, 7, 21, "none"),
]


@pytest.mark.parametrize(("B", "T", "H", "K", "V", "chunk", "segment", "decay"), CASES)
def test_chunked_matches_reference(B, T, H, K, V, chunk, segment, decay):
    args = _inputs(B, T, H, K, V, decay)
    ref = _outputs_and_grads(*args, impl="reference")
    got = _outputs_and_grads(*args, impl="xla", chunk_size=chunk, segment_tokens=segment)
    for name, r, g in zip(NAMES, jax.tree.leaves(ref), jax.tree.leaves(got)):
        assert_close(name, r, g, F32_RATIO)


@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=["strong", "none"])
def test_pallas_matches_reference(case):
    """impl="pallas" (the kernel, interpreted here): outputs and every gradient, the log
    decay's included (the kernel used to return zero for it)."""
    B, T, H, K, V, _, _, decay = case
    args = _inputs(B, T, H, K, V, decay)
    ref = _outputs_and_grads(*args, impl="reference")
    got = _outputs_and_grads(*args, impl="pallas")
    for name, r, g in zip(NAMES, jax.tree.leaves(ref), jax.tree.leaves(got), strict=True):
        assert_close(name, r, g, F32_RATIO)


def test_chunked_bfloat16_inputs():
    args = _inputs(2, 200, 2, 16, 16, "tnl", dtype=jnp.bfloat16)
    got = _outputs_and_grads(*args, impl="xla")
    assert got[0].dtype == jnp.bfloat16 and got[2][0].dtype == jnp.bfloat16
    ref = _outputs_and_grads(*args, impl="reference")
    for name, r, x in zip(NAMES, jax.tree.leaves(ref), jax.tree.leaves(got)):
        assert_close(name, r, x, BF16_RATIO)


def test_recurrence_matches_quadratic_form():
    q, k, v, g, S0, _, _ = _inputs(2, 45, 3, 8, 5, "tnl")
    o_ref, S_ref = reference(q, k, v, g, initial_state=S0, return_final_state=True)
    o_rec, S_rec = recurrent(q, k, v, g, initial_state=S0, return_final_state=True)
    assert_close("o", o_ref, o_rec, F32_RATIO)
    assert_close("final state", S_ref, S_rec, F32_RATIO)


def test_quadratic_form_matches_definition():
    """o_t = Σ_{s≤t} λ^{t−s}(q_t·k_s) v_s + λ^{t+1} q_t S₀, written out in float64 NumPy."""
    q, k, v, g, S0, _, _ = (np.asarray(x, np.float64) for x in _inputs(1, 12, 2, 3, 2, "tnl"))
    lam = np.exp(g)
    o = np.zeros((1, 12, 2, 2))
    for t in range(12):
        for h in range(2):
            o[0, t, h] = lam[h] ** (t + 1) * q[0, t, h] @ S0[0, h]
            for s in range(t + 1):
                o[0, t, h] += lam[h] ** (t - s) * (q[0, t, h] @ k[0, s, h]) * v[0, s, h]
    got = reference(*map(jnp.asarray, (q, k, v, g)), initial_state=S0)
    assert_close("o", o, got, F32_RATIO)


def test_split_sequence_carries_state():
    q, k, v, g, S0, _, _ = _inputs(2, 90, 2, 8, 6, "tnl")
    run = functools.partial(attention, chunk_size=16, return_final_state=True)
    o_all, S_all = run(q, k, v, g, initial_state=S0)
    o_a, S_a = run(q[:, :37], k[:, :37], v[:, :37], g, initial_state=S0)
    o_b, S_b = run(q[:, 37:], k[:, 37:], v[:, 37:], g, initial_state=S_a)
    assert_close("o", o_all, jnp.concatenate([o_a, o_b], axis=1), F32_RATIO)
    assert_close("final state", S_all, S_b, F32_RATIO)


def test_decode_steps_match_parallel_form():
    q, k, v, g, S0, _, _ = _inputs(2, 40, 2, 8, 6, "tnl")
    o_par, S_par = attention(q, k, v, g, initial_state=S0, return_final_state=True)
    step = jax.jit(lightning_attention_step)
    state, outs = S0, []
    for t in range(q.shape[1]):
        o_t, state = step(q[:, t], k[:, t], v[:, t], state, g)
        outs.append(o_t)
    assert state.dtype == jnp.float32
    assert_close("o", o_par, jnp.stack(outs, axis=1), F32_RATIO)
    assert_close("final state", S_par, state, F32_RATIO)


def test_causal_by_gradient():
    """d o_t / d x_s = 0 for every s > t and x in q, k, v; and non-zero for the keys s ≤ t."""
    q, k, v, g, _, _, _ = _inputs(1, 50, 2, 4, 3, "tnl")
    t = 21

    def o_t(q, k, v):
        return attention(q, k, v, g, chunk_size=8)[:, t].sum()

    dq, dk, dv = jax.grad(o_t, argnums=(0, 1, 2))(q, k, v)
    for name, d in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert np.all(np.asarray(d[:, t + 1 :]) == 0), f"{name} leaks from the future"
    assert np.all(np.abs(np.asarray(dk[:, : t + 1])).sum(axis=(0, 2, 3)) > 0)


def test_very_strong_decay_is_finite_and_exact():
    """λ^j is never inverted, so even λ = e^-60 (λ^-32 would overflow float32) is exact."""
    q, k, v, _, S0, do, dS = _inputs(1, 70, 2, 8, 4, "none")
    g = jnp.array([-20.0, -60.0])
    ref = _outputs_and_grads(q, k, v, g, S0, do, dS, impl="reference")
    got = _outputs_and_grads(q, k, v, g, S0, do, dS, impl="xla", chunk_size=32)
    for name, r, x in zip(NAMES, jax.tree.leaves(ref), jax.tree.leaves(got)):
        assert_close(name, r, x, F32_RATIO)


def test_no_decay_is_log_decay_zero():
    q, k, v, _, S0, _, _ = _inputs(1, 33, 2, 4, 4, "none")
    zeros = jnp.zeros((2,))
    for impl in ("xla", "reference"):
        got = attention(q, k, v, None, initial_state=S0, impl=impl)
        want = attention(q, k, v, zeros, initial_state=S0, impl=impl)
        assert_close(impl, want, got, 0.0, atol=0.0)


@hypothesis.settings(max_examples=4, deadline=None, derandomize=True)
@hypothesis.example(T=1, chunk=None, log_lambda=-0.001, with_state=True)
@hypothesis.given(
    T=st.integers(1, 96),
    chunk=st.sampled_from([1, 5, 16, 64, None]),
    log_lambda=st.floats(-3.0, 0.0),
    with_state=st.booleans(),
)
def test_chunked_matches_reference_property(T, chunk, log_lambda, with_state):
    q, k, v, _, S0, _, _ = _inputs(1, T, 2, 4, 3, "none", seed=T)
    g = jnp.array([log_lambda, log_lambda / 2])
    S0 = S0 if with_state else None
    ref = reference(q, k, v, g, initial_state=S0, return_final_state=True)
    got = attention(q, k, v, g, initial_state=S0, return_final_state=True, chunk_size=chunk)
    assert_close("o", ref[0], got[0], F32_RATIO)
    assert_close("final state", ref[1], got[1], F32_RATIO)


def test_dtypes_and_return_forms():
    q, k, v, g, _, _, _ = _inputs(1, 20, 2, 4, 3, "tnl", dtype=jnp.bfloat16)
    o = attention(q, k, v, g)
    assert o.shape == (1, 20, 2, 3) and o.dtype == jnp.bfloat16
    o, S = attention(q, k, v, g, return_final_state=True, impl="reference")
    assert o.dtype == jnp.bfloat16 and S.shape == (1, 2, 4, 3) and S.dtype == jnp.float32
    auto = attention(q, k, v, g, impl="auto")
    xla = attention(q, k, v, g, impl="xla")
    assert np.array_equal(np.asarray(auto, np.float32), np.asarray(xla, np.float32))


def test_bad_arguments_are_rejected():
    q, k, v, g, _, _, _ = _inputs(1, 8, 2, 4, 3, "tnl")
    with pytest.raises(ValueError, match="impl must be one of"):
        attention(q, k, v, g, impl="triton")
    with pytest.raises(ValueError, match="log_decay"):
        attention(q, k, v, jnp.zeros((3,)))
    with pytest.raises(ValueError, match="initial_state"):
        attention(q, k, v, g, initial_state=jnp.zeros((1, 2, 3, 4)))
    with pytest.raises(ValueError, match="v must be"):
        attention(q, k, v[:, :7], g)
    with pytest.raises(ValueError, match="chunk_size"):
        attention(q, k, v, g, chunk_size=0)
