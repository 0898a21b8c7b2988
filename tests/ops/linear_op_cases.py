"""The test base of the linear-recurrence ops S_t = a_t ⊙ S_{t−1} + k_tᵀ v_t, o_t = q_t S_t,
subclassed per op (as the Pallas ops / tokamax share one test class per op): every fast impl
against the op's reference in outputs, final state and the gradients of every input (decay
and initial state included), on lengths that are not a multiple of the chunk, several
segments of the outer scan, non-zero initial states and packed rows; plus the decode step,
state carried over a split, causality by gradient, bfloat16 inputs and the return forms.

A subclass sets `op` (q, k, v, decay, *, segment_ids, initial_state, return_final_state,
chunk_size, impl → o or (o, S)), `decay` (a strength → the decay input), `step` (or None),
`module` (whose SEGMENT_TOKENS a case may override, or None), and its cases. Shapes stay
small: the suite is compile-bound, so every case is one more compile.

Tolerance policy (fla's `assert_close`): a result passes when max|Δ| ≤ 1e-6, or else when
RMS(Δ)/RMS(ref) ≤ ratio. float32: ratio 1e-5 for outputs, states and every gradient.
bfloat16 inputs: 5e-3 (fla's) against the reference given the same bfloat16 inputs (both
compute in float32 and round o to bfloat16). Never loosen these to make a test pass.
"""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np

from tests.helpers import assert_close

F32_RATIO = 1e-5
BF16_RATIO = 5e-3
NAMES = ("o", "final state", "dq", "dk", "dv", "ddecay", "dS0")


@functools.partial(
    jax.jit, static_argnames=("op", "module", "impl", "chunk_size", "segment_tokens")
)
def outputs_and_grads(q, k, v, decay, S0, seg, do, dS, *, op, module, impl, chunk_size=None,
                      segment_tokens=None):  # fmt: skip
    """o, final state, and the grads of Σ o·do + Σ S·dS w.r.t. (q, k, v, decay, S0).

    segment_tokens, when given, overrides `module.SEGMENT_TOKENS` while this traces (a static
    argument, so each value gets its own compiled function).
    """

    def loss(q, k, v, decay, S0):
        o, S = op(q, k, v, decay, segment_ids=seg, initial_state=S0, return_final_state=True,
                  chunk_size=chunk_size, impl=impl)  # fmt: skip
        return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(S * dS), (o, S)

    default = None if module is None else module.SEGMENT_TOKENS
    if segment_tokens is not None:
        module.SEGMENT_TOKENS = segment_tokens
    try:
        grads, (o, S) = jax.grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(q, k, v, decay, S0)
    finally:
        if module is not None:
            module.SEGMENT_TOKENS = default
    return o, S, grads


@functools.cache
def jitted(op):
    """op jitted once (run eagerly, every primitive would compile on its own per shape)."""
    return jax.jit(op, static_argnames=("return_final_state", "chunk_size", "impl"))


