"""Lightning attention: the shared op suite (chunked and kernel against the quadratic form,
`tests/ops/linear_op_cases.py`), and what is this op's own: the scan and the definition
against the quadratic form, very strong decay, no decay, and argument checks. Tolerances as
the suite's (fla's policy: float32 ratio 1e-5). Never loosen these to make a test pass.
"""

import importlib

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
from tests.ops.linear_op_cases import (
    F32_RATIO,
    NAMES,
    LinearOpCases,
    outputs_and_grads,
    per_head_log_decay,
)

# The module itself (the package's attribute of this name is the function).
la_module = importlib.import_module("jaxllm.ops.lightning_attention")

_STATIC = ("return_final_state", "chunk_size", "impl")
attention = jax.jit(lightning_attention, static_argnames=_STATIC)
reference = jax.jit(lightning_attention_reference, static_argnames=_STATIC[:1])
recurrent = jax.jit(lightning_attention_recurrent, static_argnames=_STATIC[:1])


def _op(q, k, v, log_decay, *, segment_ids, **kw):
    assert segment_ids is None
    return lightning_attention(q, k, v, log_decay, **kw)


def _step(q_t, k_t, v_t, log_decay, state):
    return lightning_attention_step(q_t, k_t, v_t, state, log_decay)


# (B, T, H, K, V, chunk_size, segment_tokens, decay): T not a multiple of the chunk, several
# segments of the outer scan, weak / strong / mixed / no decay. T=1 is an example of the
# property test.
CASES = (
    (2, 63, 2, 8, 6, 16, None, "strong"),
    (1, 500, 2, 16, 8, None, None, "weak"),
    (1, 100, 2, 8, 8, 16, 32, "tnl"),
    (1, 77, 2, 8, 4, 7, 21, "none"),
)


class TestLightningAttention(LinearOpCases):
    op = staticmethod(_op)
    step = staticmethod(_step)
    module = la_module
    cases = CASES
    # the log decay's gradient included (the kernel used to return zero for it)
    kernel_cases = (CASES[0], CASES[3])
    strengths = ("tnl", "strong", "weak", "none", -3.0, -0.001)
    strength = "tnl"
    chunks = (1, 5, 16, 64, None)

    def decay(self, key, B, T, H, K, strength):
        return per_head_log_decay(strength, H)


def _inputs(B, T, H, K, V, decay, dtype=jnp.float32, seed=0):
    return TestLightningAttention().inputs(B, T, H, K, V, decay, dtype, seed)


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


def test_very_strong_decay_is_finite_and_exact():
    """λ^j is never inverted, so even λ = e^-60 (λ^-32 would overflow float32) is exact."""
    q, k, v, _, S0, do, dS = _inputs(1, 70, 2, 8, 4, "none")
    g = jnp.array([-20.0, -60.0])
    kw = dict(op=_op, module=la_module)
    ref = outputs_and_grads(q, k, v, g, S0, None, do, dS, impl="reference", **kw)
    got = outputs_and_grads(q, k, v, g, S0, None, do, dS, impl="xla", chunk_size=32, **kw)
    for name, r, x in zip(NAMES, jax.tree.leaves(ref), jax.tree.leaves(got)):
        assert_close(name, r, x, F32_RATIO)


def test_no_decay_is_log_decay_zero():
    q, k, v, _, S0, _, _ = _inputs(1, 33, 2, 4, 4, "none")
    zeros = jnp.zeros((2,))
    for impl in ("xla", "reference"):
        got = attention(q, k, v, None, initial_state=S0, impl=impl)
        want = attention(q, k, v, zeros, initial_state=S0, impl=impl)
        assert_close(impl, want, got, 0.0, atol=0.0)


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
