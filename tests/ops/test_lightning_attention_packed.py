"""Lightning attention over packed rows: the shared op suite (chunked against the scan
reference, `tests/ops/linear_op_cases.py`) and documents that equal the unpacked op run on
each alone. Tolerances as the suite's (fla's policy: float32 ratio 1e-5, bfloat16 5e-3)."""

import jax
import jax.numpy as jnp

from jaxllm.ops.lightning_attention import lightning_attention_reference
from jaxllm.ops.lightning_attention_packed import lightning_attention_packed
from tests.helpers import assert_close
from tests.ops.linear_op_cases import F32_RATIO, LinearOpCases, jitted, per_head_log_decay


def _op(q, k, v, log_decay, *, segment_ids, **kw):
    if segment_ids is None:
        segment_ids = jnp.zeros(q.shape[:2], jnp.int32)
    return lightning_attention_packed(q, k, v, log_decay, segment_ids, **kw)


class TestLightningAttentionPacked(LinearOpCases):
    op = staticmethod(_op)
    packed = True
    bf16_packed = True
    # one document per row (the unpacked op's recurrence), odd T, several chunks
    cases = ((2, 45, 2, 8, 6, 16, None, "tnl"),)
    # packed rows by chunks of 1, 8 and one chunk longer than T; heads of weak, strong and no
    # decay
    packed_cases = (
        (2, 37, 3, 8, 5, 1, None, "mixed"),
        (2, 37, 3, 8, 5, 8, None, "mixed"),
        (2, 37, 3, 8, 5, 64, None, "mixed"),
    )
    strengths = ("mixed", "tnl", "strong", "none")
    strength = "mixed"

    def decay(self, key, B, T, H, K, strength):
        return per_head_log_decay(strength, H)


def test_packed_documents_are_independent():
    """Row 0 (three documents then padding): the first document continues S0, the later ones
    start from zero; row 1 (one document) is the unpacked op from S0."""
    q, k, v, g, S0, _, _ = TestLightningAttentionPacked().inputs(2, 37, 3, 8, 5, "mixed")
    seg = jnp.array([[1] * 10 + [2] * 3 + [3] * 17 + [0] * 7, [4] * 37])
    o, _ = jitted(_op)(q, k, v, g, segment_ids=seg, initial_state=S0, return_final_state=True,
                       chunk_size=8)  # fmt: skip
    reference = jax.jit(lightning_attention_reference)
    assert_close("row 1", reference(q, k, v, g, initial_state=S0)[1], o[1], F32_RATIO)
    for lo, hi, s in ((0, 10, S0[:1]), (10, 13, None), (13, 30, None), (30, 37, None)):
        alone = reference(q[:1, lo:hi], k[:1, lo:hi], v[:1, lo:hi], g, initial_state=s)
        assert_close(f"document {lo}:{hi}", alone[0], o[0, lo:hi], F32_RATIO)
