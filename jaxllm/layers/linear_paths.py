"""The one path selector of the linear mixers (TNL, cosFormer2, HGRN2, LCSM).

Every linear mixer runs S_t = a_t ⊙ S_{t−1} + k_tᵀ v_t, o_t = q_t S_t, of one of two kinds:
- "lightning": a_t = λ per head, `decay` = log λ [H] (or None, no decay);
- "gla": a_t = exp(g_t) per key channel and token, `decay` = log gate g [B, T, H, K].

`linear_mix` picks, in this order:
1. sequence parallel (a mesh with a `sequence` axis > 1 under `use_rules`, training, no cache):
   LASP-2 / LASP-1 (`jaxllm.parallel.sequence`), each shard running the op with the mixer's impl;
2. decode (a cache and one new token): the op's single step, from the cache's state;
3. the op (chunked in XLA, or the kernel: the op's `impl` decides), continuing the cache's
   state when there is one; packed rows (`segment_ids_BT`) reset the state where the id changes.

The cache is {"state": [B, H, K, V] float32, "end": int32}; a cache's state continues the row's
first document, so one decoded token never resets it.
"""

from __future__ import annotations

from typing import Literal

import jax

from jaxllm.ops.gated_linear_attention import gated_linear_attention, gated_linear_attention_step
from jaxllm.ops.lightning_attention import lightning_attention, lightning_attention_step
from jaxllm.ops.lightning_attention_packed import lightning_attention_packed
from jaxllm.parallel import sequence

Cache = dict[str, jax.Array]
Kind = Literal["lightning", "gla"]


def _op(kind, q, k, v, decay, segment_ids_BT, state, chunk_size, impl):
    """The op over all T tokens from `state`: (o [B, T, H, V], final state)."""
    kw = dict(initial_state=state, return_final_state=True, chunk_size=chunk_size, impl=impl)
    if kind == "gla":
        return gated_linear_attention(q, k, v, decay, segment_ids_BT=segment_ids_BT, **kw)
    if segment_ids_BT is not None:
        return lightning_attention_packed(q, k, v, decay, segment_ids_BT, **kw)
    return lightning_attention(q, k, v, decay, **kw)


def _step(kind, q_BHK, k_BHK, v_BHV, decay, state):
    """One token from `state`: (o [B, H, V], new state); decay as `linear_mix`'s, token 0."""
    if kind == "gla":
        return gated_linear_attention_step(q_BHK, k_BHK, v_BHV, decay[:, 0], state)
    return lightning_attention_step(q_BHK, k_BHK, v_BHV, state, decay)


def linear_mix(
    kind: Kind,
    q_BTHK: jax.Array,
    k_BTHK: jax.Array,
    v_BTHV: jax.Array,
    decay: jax.Array | None,
    *,
    segment_ids_BT: jax.Array | None,
    cache: Cache | None,
    chunk_size: int | None,
    impl: str,
) -> tuple[jax.Array, Cache | None]:
    """o [B, T, H, V] of the recurrence of `kind` over the T tokens, and the cache continued
    (None without one). decay: log λ [H] or None (lightning), log gate [B, T, H, K] (gla)."""
    t = q_BTHK.shape[1]
    if cache is None and (sp := sequence.active("linear")) is not None:
        sp_op = (
            sequence.gated_linear_attention_sp if kind == "gla" else sequence.lightning_attention_sp
        )
        o_BTHV = sp_op(
            q_BTHK, k_BTHK, v_BTHV, decay, mesh=sp[0], impl=sp[1], chunk_size=chunk_size,
            segment_ids_BT=segment_ids_BT, op_impl=impl,
        )  # fmt: skip
        return o_BTHV, None
    state = None if cache is None else cache["state"]
    if cache is not None and t == 1:
        o_BHV, state = _step(kind, q_BTHK[:, 0], k_BTHK[:, 0], v_BTHV[:, 0], decay, state)
        o_BTHV = o_BHV[:, None]
    else:
        o_BTHV, state = _op(kind, q_BTHK, k_BTHK, v_BTHV, decay, segment_ids_BT, state,
                            chunk_size, impl)  # fmt: skip
    if cache is None:
        return o_BTHV, None
    return o_BTHV, {"state": state, "end": cache["end"] + t}
