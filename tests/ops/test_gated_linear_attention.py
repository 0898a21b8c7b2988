"""Gated linear attention: the shared op suite (chunked and kernel against the scan reference,
packed rows included, `tests/ops/linear_op_cases.py`), and what is this op's own: its definition,
gates of −20 per step, packed rows against their documents run alone and a reset that leaks
nothing, and argument checks. Tolerances as the suite's (fla's policy: float32 ratio 1e-5).
Never loosen these to make a test pass. Gate strength as in fla's tests: log_gate =
logsigmoid(randn) / normalizer, normalizer 0.05 (strong, down to about −60 per step), 1, or 10
(weak).
"""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxllm.ops.gated_linear_attention import (
    gated_linear_attention,
    gated_linear_attention_reference,
    gated_linear_attention_step,
)
from jaxllm.parallel.core.mesh import make_mesh
from jaxllm.parallel.core.rules import use_rules
from tests.helpers import assert_close
from tests.ops.linear_op_cases import (
    F32_RATIO,
    NAMES,
    LinearOpCases,
    outputs_and_grads,
    packed_ids,
)

# The module itself (the package's attribute of this name is the function).
gla_module = importlib.import_module("jaxllm.ops.gated_linear_attention")

attention = jax.jit(
    gated_linear_attention, static_argnames=("return_final_state", "chunk_size", "impl")
)
reference = jax.jit(gated_linear_attention_reference, static_argnames=("return_final_state",))


def _op(q, k, v, log_gate, *, segment_ids, **kw):
    return gated_linear_attention(q, k, v, log_gate, segment_ids_BT=segment_ids, **kw)


# Packed rows of 37 tokens. Row 0: a start at 8 (a chunk boundary for C = 8), 13 (inside a
# chunk), 18 and 21 (two in one chunk), a one-token document at 28; ids may repeat after other
# documents. Row 1: a one-token first document, then a start at 16 (a sub-chunk boundary for
# C = 32) and 33 (inside the padded last chunk).
PACKED_LENGTHS = ([8, 5, 5, 3, 7, 1, 8], [1, 15, 17, 4])


def _packed_ids(lengths_per_row):
    rows = [np.repeat(np.arange(len(ls)) % 3, ls) for ls in lengths_per_row]
    return jnp.asarray(np.stack(rows), jnp.int32)


class TestGatedLinearAttention(LinearOpCases):
    op = staticmethod(_op)
    step = staticmethod(gated_linear_attention_step)
    module = gla_module
    packed = True
    decay_per_token = True
    # (B, T, H, K, V, chunk_size, segment_tokens, gate normalizer): T not a multiple of the
    # chunk, several sub-chunks (C=32: four of 8), several segments of the outer scan, a chunk
    # of 7 (one sub-chunk), strong / medium / weak gates. T=1 is an example of the property
    # test.
    cases = (
        (2, 63, 2, 8, 6, 16, None, 0.05),
        (1, 500, 2, 16, 8, None, None, 10.0),
        (1, 100, 2, 8, 8, 32, 64, 1.0),
        (1, 77, 2, 8, 4, 7, 21, 1.0),
    )
    # The kernel (its chunk is 64, interpreted on the CPU): an odd T in one chunk, and three
    # chunks with K ≠ V (both padded to 64) and weak gates.
    kernel_cases = ((2, 63, 2, 8, 6, None, None, 1.0), (1, 130, 2, 16, 8, None, None, 10.0))
    # PACKED_LENGTHS' rows, by chunks of 8 in segments of 16 tokens and by one chunk of 32
    packed_cases = ((2, 37, 2, 8, 4, 8, 16, 1.0), (2, 37, 2, 8, 4, 32, None, 1.0))
    # PACKED_LENGTHS' rows in one kernel chunk; `packed_ids` rows over three chunks (resets in
    # each, one-token documents, padding after the last document)
    packed_kernel_cases = ((2, 37, 2, 8, 4, None, None, 1.0), (2, 130, 2, 8, 4, None, None, 1.0))
    strengths = (1.0, 0.05, 10.0)
    strength = 1.0
    chunks = (1, 5, 16, 48, None)

    def decay(self, key, B, T, H, K, normalizer):
        return jax.nn.log_sigmoid(jax.random.normal(key, (B, T, H, K))) / normalizer

    def segment_ids(self, B, T):
        if (B, T) == (2, 37):
            return _packed_ids(PACKED_LENGTHS)
        return packed_ids(B, T, seed=T)


