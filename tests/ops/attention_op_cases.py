"""The test base of the softmax-family attention ops o = W(q·kᵀ/√K, mask) · v, subclassed
per op (as `tests/ops/linear_op_cases.py` for the linear recurrences): the reference against
a float64 NumPy formula; every CPU-runnable impl against the reference in the output and the
gradients of q, k, v, on lengths that are not a multiple of the block, grouped-query heads
(H ≠ G), causal and not, packed rows (segment ids); a document of a packed row equal to the
document alone; causality and document isolation by gradient; bfloat16 inputs.

A subclass sets `op` (q, k, v, *, impl, block, causal, segment_ids_BT, q_positions_BT,
kv_positions_BS → o), `formula` (float64 NumPy q, k, v, mask [B, T, S] → o), `impls` (the
CPU-runnable impls compared with impl="reference"), `fast_impl` (the one the single-shape
tests run), `runs(impl, case)` where an impl takes only some shapes, and its `cases`. Shapes
stay small: the suite is compile-bound, so every (case, impl) is one more compile.

Tolerance policy (as `linear_op_cases`, fla's `assert_close`): a result passes when
max|Δ| ≤ 1e-6, or else when RMS(Δ)/RMS(ref) ≤ ratio. float32: 1e-5 for outputs and every
gradient. bfloat16 inputs: 5e-3 against the reference given the same bfloat16 inputs. Never
loosen these to make a test pass.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import assert_close

F32_RATIO = 1e-5
BF16_RATIO = 5e-3
NAMES = ("o", "dq", "dk", "dv")


@functools.partial(jax.jit, static_argnames=("op", "impl", "block", "causal"))
def outputs_and_grads(q, k, v, do, seg=None, qpos=None, kpos=None, *, op, impl, block=None,
                      causal=True):  # fmt: skip
    """o and the grads of Σ o·do w.r.t. (q, k, v); seg / qpos / kpos: segment ids [B, T],
    query positions [B|1, T] and key positions [B|1, S], each None or an array."""

    def loss(q, k, v):
        o = op(q, k, v, impl=impl, block=block, causal=causal, segment_ids_BT=seg,
               q_positions_BT=qpos, kv_positions_BS=kpos)  # fmt: skip
        return jnp.sum(o.astype(jnp.float32) * do), o

    grads, o = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return o, grads


def compare(ref, got, prefix="", ratio=F32_RATIO):
    """assert_close over (o, (dq, dk, dv)) pairs from `outputs_and_grads`."""
    leaves = zip(NAMES, jax.tree.leaves(ref), jax.tree.leaves(got), strict=True)
    for name, r, x in leaves:
        assert_close(f"{prefix}{name}", r, x, ratio)


@functools.cache
def jitted(op):
    """op jitted once (run eagerly, every primitive would compile on its own per shape)."""
    return jax.jit(op, static_argnames=("impl", "block", "causal"))


def packed_ids(B, T):
    """[B, T] int32 segment ids of 3 documents a row (T ≥ 11), boundaries differing per row:
    row 0's first document is one token, its last starts at T//2."""
    cuts = np.stack([np.array([1, T // 2]), np.array([T // 3, T - 5])][:B])
    return jnp.asarray((np.arange(T)[None, None] >= cuts[:, :, None]).sum(1), jnp.int32)


def mask_BTS(T, S, causal, seg):
    """Boolean [B|1, T, S] in NumPy: causal (query t sees keys s ≤ t) and same document."""
    mask = np.tril(np.ones((T, S), bool)) if causal else np.ones((T, S), bool)
    mask = mask[None]
    if seg is not None:
        seg = np.asarray(seg)
        mask = mask & (seg[:, :, None] == seg[:, None, :])
    return mask


class AttentionOpCases:
    """One op's suite; the hooks and case lists below are set by each subclass."""

    op = None
    formula = None
    impls = ()
    fast_impl = None
    # (B, T, H, G, K, V, block, causal, packed): each compared with the reference by every impl
    # that `runs` it, and the reference with the formula.
    cases = ()
    # the scale of q and k (larger: scores farther from 0)
    qk_scale = 1.0

    @classmethod
    def case_lists(cls):
        """Read by tests/ops/conftest.py: each test's `case`, `impl_case`, `packed_case`."""
        pairs = [(impl, c) for c in cls.cases for impl in cls.impls if cls.runs(impl, c)]
        return {"case": cls.cases, "impl_case": pairs,
                "packed_case": [c for c in cls.cases if c[-1]]}  # fmt: skip

    @classmethod
    def runs(cls, impl, case):
        """Whether `impl` takes this case's shapes (every impl takes every case by default)."""
        return True

    def inputs(self, B, T, H, G, K, V, dtype=jnp.float32, S=None, seed=0):
        """(q [B, T, H, K], k [B, S, G, K], v [B, S, G, V], do [B, T, H, V]), q, k, v in dtype."""
        S = S or T
        # NumPy draws: jax.random run eagerly would compile once per shape.
        r = np.random.default_rng(seed)
        q = self.qk_scale * r.standard_normal((B, T, H, K), np.float32)
        k = self.qk_scale * r.standard_normal((B, S, G, K), np.float32)
        v = r.standard_normal((B, S, G, V), np.float32)
        do = jnp.asarray(r.standard_normal((B, T, H, V), np.float32))
        return *(jnp.asarray(x, dtype) for x in (q, k, v)), do

    def case_inputs(self, case, dtype=jnp.float32):
        B, T, H, G, K, V, block, causal, packed = case
        seg = packed_ids(B, T) if packed else None
        return self.inputs(B, T, H, G, K, V, dtype), seg, dict(block=block, causal=causal)

    def test_reference_matches_formula(self, case):
        """The reference against the float64 NumPy formula under the case's mask."""
        (q, k, v, do), seg, kw = self.case_inputs(case)
        o, _ = outputs_and_grads(q, k, v, do, seg, op=self.op, impl="reference", **kw)
        arrays = (np.asarray(x, np.float64) for x in (q, k, v))
        want = self.formula(*arrays, mask_BTS(q.shape[1], k.shape[1], kw["causal"], seg))
        assert_close("o", want, o, F32_RATIO)

    def test_matches_reference(self, impl_case):
        """Output and the gradients of q, k, v under a random cotangent."""
        impl, case = impl_case
        (q, k, v, do), seg, kw = self.case_inputs(case)
        ref = outputs_and_grads(q, k, v, do, seg, op=self.op, impl="reference", **kw)
        got = outputs_and_grads(q, k, v, do, seg, op=self.op, impl=impl, **kw)
        compare(ref, got, f"{impl} ")

    def test_packed_document_equals_document_alone(self, packed_case):
        """Row 0's last document (T//2 on) gives what it gives run on its own."""
        (q, k, v, _), seg, kw = self.case_inputs(packed_case)
        run = functools.partial(jitted(self.op), impl=self.fast_impl, q_positions_BT=None,
                                kv_positions_BS=None, **kw)  # fmt: skip
        a = slice(q.shape[1] // 2, None)
        packed = run(q, k, v, segment_ids_BT=seg)[:1, a]
        alone = run(q[:1, a], k[:1, a], v[:1, a], segment_ids_BT=None)
        assert_close("document", alone, packed, F32_RATIO)

    @pytest.mark.parametrize("causal", [True, False])
    def test_masking_by_gradient(self, causal):
        """d o_t / d x_s (x: q, k, v) is 0 for keys of other documents and, causal, for s > t;
        d o_t / d k_s is non-zero for every key that o_t sees. Causal: every impl; not: the
        fast one."""
        B, T, H, G, K, V, t = 1, 16, 4, 2, 8, 8, 11
        q, k, v, _ = self.inputs(B, T, H, G, K, V)
        seg = packed_ids(B, T)  # documents [0, 1), [1, 8), [8, 16)
        sees = (np.arange(T) >= 8) & ((np.arange(T) <= t) | (not causal))
        for impl in self.impls if causal else (self.fast_impl,):
            case = (B, T, H, G, K, V, 8, causal, True)
            if not self.runs(impl, case):
                continue

            def o_t(q, k, v, impl=impl):
                o = self.op(q, k, v, impl=impl, block=8, causal=causal, segment_ids_BT=seg,
                            q_positions_BT=None, kv_positions_BS=None)  # fmt: skip
                return o[:, t].sum()

            grads = jax.jit(jax.grad(o_t, argnums=(0, 1, 2)))(q, k, v)
            for name, d in zip(("dq", "dk", "dv"), grads):
                seen = np.abs(np.asarray(d)).sum(axis=(0, 2, 3)) > 0
                allowed = np.arange(T) == t if name == "dq" else sees
                assert not np.any(seen & ~allowed), f"{impl} {name} leaks from {seen & ~allowed}"
            dk_seen = np.abs(np.asarray(grads[1])).sum(axis=(0, 2, 3)) > 0
            assert np.all(dk_seen[sees]), f"{impl} dk misses keys {sees & ~dk_seen}"

    def test_bfloat16_inputs(self):
        """Every impl against the reference given the same bfloat16 inputs (dtypes kept), and
        the reference against the formula of those inputs."""
        case = (2, 16, 4, 2, 8, 8, 8, True, True)
        (q, k, v, do), seg, kw = self.case_inputs(case, jnp.bfloat16)
        ref = outputs_and_grads(q, k, v, do, seg, op=self.op, impl="reference", **kw)
        arrays = (np.asarray(x.astype(jnp.float32), np.float64) for x in (q, k, v))
        want = self.formula(*arrays, mask_BTS(16, 16, True, seg))
        assert_close("reference o", want, ref[0], BF16_RATIO)
        for impl in self.impls:
            if not self.runs(impl, case):
                continue
            got = outputs_and_grads(q, k, v, do, seg, op=self.op, impl=impl, **kw)
            assert got[0].dtype == jnp.bfloat16
            assert all(g.dtype == jnp.bfloat16 for g in got[1]), impl
            compare(ref, got, f"{impl} ", BF16_RATIO)
