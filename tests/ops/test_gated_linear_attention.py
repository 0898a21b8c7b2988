"""Gated linear attention: the chunked form and the decode step against the scan reference,
and packed rows (segment ids) against their documents run alone.

Tolerance policy (fla's `assert_close`): a result passes when max|Δ| ≤ 1e-6, or else when
RMS(Δ)/RMS(ref) ≤ ratio. float32: ratio 1e-5 for outputs, states and every gradient.
bfloat16 inputs: ratio 5e-3 (fla's) against the reference given the same bfloat16 inputs (both
compute in float32 and round o to bfloat16). Never loosen these to make a test pass.
Gate strength as in fla's tests: log_gate = logsigmoid(randn) / normalizer, normalizer 0.05
(strong, down to about −60 per step), 1, or 10 (weak).
"""

import functools
import importlib

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.ops.gated_linear_attention import (
    gated_linear_attention,
    gated_linear_attention_reference,
    gated_linear_attention_step,
)
from tests.helpers import assert_close

# The module itself (the package's attribute of this name is the function).
gla_module = importlib.import_module("jaxllm.ops.gated_linear_attention")

F32_RATIO = 1e-5
BF16_RATIO = 5e-3

# Jitted once here: run eagerly, every primitive would compile on its own for each new shape.
attention = jax.jit(
    gated_linear_attention, static_argnames=("return_final_state", "chunk_size", "impl")
)
reference = jax.jit(gated_linear_attention_reference, static_argnames=("return_final_state",))


def _inputs(B, T, H, K, V, normalizer, dtype=jnp.float32, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 7)
    q = jax.random.normal(keys[0], (B, T, H, K)).astype(dtype)
    k = jax.random.normal(keys[1], (B, T, H, K)).astype(dtype)
    v = jax.random.normal(keys[2], (B, T, H, V)).astype(dtype)
    g = jax.nn.log_sigmoid(jax.random.normal(keys[3], (B, T, H, K))) / normalizer
    S0 = jax.random.normal(keys[4], (B, H, K, V))
    do = jax.random.normal(keys[5], (B, T, H, V))
    dS = jax.random.normal(keys[6], (B, H, K, V))
    return q, k, v, g, S0, do, dS


@functools.partial(jax.jit, static_argnames=("impl", "chunk_size", "segment_tokens"))
def _outputs_and_grads(q, k, v, g, S0, do, dS, impl, chunk_size=None, segment_tokens=None):
    """o, final state, and the grads of Σ o·do + Σ S·dS w.r.t. (q, k, v, log_gate, S0).

    segment_tokens, when given, overrides the module's segment length while this traces (it
    is a static argument, so each value gets its own compiled function).
    """
    fn = functools.partial(gated_linear_attention, impl=impl, chunk_size=chunk_size)

    def loss(q, k, v, g, S0):
        o, S = fn(q, k, v, g, initial_state=S0, return_final_state=True)
        return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(S * dS), (o, S)

    default_segment = gla_module.SEGMENT_TOKENS
    gla_module.SEGMENT_TOKENS = segment_tokens or default_segment
    try:
        grads, (o, S) = jax.grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(q, k, v, g, S0)
    finally:
        gla_module.SEGMENT_TOKENS = default_segment
    return o, S, grads


NAMES = ("o", "final state", "dq", "dk", "dv", "dlog_gate", "dS0")


# (B, T, H, K, V, chunk_size, segment_tokens, gate normalizer): T not a multiple of the chunk,
# several sub-chunks (C=32: four of 8), several segments of the outer scan, a chunk of 7 (one
# sub-chunk), strong / medium / weak gates. T=1 is an example of the property test below.
CASES = [
    (2, 63, 2, 8, 6, 16, None, 0.05),
    (1, 500, 2, 16, 8, None, None, 10.0),
    (1, 100, 2, 8, 8, 32, 64, 1.0),
    (1, 77, 2, 8, 4, 7, 21, 1.0),
]


@pytest.mark.parametrize(("B", "T", "H", "K", "V", "chunk", "segment", "normalizer"), CASES)
def test_chunked_matches_reference(B, T, H, K, V, chunk, segment, normalizer):
    args = _inputs(B, T, H, K, V, normalizer)
    ref = _outputs_and_grads(*args, impl="reference")
    got = _outputs_and_grads(*args, impl="xla", chunk_size=chunk, segment_tokens=segment)
    for name, r, x in zip(NAMES, jax.tree.leaves(ref), jax.tree.leaves(got)):
        assert_close(name, r, x, F32_RATIO)