def _inputs(B, T, H, K, V, normalizer, dtype=jnp.float32, seed=0):
    return TestGatedLinearAttention().inputs(B, T, H, K, V, normalizer, dtype, seed)


def test_gates_of_minus_twenty_per_step():
    """Chunks of 32 (20 rounded up) sum the gates to −640: exp(b_t)·exp(−b_s) would overflow."""
    q, k, v, _, S0, do, dS = _inputs(1, 150, 2, 8, 4, 1.0)
    uniform = jax.random.uniform(jax.random.PRNGKey(7), q.shape)
    g = jnp.where(uniform < 0.5, -20.0, -20.0 * uniform)
    kw = dict(op=_op, module=gla_module)
    ref = outputs_and_grads(q, k, v, g, S0, None, do, dS, impl="reference", **kw)
    got = outputs_and_grads(q, k, v, g, S0, None, do, dS, impl="xla", chunk_size=20, **kw)
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


def test_packed_rows_equal_documents_run_alone():
    """Exact separation: the reference's gradients on packed rows (the initial state's
    included, which reaches only the first document) equal its documents run alone; the
    chunked form equals the reference on these rows (the suite's packed cases)."""
    q, k, v, g, S0, do, dS = _inputs(2, 37, 2, 8, 4, 1.0)
    alone = jax.jit(functools.partial(_documents_alone, lengths_per_row=PACKED_LENGTHS))(
        q, k, v, g, S0, do, dS
    )
    seg = _packed_ids(PACKED_LENGTHS)
    kw = dict(op=_op, module=gla_module, impl="reference")
    _, _, got = outputs_and_grads(q, k, v, g, S0, seg, do, dS, **kw)
    for name, r, x in zip(NAMES[2:], alone, got, strict=True):
        assert_close(name, r, x, F32_RATIO)


@pytest.mark.parametrize("impl", ["reference", "xla", "pallas"])
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


def test_bad_arguments_are_rejected():
    q, k, v, g, _, _, _ = _inputs(1, 8, 2, 4, 3, 1.0)
    with pytest.raises(ValueError, match="impl must be one of"):
        attention(q, k, v, g, impl="triton")
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


def test_kernel_on_a_mesh_matches_reference():
    """Under `use_rules` on a data × fsdp × tensor mesh the kernel runs in a `shard_map`
    (`linear_chunks.kernel_per_device`), rows and their gates over data × fsdp, heads over
    tensor; packed rows, every gradient (the gates' included) as the reference's."""
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, devices=jax.devices()[:8])
    q, k, v, g, S0, do, dS = _inputs(4, 70, 2, 8, 4, 1.0)
    seg = packed_ids(4, 70, seed=3)
    rows_heads = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor"))
    q, k, v, g, do = (jax.device_put(x, rows_heads) for x in (q, k, v, g, do))
    kw = dict(op=_op, module=gla_module)
    want = outputs_and_grads(q, k, v, g, S0, seg, do, dS, impl="reference", **kw)
    with use_rules(mesh):
        got = outputs_and_grads(q, k, v, g, S0, seg, do, dS, impl="pallas", **kw)
        jaxpr = str(
            jax.make_jaxpr(functools.partial(_op, segment_ids=seg, impl="pallas"))(q, k, v, g)
        )
    assert "shard_map" in jaxpr and "pallas_call" in jaxpr
    for name, r, x in zip(NAMES, jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        assert_close(name, r, x, F32_RATIO)