def per_head_log_decay(kind, H):
    """log λ [H]: weak (λ≈0.999), strong (λ≈0.5), TNL's slopes, none (λ=1), mixed (weak,
    strong and none over the heads), or a float (that log λ, halved on every other head)."""
    if isinstance(kind, float):
        return jnp.asarray([kind, kind / 2] * (H // 2) + [kind] * (H % 2), jnp.float32)
    if kind == "weak":
        return jnp.full((H,), np.log(0.999), jnp.float32)
    if kind == "strong":
        return jnp.full((H,), np.log(0.5), jnp.float32)
    if kind == "tnl":
        return jnp.asarray(-(2.0 ** (-8.0 * (np.arange(H) + 1) / H)), jnp.float32)
    if kind == "mixed":
        return jnp.asarray(np.resize([-0.05, -1.0, 0.0], H), jnp.float32)
    assert kind == "none"
    return jnp.zeros((H,), jnp.float32)


def packed_ids(B, T, seed):
    """[B, T] int32 segment ids: row 0 holds a one-token document, a long one, and padding
    (id 0) after the last document; the other rows random sorted ids (documents of any
    length, ids that never repeat)."""
    r = np.random.default_rng(seed)
    a, b = max(1, T // 4), max(2, T // 4 + 1 + T // 2)
    row0 = np.where(np.arange(T) < a, 1, np.where(np.arange(T) == a, 2, 3))
    row0 = np.where(np.arange(T) >= b, 0, row0)
    rows = [row0] + [np.sort(r.integers(0, max(2, T // 6), T)) for _ in range(B - 1)]
    return jnp.asarray(np.stack(rows), jnp.int32)


class LinearOpCases:
    """One op's suite; the hooks and case lists below are set by each subclass."""

    op = None
    step = None
    module = None
    packed = False
    decay_per_token = False
    bf16_packed = False
    # (B, T, H, K, V, chunk_size, segment_tokens, strength), compared with the reference:
    # `cases` by impl="xla", `kernel_cases` by impl="pallas", `packed_cases` with segment ids
    # by impl="xla", `packed_kernel_cases` with segment ids by impl="pallas".
    cases = ()
    kernel_cases = ()
    packed_cases = ()
    packed_kernel_cases = ()
    # the decay strengths of the property test; `strength` for the single-shape tests
    strengths = ()
    strength = None
    chunks = (1, 5, 16, None)

    @classmethod
    def case_lists(cls):
        """Read by tests/ops/conftest.py: each test's `case`, `kernel_case`, `packed_case`,
        `packed_kernel_case`."""
        return {"case": cls.cases, "kernel_case": cls.kernel_cases,
                "packed_case": cls.packed_cases,
                "packed_kernel_case": cls.packed_kernel_cases}  # fmt: skip

    def decay(self, key, B, T, H, K, strength):
        raise NotImplementedError

    def inputs(self, B, T, H, K, V, strength, dtype=jnp.float32, seed=0):
        """(q, k, v, decay, S0, do, dS), q, k, v in dtype."""
        keys = jax.random.split(jax.random.PRNGKey(seed), 7)
        q = jax.random.normal(keys[0], (B, T, H, K)).astype(dtype)
        k = jax.random.normal(keys[1], (B, T, H, K)).astype(dtype)
        v = jax.random.normal(keys[2], (B, T, H, V)).astype(dtype)
        S0 = jax.random.normal(keys[4], (B, H, K, V))
        do = jax.random.normal(keys[5], (B, T, H, V))
        dS = jax.random.normal(keys[6], (B, H, K, V))
        return q, k, v, self.decay(keys[3], B, T, H, K, strength), S0, do, dS

    def segment_ids(self, B, T):
        """The packed rows of `packed_cases`."""
        return packed_ids(B, T, seed=T)

    def tokens(self, decay, sl):
        """The decay input of the tokens `sl` (a per-head decay is the same for all)."""
        return decay[:, sl] if self.decay_per_token else decay

    def run(self, q, k, v, decay, seg=None, S0=None, **kw):
        kw = {"return_final_state": True, **kw}
        return jitted(self.op)(q, k, v, decay, segment_ids=seg, initial_state=S0, **kw)

    def compare(self, case, impl, seg_fn=None):
        B, T, H, K, V, chunk, segment, strength = case
        q, k, v, decay, S0, do, dS = self.inputs(B, T, H, K, V, strength)
        seg = None if seg_fn is None else seg_fn(B, T)
        kw = dict(op=self.op, module=self.module)
        ref = outputs_and_grads(q, k, v, decay, S0, seg, do, dS, impl="reference", **kw)
        got = outputs_and_grads(q, k, v, decay, S0, seg, do, dS, impl=impl, chunk_size=chunk,
                                segment_tokens=segment, **kw)  # fmt: skip
        leaves = zip(NAMES, jax.tree.leaves(ref), jax.tree.leaves(got), strict=True)
        for name, r, x in leaves:
            assert_close(f"{impl} {name}", r, x, F32_RATIO)

    def test_matches_reference(self, case):
        self.compare(case, "xla")

    def test_kernel_matches_reference(self, kernel_case):
        """impl="pallas" (the kernel, interpreted on the CPU), every gradient included."""
        self.compare(kernel_case, "pallas")

    def test_packed_rows_match_reference(self, packed_case):
        """Segment ids: resets inside and at chunk boundaries, one-token documents, padding."""
        self.compare(packed_case, "xla", seg_fn=self.segment_ids)

    def test_packed_kernel_matches_reference(self, packed_kernel_case):
        """impl="pallas" on packed rows: the kernel's exact resets, every gradient included."""
        self.compare(packed_kernel_case, "pallas", seg_fn=self.segment_ids)

    def test_bfloat16_inputs(self):
        q, k, v, decay, S0, do, dS = self.inputs(2, 70, 2, 16, 16, self.strength, jnp.bfloat16)
        seg = packed_ids(2, 70, seed=0) if self.bf16_packed else None
        kw = dict(op=self.op, module=self.module)
        got = outputs_and_grads(q, k, v, decay, S0, seg, do, dS, impl="xla", **kw)
        assert got[0].dtype == jnp.bfloat16 and got[2][0].dtype == jnp.bfloat16
        ref = outputs_and_grads(q, k, v, decay, S0, seg, do, dS, impl="reference", **kw)
        for name, r, x in zip(NAMES, jax.tree.leaves(ref), jax.tree.leaves(got), strict=True):
            assert_close(name, r, x, BF16_RATIO)

    def test_split_sequence_carries_state(self):
        """Two calls, the second from the first's final state, equal one (a cut inside a
        packed document continues it)."""
        q, k, v, decay, S0, _, _ = self.inputs(2, 45, 2, 8, 6, self.strength)
        seg = packed_ids(2, 45, seed=1) if self.packed else None
        cut = lambda x, sl: None if x is None else x[:, sl]
        run = functools.partial(self.run, chunk_size=8)
        o_all, S_all = run(q, k, v, decay, seg, S0)
        a, b = slice(0, 19), slice(19, None)
        o_a, S_a = run(*(x[:, a] for x in (q, k, v)), self.tokens(decay, a), cut(seg, a), S0)
        o_b, S_b = run(*(x[:, b] for x in (q, k, v)), self.tokens(decay, b), cut(seg, b), S_a)
        assert_close("o", o_all, jnp.concatenate([o_a, o_b], axis=1), F32_RATIO)
        assert_close("final state", S_all, S_b, F32_RATIO)

    def test_decode_steps_match_parallel_form(self):
        if self.step is None:
            return
        q, k, v, decay, S0, _, _ = self.inputs(2, 24, 2, 8, 6, self.strength)
        o_par, S_par = self.run(q, k, v, decay, None, S0)
        step = jax.jit(self.step)
        state, outs = S0, []
        for t in range(q.shape[1]):
            o_t, state = step(q[:, t], k[:, t], v[:, t], self.tokens(decay, t), state)
            outs.append(o_t)
        assert state.dtype == jnp.float32
        assert_close("o", o_par, jnp.stack(outs, axis=1), F32_RATIO)
        assert_close("final state", S_par, state, F32_RATIO)

    def test_causal_by_gradient(self):
        """d o_t / d x_s = 0 for every s > t (x: q, k, v, and a per-token decay); non-zero
        for the keys s ≤ t."""
        q, k, v, decay, _, _, _ = self.inputs(1, 50, 2, 4, 3, self.strength)
        t = 21
        argnums = (0, 1, 2, 3) if self.decay_per_token else (0, 1, 2)

        def o_t(q, k, v, decay):
            o = self.run(q, k, v, decay, return_final_state=False, chunk_size=8, impl="xla")
            return o[:, t].sum()

        grads = jax.jit(jax.grad(o_t, argnums=argnums))(q, k, v, decay)
        for name, d in zip(("dq", "dk", "dv", "ddecay"), grads):
            assert np.all(np.asarray(d[:, t + 1 :]) == 0), f"{name} leaks from the future"
        assert np.all(np.abs(np.asarray(grads[1][:, : t + 1])).sum(axis=(0, 2, 3)) > 0)

    # One method, run by every subclass: hypothesis sees one test called from several classes
    # (differing executors), harmless here since derandomize replays nothing from a database.
    @hypothesis.settings(
        max_examples=3,
        deadline=None,
        derandomize=True,
        suppress_health_check=[hypothesis.HealthCheck.differing_executors],
    )
    @hypothesis.example(T=1, chunk_i=3, strength_i=0, with_state=True, n_docs=0)
    @hypothesis.given(
        T=st.integers(1, 96),
        chunk_i=st.integers(0, 7),
        strength_i=st.integers(0, 7),
        with_state=st.booleans(),
        n_docs=st.integers(0, 12),
    )
    def test_odd_lengths_property(self, T, chunk_i, strength_i, with_state, n_docs):
        """Any T (1 included), chunk, strength, with or without an initial state, and (packed
        ops) any number of documents: forward and final state equal the reference's."""
        chunk = self.chunks[chunk_i % len(self.chunks)]
        strength = self.strengths[strength_i % len(self.strengths)]
        n_docs = n_docs if self.packed else 0
        q, k, v, decay, S0, _, _ = self.inputs(1, T, 2, 4, 3, strength, seed=T)
        S0 = S0 if with_state else None
        seg = None
        if n_docs:
            ids = np.sort(np.random.default_rng(T).integers(0, n_docs, T))
            seg = jnp.asarray(ids[None], jnp.int32)
        ref = self.run(q, k, v, decay, seg, S0, impl="reference")
        got = self.run(q, k, v, decay, seg, S0, chunk_size=chunk)
        assert_close("o", ref[0], got[0], F32_RATIO)
        assert_close("final state", ref[1], got[1], F32_RATIO)

    def test_dtypes_and_return_forms(self):
        q, k, v, decay, _, _, _ = self.inputs(1, 20, 2, 4, 3, self.strength, jnp.bfloat16)
        run = functools.partial(self.run, q, k, v, decay)
        auto = run(return_final_state=False, impl="auto")
        assert auto.shape == (1, 20, 2, 3) and auto.dtype == jnp.bfloat16
        o, S = run(impl="reference")
        assert o.dtype == jnp.bfloat16 and S.shape == (1, 2, 4, 3) and S.dtype == jnp.float32
        xla = run(return_final_state=False, impl="xla")
        assert np.array_equal(np.asarray(auto, np.float32), np.asarray(xla, np.float32))