def test_chunked_bfloat16_inputs():
    args = _inputs(2, 200, 2, 16, 16, 1.0, dtype=jnp.bfloat16)
    got = _outputs_and_grads(*args, impl="xla")
    assert got[0].dtype == jnp.bfloat16 and got[2][0].dtype == jnp.bfloat16
    ref = _outputs_and_grads(*args, impl="reference")
    for name, r, x in zip(NAMES, jax.tree.leaves(ref), jax.tree.leaves(got)):
        assert_close(name, r, x, BF16_RATIO)


def test_gates_of_minus_twenty_per_step():
    """Chunks of 32 (20 rounded up) sum the gates to −640: exp(b_t)·exp(−b_s) would overflow."""
    q, k, v, _, S0, do, dS = _inputs(1, 150, 2, 8, 4, 1.0)
    uniform = jax.random.uniform(jax.random.PRNGKey(7), q.shape)
    g = jnp.where(uniform < 0.5, -20.0, -20.0 * uniform)
    ref = _outputs_and_grads(q, k, v, g, S0, do, dS, impl="reference")
    got = _outputs_and_grads(q, k, v, g, S0, do, dS, impl="xla", chunk_size=20)
    for name, r, x in zip(NAMES, jax.tree.leaves(ref), jax.tree.leaves(got)):
        assert_close(name, r, x, F32_RATIO)


def test_reference_matches_definition():
    """o_t = Σ_{s≤t} Σ_K q_tK k_sK e^{Σ_{s<i≤t} g_iK} v_s + Σ_K q_tK e^{Σ_{i≤t} g_iK} S₀[K].

    Written out in float64 NumPy.
    """
    T = 12
    q, k, v, g, S0, _, _ = (np.asarray(x, np.float64) for x in _inputs(1, T, 2, 3, 2, 1.0))
    o = np.zeros((1, T, 2, 2))
    for t in range(T):
        for h in range(2):
            o[0, t, h] = (q[0, t, h] * np.exp(g[0, : t + 1, h].sum(0))) @ S0[0, h]
            for s in range(t + 1):
                gate_K = np.exp(g[0, s + 1 : t + 1, h].sum(0))
                o[0, t, h] += np.sum(q[0, t, h] * k[0, s, h] * gate_K) * v[0, s, h]
    got = reference(*map(jnp.asarray, (q, k, v, g)), initial_state=S0)
    assert_close("o", o, got, F32_RATIO)


def test_split_sequence_carries_state():
    q, k, v, g, S0, _, _ = _inputs(2, 90, 2, 8, 6, 1.0)
    run = functools.partial(attention, chunk_size=16, return_final_state=True)
    o_all, S_all = run(q, k, v, g, initial_state=S0)
    o_a, S_a = run(q[:, :37], k[:, :37], v[:, :37], g[:, :37], initial_state=S0)
    o_b, S_b = run(q[:, 37:], k[:, 37:], v[:, 37:], g[:, 37:], initial_state=S_a)
    assert_close("o", o_all, jnp.concatenate([o_a, o_b], axis=1), F32_RATIO)
    assert_close("final state", S_all, S_b, F32_RATIO)


def test_decode_steps_match_parallel_form():
    q, k, v, g, S0, _, _ = _inputs(2, 40, 2, 8, 6, 1.0)
    o_par, S_par = attention(q, k, v, g, initial_state=S0, return_final_state=True)
    step = jax.jit(gated_linear_attention_step)
    state, outs = S0, []
    for t in range(q.shape[1]):
        o_t, state = step(q[:, t], k[:, t], v[:, t], g[:, t], state)
        outs.append(o_t)
    assert state.dtype == jnp.float32
    assert_close("o", o_par, jnp.stack(outs, axis=1), F32_RATIO)
    assert_close("final state", S_par, state, F32_RATIO)


def test_causal_by_gradient():
    """d o_t / d x_s = 0 for every s > t and x in q, k, v, log_gate; non-zero for keys s ≤ t."""
    q, k, v, g, _, _, _ = _inputs(1, 50, 2, 4, 3, 1.0)
    t = 21

    def o_t(q, k, v, g):
        return attention(q, k, v, g, chunk_size=32)[:, t].sum()

    grads = jax.grad(o_t, argnums=(0, 1, 2, 3))(q, k, v, g)
    for name, d in zip(("dq", "dk", "dv", "dlog_gate"), grads):
        assert np.all(np.asarray(d[:, t + 1 :]) == 0), f"{name} leaks from the future"
    assert np.all(np.abs(np.asarray(grads[1][:, : t + 1])).sum(axis=(0, 2, 3)) > 0)


