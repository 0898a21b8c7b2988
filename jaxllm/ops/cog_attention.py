"""Cog attention (Lv et al. 2411.07176): signed attention weights `sign(P) ⊙ softmax(|P|)`.

With P = q·kᵀ/√K over the allowed (causal) keys, w_ts = sign(p_ts)·e^{|p_ts|} / Σ_s' e^{|p_ts'|},
so Σ_s |w_ts| = 1 and a head can subtract values as well as add them. Masked keys weigh 0.

`cog_attention_reference` materialises the [B, H, T, S] weights in float32 (a transcription of
the authors' `CogAttention.forward`). `cog_attention_chunked` never forms [T, S]: a `lax.scan`
over key tiles of C keys keeps an online softmax over |P| (running max of |P| and running
denominator, float32) and accumulates sign(P)·e^{|P|−m}·V; its `custom_vjp` saves only the
output and each row's log-sum-exp and recomputes a tile's weights in the backward scan, so
training memory is O(T·C) as well.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxllm.ops.attention import _mask_BTS

IMPLS = ("auto", "reference", "chunked")


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


def _tiles(x: jax.Array, n: int, chunk: int) -> jax.Array:
    """[B, S, ...] → [n, B, chunk, ...], zero-padding S up to n·chunk."""
    pad = n * chunk - x.shape[1]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(x.shape[0], n, chunk, *x.shape[2:]), 1, 0)


def _allowed_BTC(qpos_BT, qseg_BT, kpos_BC, kseg_BC, ok_BC, causal: bool) -> jax.Array:
    """Boolean [B|1, 1, 1, T, C] for one key tile (broadcasts over G and H/G)."""
    allowed = ok_BC[:, None, :] & (qseg_BT[:, :, None] == kseg_BC[:, None, :])
    if causal:
        allowed = allowed & (kpos_BC[:, None, :] <= qpos_BT[:, :, None])
    return allowed[:, None, None]


def _prepare(q_BTHK, k_BSGK, v_BSGV, qpos_BT, kpos_BS, qseg_BT, kseg_BS, chunk):
    """Grouped, pre-scaled float32 queries [B, T, G, H/G, K] and the key-side tiles."""
    b, t, h, kd = q_BTHK.shape
    s, g = k_BSGK.shape[1:3]
    n = -(-s // chunk)
    qs_BTGRK = q_BTHK.astype(jnp.float32).reshape(b, t, g, h // g, kd) * kd**-0.5
    # Padded key slots are removed by a False `ok` whatever the positions and segments say.
    ok_1S = jnp.ones((1, s), bool)
    xs = tuple(_tiles(x, n, chunk) for x in (k_BSGK, v_BSGV, kpos_BS, kseg_BS, ok_1S))
    return qs_BTGRK, xs


def _chunked_forward(causal, chunk, q_BTHK, k_BSGK, v_BSGV, qpos_BT, kpos_BS, qseg_BT, kseg_BS):
    """→ (out [B, T, H, V] float32, row log-sum-exp of |P| [B, G, H/G, T] float32; 0 on rows
    with no allowed key, whose output is 0)."""
    b, t, h, _ = q_BTHK.shape
    g, vd = v_BSGV.shape[2:]
    qs, xs = _prepare(q_BTHK, k_BSGK, v_BSGV, qpos_BT, kpos_BS, qseg_BT, kseg_BS, chunk)

    def body(carry, tile):
        m_BGRT, l_BGRT, acc_BGRTV = carry
        k_c, v_c, kpos_c, kseg_c, ok_c = tile
        p = jnp.einsum("BTGRK,BCGK->BGRTC", qs, k_c.astype(jnp.float32))
        allowed = _allowed_BTC(qpos_BT, qseg_BT, kpos_c, kseg_c, ok_c, causal)
        a = jnp.where(allowed, jnp.abs(p), -jnp.inf)
        m_new = jnp.maximum(m_BGRT, jnp.max(a, axis=-1))
        # Rows that have seen no allowed key yet keep a finite reference point of 0.
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        corr = jnp.exp(jnp.where(jnp.isfinite(m_BGRT), m_BGRT, 0.0) - m_safe)
        e = jnp.exp(a - m_safe[..., None])
        pv = jnp.einsum("BGRTC,BCGV->BGRTV", jnp.sign(p) * e, v_c.astype(jnp.float32))
        return (m_new, l_BGRT * corr + jnp.sum(e, axis=-1), acc_BGRTV * corr[..., None] + pv), None

    r = h // g
    init = (
        jnp.full((b, g, r, t), -jnp.inf, jnp.float32),
        jnp.zeros((b, g, r, t), jnp.float32),
        jnp.zeros((b, g, r, t, vd), jnp.float32),
    )
    (m, l, acc), _ = jax.lax.scan(body, init, xs)
    o_BGRTV = acc / jnp.where(l == 0, 1.0, l)[..., None]
    lse_BGRT = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), 0.0)
    return jnp.moveaxis(o_BGRTV, 3, 1).reshape(b, t, h, vd), lse_BGRT


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _cog_chunked(causal, chunk, q_BTHK, k_BSGK, v_BSGV, qpos_BT, kpos_BS, qseg_BT, kseg_BS):
    o, _ = _chunked_forward(causal, chunk, q_BTHK, k_BSGK, v_BSGV, qpos_BT, kpos_BS, qseg_BT,
                            kseg_BS)  # fmt: skip
    return o.astype(q_BTHK.dtype)


def _cog_chunked_fwd(causal, chunk, *args):
    o, lse = _chunked_forward(causal, chunk, *args)
    return o.astype(args[0].dtype), (args, o, lse)


def _cog_chunked_bwd(causal, chunk, res, do_BTHV):
    """Flash-style: each tile's weights are recomputed from the saved row log-sum-exp.

    With π = softmax(|P|) and W = sign(P)·π: dV = Wᵀ dO, dW = dO Vᵀ, and through the softmax
    and ∂|p|/∂p = sign(p), dP = sign(P)·π·(sign(P)·dW − D) with D_t = Σ_s W_ts dW_ts = dO_t·O_t.
    """
    (q_BTHK, k_BSGK, v_BSGV, qpos_BT, kpos_BS, qseg_BT, kseg_BS), o_BTHV, lse = res
    b, t, h, kd = q_BTHK.shape
    s, g = k_BSGK.shape[1:3]
    r, vd = h // g, v_BSGV.shape[3]
    qs, xs = _prepare(q_BTHK, k_BSGK, v_BSGV, qpos_BT, kpos_BS, qseg_BT, kseg_BS, chunk)
    to_BGRTV = lambda x: jnp.moveaxis(x.astype(jnp.float32).reshape(b, t, g, r, vd), 1, 3)
    do = to_BGRTV(do_BTHV)
    d_BGRT = jnp.sum(do * to_BGRTV(o_BTHV), axis=-1)

    def body(dqs_BTGRK, tile):
        k_c, v_c, kpos_c, kseg_c, ok_c = tile
        k_c, v_c = k_c.astype(jnp.float32), v_c.astype(jnp.float32)
        p = jnp.einsum("BTGRK,BCGK->BGRTC", qs, k_c)
        allowed = _allowed_BTC(qpos_BT, qseg_BT, kpos_c, kseg_c, ok_c, causal)
        pi = jnp.where(allowed, jnp.exp(jnp.abs(p) - lse[..., None]), 0.0)
        sign = jnp.sign(p)
        dv_c = jnp.einsum("BGRTC,BGRTV->BCGV", sign * pi, do)
        dw = jnp.einsum("BGRTV,BCGV->BGRTC", do, v_c)
        dp = sign * pi * (sign * dw - d_BGRT[..., None])
        dqs_BTGRK = dqs_BTGRK + jnp.einsum("BGRTC,BCGK->BTGRK", dp, k_c)
        return dqs_BTGRK, (jnp.einsum("BGRTC,BTGRK->BCGK", dp, qs), dv_c)

    dqs, (dk_n, dv_n) = jax.lax.scan(body, jnp.zeros_like(qs), xs)
    untile = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, -1, *x.shape[3:])[:, :s]
    dq = (dqs * kd**-0.5).reshape(b, t, h, kd)
    return (
        dq.astype(q_BTHK.dtype),
        untile(dk_n).astype(k_BSGK.dtype),
        untile(dv_n).astype(v_BSGV.dtype),
        None, None, None, None,
    )  # fmt: skip


_cog_chunked.defvjp(_cog_chunked_fwd, _cog_chunked_bwd)


def cog_attention_chunked(
    q_BTHK: jax.Array,
    k_BSGK: jax.Array,
    v_BSGV: jax.Array,
    *,
    causal: bool = True,
    segment_ids_BT: jax.Array | None = None,
    kv_segment_ids_BS: jax.Array | None = None,
    q_positions_BT: jax.Array | None = None,
    kv_positions_BS: jax.Array | None = None,
    chunk: int = 128,
) -> jax.Array:
    """Same contract as `cog_attention_reference`, in O(T·chunk) memory forward and backward.

    Keys are taken `chunk` at a time (S padded up inside); masks are built per tile from the
    positions and segment ids, and kv heads are never repeated up to H.
    """
    t, s = q_BTHK.shape[1], k_BSGK.shape[1]
    qpos = q_positions_BT if q_positions_BT is not None else jnp.arange(t)[None]
    kpos = kv_positions_BS if kv_positions_BS is not None else jnp.arange(s)[None]
    # No segment ids: every token shares segment 0, so the segment test is always true.
    if segment_ids_BT is None:
        qseg, kseg = jnp.zeros((1, t), jnp.int32), jnp.zeros((1, s), jnp.int32)
    else:
        qseg = segment_ids_BT
        kseg = kv_segment_ids_BS if kv_segment_ids_BS is not None else segment_ids_BT
    chunk = max(1, min(chunk, s))
    return _cog_chunked(causal, chunk, q_BTHK, k_BSGK, v_BSGV, qpos, kpos, qseg, kseg)


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
    chunk: int = 128,
) -> jax.Array:
    """Cog attention; `impl`: reference (materialised) | chunked (online softmax) | auto.

    `auto` takes the materialised form when S fits one chunk and the chunked form otherwise.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    kw = dict(
        causal=causal, segment_ids_BT=segment_ids_BT, kv_segment_ids_BS=kv_segment_ids_BS,
        q_positions_BT=q_positions_BT, kv_positions_BS=kv_positions_BS,
    )  # fmt: skip
    if impl == "reference" or (impl == "auto" and k_BSGK.shape[1] <= chunk):
        return cog_attention_reference(q_BTHK, k_BSGK, v_BSGV, **kw)
    return cog_attention_chunked(q_BTHK, k_BSGK, v_BSGV, chunk=chunk, **kw)
