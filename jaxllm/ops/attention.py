"""Softmax attention with grouped-query heads, causal and packed-sequence masking.

`attention` picks a path: `xla`/`cudnn` go through `jax.nn.dot_product_attention` (cuDNN flash
attention on GPUs where the inputs allow it), `reference` is the plain float32 formula.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLS = ("auto", "reference", "xla", "cudnn")


def _mask_BTS(
    q_positions_BT: jax.Array | None,
    kv_positions_BS: jax.Array | None,
    q_segment_ids_BT: jax.Array | None,
    kv_segment_ids_BS: jax.Array | None,
    t: int,
    s: int,
    causal: bool,
) -> jax.Array | None:
    """Boolean [B|1, T, S]: True where query t may attend to key s."""
    mask = None
    if causal:
        qp = q_positions_BT if q_positions_BT is not None else jnp.arange(t)[None]
        kp = kv_positions_BS if kv_positions_BS is not None else jnp.arange(s)[None]
        mask = kp[:, None, :] <= qp[:, :, None]
    if q_segment_ids_BT is not None:
        kv_seg = kv_segment_ids_BS if kv_segment_ids_BS is not None else q_segment_ids_BT
        same = q_segment_ids_BT[:, :, None] == kv_seg[:, None, :]
        mask = same if mask is None else mask & same
    return mask


def attention_reference(
    q_BTHK: jax.Array,
    k_BSGK: jax.Array,
    v_BSGV: jax.Array,
    *,
    causal: bool = True,
    segment_ids_BT: jax.Array | None = None,
    kv_segment_ids_BS: jax.Array | None = None,
    q_positions_BT: jax.Array | None = None,
    kv_positions_BS: jax.Array | None = None,
    scale: float | None = None,
) -> jax.Array:
    """softmax(q·kᵀ · scale + mask) · v in float32, GQA by repeating kv heads.

    q: [B, T, H, K], k: [B, S, G, K], v: [B, S, G, V] (G divides H) → [B, T, H, V].
    Causality compares absolute positions (`q_positions` / `kv_positions`, default 0..T-1 and
    0..S-1), so a decode step against a cache masks the not-yet-written slots too.
    Rows with no allowed key return zeros.
    """
    t, h, kd = q_BTHK.shape[1:]
    s, g = k_BSGK.shape[1], k_BSGK.shape[2]
    scale = kd**-0.5 if scale is None else scale
    q = q_BTHK.astype(jnp.float32)
    k = jnp.repeat(k_BSGK.astype(jnp.float32), h // g, axis=2)
    v = jnp.repeat(v_BSGV.astype(jnp.float32), h // g, axis=2)
    logits_BHTS = jnp.einsum("BTHK,BSHK->BHTS", q, k) * scale
    mask = _mask_BTS(
        q_positions_BT, kv_positions_BS, segment_ids_BT, kv_segment_ids_BS, t, s, causal
    )
    if mask is not None:
        logits_BHTS = jnp.where(mask[:, None], logits_BHTS, -jnp.inf)
    m = jnp.max(logits_BHTS, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(logits_BHTS - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0, 1.0, denom)
    return jnp.einsum("BHTS,BSHV->BTHV", p, v).astype(q_BTHK.dtype)


def attention(
    q_BTHK: jax.Array,
    k_BSGK: jax.Array,
    v_BSGV: jax.Array,
    *,
    causal: bool = True,
    segment_ids_BT: jax.Array | None = None,
    kv_segment_ids_BS: jax.Array | None = None,
    q_positions_BT: jax.Array | None = None,
    kv_positions_BS: jax.Array | None = None,
    scale: float | None = None,
    impl: str = "auto",
) -> jax.Array:
    """Same contract as `attention_reference`; `impl` in auto | reference | xla | cudnn.

    `auto` uses `jax.nn.dot_product_attention` and lets it choose cuDNN where it can.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "reference":
        return attention_reference(
            q_BTHK, k_BSGK, v_BSGV, causal=causal, segment_ids_BT=segment_ids_BT,
            kv_segment_ids_BS=kv_segment_ids_BS, q_positions_BT=q_positions_BT,
            kv_positions_BS=kv_positions_BS, scale=scale,
        )  # fmt: skip
    t, s = q_BTHK.shape[1], k_BSGK.shape[1]
    plain_causal = causal and q_positions_BT is None and kv_positions_BS is None and t == s
    mask = None
    if not plain_causal or segment_ids_BT is not None:
        mask = _mask_BTS(
            q_positions_BT, kv_positions_BS, segment_ids_BT, kv_segment_ids_BS, t, s, causal
        )
    dt = q_BTHK.dtype
    # With softmax's custom JVP the backward keeps its output only; jax's default (off) keeps
    # the exp too: one more [B, H, T, S] fp32 per layer (-14 % XLA temp memory for the
    # `default` preset's train step, same values; see benchmarks/maxtext_compare.py).
    with jax.softmax_custom_jvp(True):
        out = jax.nn.dot_product_attention(
            q_BTHK,
            k_BSGK.astype(dt),
            v_BSGV.astype(dt),
            scale=scale,
            mask=None if mask is None else mask[:, None],
            is_causal=plain_causal and mask is None,
            implementation=None if impl == "auto" else impl,
        )
    if mask is not None:
        # A query row with no allowed key (a padded decode slot) gives zeros, as the reference.
        out = jnp.where(jnp.any(mask, axis=-1)[..., None, None], out, 0)
    return out