@hypothesis.settings(max_examples=4, deadline=None, derandomize=True)
@hypothesis.example(T=1, chunk=None, normalizer=1.0, with_state=True)
@hypothesis.given(
    T=st.integers(1, 96),
    chunk=st.sampled_from([1, 5, 16, 48, None]),
    normalizer=st.sampled_from([0.05, 1.0, 10.0]),
    with_state=st.booleans(),
)
def test_chunked_matches_reference_property(T, chunk, normalizer, with_state):
    q, k, v, g, S0, _, _ = _inputs(1, T, 2, 4, 3, normalizer, seed=T)
    S0 = S0 if with_state else None
    ref = reference(q, k, v, g, initial_state=S0, return_final_state=True)
    got = attention(q, k, v, g, initial_state=S0, return_final_state=True, chunk_size=chunk)
    assert_close("o", ref[0], got[0], F32_RATIO)
    assert_close("final state", ref[1], got[1], F32_RATIO)


# Packed rows of 37 tokens. Row 0: a start at 8 (a chunk boundary for C = 8), 13 (inside a
# chunk), 18 and 21 (two in one chunk), a one-token document at 28; ids may repeat after other
# documents. Row 1: a one-token first document, then a start at 16 (a sub-chunk boundary for
# C = 32) and 33 (inside the padded last chunk).
PACKED_LENGTHS = ([8, 5, 5, 3, 7, 1, 8], [1, 15, 17, 4])


def _packed_ids(lengths_per_row):
    rows = [np.repeat(np.arange(len(ls)) % 3, ls) for ls in lengths_per_row]
    return jnp.asarray(np.stack(rows), jnp.int32)


def _documents(lengths_per_row):
    """(row, document index, index of its tokens [1, n]) for every packed document."""
    for b, lengths in enumerate(lengths_per_row):
        ends = np.cumsum(lengths)
        for d, (start, end) in enumerate(zip(ends - lengths, ends)):
            yield b, d, (slice(b, b + 1), slice(start, end))


def _documents_alone(q, k, v, g, S0, do, dS, lengths_per_row):
    """Grads of Σ o·do + Σ S·dS with every document run on its own by the reference: one row
    per document, zero-padded at its end (zero k, v and gate keep the state), starting from
    S0 for a row's first document and from zeros otherwise; the final state is the last
    document's."""
    docs = list(_documents(lengths_per_row))
    n = max(idx[1].stop - idx[1].start for _, _, idx in docs)
    row = np.array([[b] * n for b, _, _ in docs])
    tok = np.array([np.arange(idx[1].start, idx[1].start + n) for _, _, idx in docs])
    valid = tok < np.array([[idx[1].stop] for _, _, idx in docs])
    tok = np.where(valid, tok, 0)
    first = np.array([d == 0 for _, d, _ in docs])
    last = [i for i, (b, d, _) in enumerate(docs) if d == len(lengths_per_row[b]) - 1]

    def loss(q, k, v, g, S0):
        q_d, k_d, v_d, g_d, do_d = (
            jnp.where(valid[..., None, None], x[row, tok], 0.0) for x in (q, k, v, g, do)
        )
        S0_d = jnp.where(first[:, None, None, None], S0[row[:, 0]], 0.0)
        o_d, S_d = gated_linear_attention_reference(
            q_d, k_d, v_d, g_d, initial_state=S0_d, return_final_state=True
        )
        return jnp.sum(o_d * do_d) + jnp.sum(S_d[np.array(last)] * dS)

    return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, g, S0)


