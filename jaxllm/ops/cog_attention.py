"""Cog attention (Lv et al. 2411.07176): signed attention weights `sign(P) ⊙ softmax(|P|)`.

With P = q·kᵀ/√K over the allowed (causal) keys, w_ts = sign(p_ts)·e^{|p_ts|} / Σ_s' e^{|p_ts'|},
so Σ_s |w_ts| = 1 and a head can subtract values as well as add them. Masked keys weigh 0.

`cog_attention_reference` materialises the [B, H, T, S] weights in float32 (a transcription of
the authors' `CogAttention.forward`). `cog_attention_blocked` is flash-style: an online softmax
over |P| (running max of |P| and running denominator) with a `lax.scan` over key blocks of
`block` keys, so only [B, H, T, block] scores live at once; the scan body is rematerialised
in the backward pass, so the gradient keeps O(T·block) score memory too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.ops.attention import _mask_BTS

IMPLS = ("auto", "reference", "xla")


def _scores_BHTS(q_BTHK, k_BSGK):
    """P = q·kᵀ/√K in float32, kv heads repeated up to H."""
    h, kd = q_BTHK.shape[2:]
    g = k_BSGK.shape[2]
    k = jnp.repeat(k_BSGK.astype(jnp.float32), h // g, axis=2)
    return jnp.einsum("BTHK,BSHK->BHTS", q_BTHK.astype(jnp.float32), k) * kd**-0.5


def cog_attention_reference(
    q_BTHK: jax.Array,
    k_BSGK: jax.Array,
    v_BSGV: jax.Array,
    *,
    causal: bool = True,
    segment_ids_BT: jax.Array | None = None,
    kv_segment_ids_BS: jax.Array | None = None,
    q_positions_BT: jax.Array | None = None,
    kv_positions_BS: jax.Array | None = None,
) -> jax.Array:
    """q: [B, T, H, K], k: [B, S, G, K], v: [B, S, G, V] (G divides H) → [B, T, H, V].

    Positions / segment ids mask as in `jaxllm.ops.attention_reference`; rows with no allowed
    key return zeros.
    """
    t, h = q_BTHK.shape[1:3]
    s, g = k_BSGK.shape[1:3]
    p_BHTS = _scores_BHTS(q_BTHK, k_BSGK)
    mask = _mask_BTS(
        q_positions_BT, kv_positions_BS, segment_ids_BT, kv_segment_ids_BS, t, s, causal
    )
    a_BHTS = jnp.abs(p_BHTS)
    if mask is not None:
        a_BHTS = jnp.where(mask[:, None], a_BHTS, -jnp.inf)
    m = jnp.max(a_BHTS, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.exp(a_BHTS - m)
    denom = jnp.sum(e, axis=-1, keepdims=True)
    w_BHTS = jnp.sign(p_BHTS) * e / jnp.where(denom == 0, 1.0, denom)
    v = jnp.repeat(v_BSGV.astype(jnp.float32), h // g, axis=2)
    return jnp.einsum("BHTS,BSHV->BTHV", w_BHTS, v).astype(q_BTHK.dtype)


def cog_attention_blocked(
    q_BTHK: jax.Array,
    k_BSGK: jax.Array,
    v_BSGV: jax.Array,
    *,
    causal: bool = True,
    segment_ids_BT: jax.Array | None = None,
    kv_segment_ids_BS: jax.Array | None = None,
    q_positions_BT: jax.Array | None = None,
    kv_positions_BS: jax.Array | None = None,
    block: int = 128,
) -> jax.Array:
    """Same contract as `cog_attention_reference`, blocked over keys (any S, padded inside)."""
    b, t, h = q_BTHK.shape[:3]
    s, g, vd = k_BSGK.shape[1], k_BSGK.shape[2], v_BSGV.shape[3]
    block = max(1, min(block, s))
    n = -(-s // block)
    pad = n * block - s
    qp = q_positions_BT if q_positions_BT is not None else jnp.arange(t)[None]
    kp = kv_positions_BS if kv_positions_BS is not None else jnp.arange(s)[None]
    kp = jnp.broadcast_to(kp, (kp.shape[0], s))
    # Padded keys are invalid: a False "valid" flag removes them whatever the mask says.
    valid_BS = jnp.ones((1, s), bool)
    kseg = kv_segment_ids_BS if kv_segment_ids_BS is not None else segment_ids_BT

    def blocks(x, axis=1):
        x = jnp.pad(x, [(0, pad if i == axis else 0) for i in range(x.ndim)])
        x = x.reshape(*x.shape[:axis], n, block, *x.shape[axis + 1 :])
        return jnp.moveaxis(x, axis, 0)

    xs = (blocks(k_BSGK), blocks(v_BSGV), blocks(kp), blocks(valid_BS))
    if kseg is not None:
        xs = (*xs, blocks(kseg))
    q32 = q_BTHK.astype(jnp.float32)

    @jax.checkpoint
    def body(carry, x):
        m_BHT, l_BHT, acc_BTHV = carry
        k_b, v_b, kp_b, ok_b = x[:4]
        p_BHTC = _scores_BHTS(q32, k_b)
        allowed = ok_b[:, None, :]
        if causal:
            allowed = allowed & (kp_b[:, None, :] <= qp[:, :, None])
        if kseg is not None:
            allowed = allowed & (segment_ids_BT[:, :, None] == x[4][:, None, :])
        a_BHTC = jnp.where(allowed[:, None], jnp.abs(p_BHTC), -jnp.inf)
        m_new = jnp.maximum(m_BHT, jnp.max(a_BHTC, axis=-1))
        # Rows that have seen no allowed key yet keep a finite reference point of 0.
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        corr = jnp.exp(jnp.where(jnp.isfinite(m_BHT), m_BHT, 0.0) - m_safe)
        e_BHTC = jnp.exp(a_BHTC - m_safe[..., None])
        l_new = l_BHT * corr + jnp.sum(e_BHTC, axis=-1)
        v = jnp.repeat(v_b.astype(jnp.float32), h // g, axis=2)
        pv = jnp.einsum("BHTC,BCHV->BTHV", jnp.sign(p_BHTC) * e_BHTC, v)
        acc = acc_BTHV * jnp.moveaxis(corr, 1, 2)[..., None] + pv
        return (m_new, l_new, acc), None

    init = (
        jnp.full((b, h, t), -jnp.inf, jnp.float32),
        jnp.zeros((b, h, t), jnp.float32),
        jnp.zeros((b, t, h, vd), jnp.float32),
    )
    (_, l_BHT, acc_BTHV), _ = jax.lax.scan(body, init, xs)
    l_BTH = jnp.moveaxis(l_BHT, 1, 2)
    out = acc_BTHV / jnp.where(l_BTH == 0, 1.0, l_BTH)[..., None]
    return out.astype(q_BTHK.dtype)


def cog_attention(
    q_BTHK: jax.Array,
    k_BSGK: jax.Array,
    v_BSGV: jax.Array,
    *,
    causal: bool = True,
    segment_ids_BT: jax.Array | None = None,
    kv_segment_ids_BS: jax.Array | None = None,
    q_positions_BT: jax.Array | None = None,
    kv_positions_BS: jax.Array | None = None,
    impl: str = "auto",
    block: int = 128,
) -> jax.Array:
    """Cog attention; `impl`: reference (materialised) | xla (blocked online softmax) | auto.

    `auto` takes the materialised form when S fits one block and the blocked form otherwise.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    kw = dict(
        causal=causal, segment_ids_BT=segment_ids_BT, kv_segment_ids_BS=kv_segment_ids_BS,
        q_positions_BT=q_positions_BT, kv_positions_BS=kv_positions_BS,
    )  # fmt: skip
    if impl == "reference" or (impl == "auto" and k_BSGK.shape[1] <= block):
        return cog_attention_reference(q_BTHK, k_BSGK, v_BSGV, **kw)
    return cog_attention_blocked(q_BTHK, k_BSGK, v_BSGV, block=block, **kw)