@pytest.mark.parametrize(("chunk", "segment"), [(8, 16), (32, None)])
def test_packed_rows_equal_documents_run_alone(chunk, segment):
    """Exact separation: a packed row's outputs, final state and gradients (the initial state's
    included, which reaches only the first document) equal its documents run alone."""
    args = _inputs(2, 37, 2, 8, 4, 1.0)
    seg = _packed_ids(PACKED_LENGTHS)
    alone = jax.jit(functools.partial(_documents_alone, lengths_per_row=PACKED_LENGTHS))(*args)

    @functools.partial(jax.jit, static_argnames=("impl",))
    def packed(q, k, v, g, S0, do, dS, impl):
        fn = functools.partial(
            gated_linear_attention, segment_ids_BT=seg, impl=impl, chunk_size=chunk
        )

        def loss(q, k, v, g, S0):
            o, S = fn(q, k, v, g, initial_state=S0, return_final_state=True)
            return jnp.sum(o * do) + jnp.sum(S * dS)

        return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, g, S0)

    default_segment = gla_module.SEGMENT_TOKENS
    gla_module.SEGMENT_TOKENS = segment or default_segment
    try:
        for impl in ("reference", "xla"):
            got = packed(*args, impl=impl)
            for name, r, x in zip(NAMES[2:], alone, got):
                assert_close(f"{impl} {name}", r, x, F32_RATIO)
    finally:
        gla_module.SEGMENT_TOKENS = default_segment


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_packed_reset_leaks_nothing(impl):
    """A first document whose state is ~1e30 leaves no trace in the next ones (a reset that
    only scaled it by e^−40 would add ~4e12), and the forward matches documents run alone."""
    q, k, v, g, S0, _, _ = _inputs(2, 37, 2, 8, 4, 10.0)
    seg = _packed_ids(PACKED_LENGTHS)
    S0 = S0 * 1e30
    o, S = attention(q, k, v, g, segment_ids_BT=seg, initial_state=S0, return_final_state=True,
                     chunk_size=8, impl=impl)  # fmt: skip
    for b, d, idx in _documents(PACKED_LENGTHS):
        if d == 0:
            continue
        o_d, S_d = reference(q[idx], k[idx], v[idx], g[idx], return_final_state=True)
        assert_close(f"row {b} document {d} o", o_d, o[idx], F32_RATIO)
        if d == len(PACKED_LENGTHS[b]) - 1:
            assert_close(f"row {b} final state", S_d, S[b : b + 1], F32_RATIO)


@hypothesis.settings(max_examples=3, deadline=None, derandomize=True)
@hypothesis.given(
    T=st.integers(2, 64),
    chunk=st.sampled_from([1, 5, 16, 48, None]),
    normalizer=st.sampled_from([0.05, 1.0, 10.0]),
    n_docs=st.integers(1, 12),
)
def test_packed_chunked_matches_reference_property(T, chunk, normalizer, n_docs):
    q, k, v, g, S0, _, _ = _inputs(1, T, 2, 4, 3, normalizer, seed=T)
    ids = np.sort(np.random.default_rng(T).integers(0, n_docs, T))
    seg = jnp.asarray(ids[None], jnp.int32)
    kw = dict(segment_ids_BT=seg, initial_state=S0, return_final_state=True)
    ref = reference(q, k, v, g, **kw)
    got = attention(q, k, v, g, chunk_size=chunk, **kw)
    assert_close("o", ref[0], got[0], F32_RATIO)
    assert_close("final state", ref[1], got[1], F32_RATIO)


def test_dtypes_and_return_forms():
    q, k, v, g, _, _, _ = _inputs(1, 20, 2, 4, 3, 1.0, dtype=jnp.bfloat16)
    o = attention(q, k, v, g)
    assert o.shape == (1, 20, 2, 3) and o.dtype == jnp.bfloat16
    o, S = attention(q, k, v, g, return_final_state=True, impl="reference")
    assert o.dtype == jnp.bfloat16 and S.shape == (1, 2, 4, 3) and S.dtype == jnp.float32
    auto = attention(q, k, v, g, impl="auto")
    xla = attention(q, k, v, g, impl="xla")
    assert np.array_equal(np.asarray(auto, np.float32), np.asarray(xla, np.float32))


def test_bad_arguments_are_rejected():
    q, k, v, g, _, _, _ = _inputs(1, 8, 2, 4, 3, 1.0)
    with pytest.raises(ValueError, match="impl must be one of"):
        attention(q, k, v, g, impl="pallas")
    with pytest.raises(ValueError, match="log_gate"):
        attention(q, k, v, g[..., :3])
    with pytest.raises(ValueError, match="initial_state"):
        attention(q, k, v, g, initial_state=jnp.zeros((1, 2, 3, 4)))
    with pytest.raises(ValueError, match="v must be"):
        attention(q, k, v[:, :7], g)
    with pytest.raises(ValueError, match="chunk_size"):
        attention(q, k, v, g, chunk_size=0)
    with pytest.raises(ValueError, match="segment_ids_BT"):
        attention(q, k, v, g, segment_ids_BT=jnp.zeros((1, 7), jnp.int32))
