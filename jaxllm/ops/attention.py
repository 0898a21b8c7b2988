"""Softmax attention with grouped-query heads, causal and packed-sequence masking.

`attention` picks a path. `reference` is the plain float32 formula. `xla` (and `cudnn`, asked
for by name) go through `jax.nn.dot_product_attention`; its XLA form builds the [B, H, T, S]
scores in float32 and, for packed rows or positions, a dense [B, T, S] mask. `auto` chooses by
the platform the program is *lowered* for (`lax.platform_dependent`, so a TPU compile from a
CPU host gets the TPU path), falling back to the XLA form wherever a fast path's check
(`attention_splash.unsupported`, `cudnn_unsupported`) names a reason:

- TPU: splash attention (`jaxllm.ops.attention_splash`): causal, packed documents, GQA.
- CUDA: cuDNN flash attention for rows without segment ids (see `cudnn_unsupported`); packed
  rows (a train batch) take our Triton flash kernel (`kernels_pallas.flash_attention`: causal
  blocks skipped, GQA read in place; `flash_unsupported`); what both refuse takes
  `attention_blocked`, the XLA form 512 query rows at a time, rematerialised: [B, H, 512, S]
  scores at once instead of [B, H, T, S].
- with absolute positions (prefill / decode against a cache, all-gather sequence
  parallelism), on every platform: the XLA form, and beyond `BLOCK` queries `attention_blocked`
  over `BLOCK` of them at a time, so a long prompt's prefill holds [B, H, 512, S] scores, not
  [B, H, T, S]. A decode step's score row is [T≤few, S]: small, the XLA form as is.
- elsewhere (the CPU): the XLA form.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

import kernels_pallas.flash_attention as kernels_flash
from jaxllm.ops import attention_splash

IMPLS = ("auto", "reference", "xla", "cudnn", "splash", "flash")
BLOCK = 512  # query rows per step of `attention_blocked` where positions are given
# cuDNN 9.27 returns wrong dq / dk from 2^31 query elements per device (issue 18); the op sees
# global shapes under GSPMD, so this bound is conservative on a mesh.
CUDNN_MAX_Q_ELEMENTS = 2**31


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


@functools.cache
def _cudnn_on_host() -> bool:
    """Whether jax finds cuDNN here. Tracing a cuDNN call without it raises, and
    `platform_dependent` traces every branch, so without it the CUDA branch is the XLA form."""
    from jax._src.cudnn import fused_attention_stablehlo as fa

    try:
        fa.check_cudnn_version()
    except RuntimeError:
        return False
    return True


def cudnn_unsupported(
    q_BTHK: jax.Array,
    k_BSGK: jax.Array,
    v_BSGV: jax.Array,
    *,
    causal: bool,
    segment_ids_BT: jax.Array | None,
    kv_segment_ids_BS: jax.Array | None,
    q_positions_BT: jax.Array | None,
    kv_positions_BS: jax.Array | None,
) -> str | None:
    """Why cuDNN flash attention is not used for these inputs, or None when it is.

    Packed rows go to the Triton flash kernel (`flash_unsupported`): `jax.nn.dot_product_attention`
    (jax 0.10.2) reaches cuDNN only with per-row lengths (`query_seq_lengths`: padding, one
    document per row). The packed THD form (`q_offsets` / `kv_offsets` in the private
    `jax._src.cudnn.fused_attention_stablehlo.dot_product_attention`, Hopper only) needs a
    static maximum document count per row, and cuDNN builds its graphs on the device, so a
    compile for an H200 without one (`gpu_aot`) cannot say whether it accepts a call. A dense
    mask (`impl="cudnn"` by name) reaches cuDNN as a [B, 1, T, S] bf16 bias whose gradient
    jax 0.10.2 always exports (`should_export_dbias`); whether cuDNN takes that head-broadcast
    bias gradient needs a GPU too, so `auto` does not choose it.
    """
    t, kd = q_BTHK.shape[1], q_BTHK.shape[-1]
    if segment_ids_BT is not None or kv_segment_ids_BS is not None:
        return "packed documents (segment ids)"
    if q_positions_BT is not None or kv_positions_BS is not None:
        return "absolute positions (cache / sequence-parallel)"
    if k_BSGK.shape[1] != t:
        return "S != T"
    if not causal:
        return "non-causal"
    if q_BTHK.dtype not in (jnp.bfloat16, jnp.float16) or k_BSGK.dtype != q_BTHK.dtype:
        return "cuDNN takes bfloat16 / float16 only"
    if kd > 256 or kd % 8 or v_BSGV.shape[-1] != kd:
        return f"head dim {kd} (cuDNN: <= 256, a multiple of 8, V's equal to K's)"
    if q_BTHK.size >= CUDNN_MAX_Q_ELEMENTS:
        return f"{q_BTHK.size} query elements >= 2^31 (wrong gradients on cuDNN 9.27)"
    if not _cudnn_on_host():
        return "cuDNN not found on this host"
    return None


def flash_unsupported(
    q_BTHK: jax.Array,
    k_BSGK: jax.Array,
    v_BSGV: jax.Array,
    *,
    kv_segment_ids_BS: jax.Array | None,
    q_positions_BT: jax.Array | None,
    kv_positions_BS: jax.Array | None,
) -> str | None:
    """Why `auto` does not give these inputs to the Triton flash kernel on CUDA, or None."""
    if q_positions_BT is not None or kv_positions_BS is not None or kv_segment_ids_BS is not None:
        return "positions or separate key ids (cache / sequence-parallel)"
    if q_BTHK.dtype not in (jnp.bfloat16, jnp.float16) or k_BSGK.dtype != q_BTHK.dtype:
        return "bfloat16 / float16 only (float32 keeps the exact XLA form)"
    if why := kernels_flash.unsupported(q_BTHK, k_BSGK, v_BSGV):
        return why
    if not kernels_flash.gpu_available():
        return "the Triton kernels do not import here"
    return None


def _dot_product_attention(
    q_BTHK, k_BSGK, v_BSGV, *, causal, scale, implementation, **kw
) -> jax.Array:
    """`jax.nn.dot_product_attention` with this op's masking contract (`kw`: ids, positions)."""
    t, s = q_BTHK.shape[1], k_BSGK.shape[1]
    qp, kp = kw["q_positions_BT"], kw["kv_positions_BS"]
    plain_causal = causal and qp is None and kp is None and t == s
    mask = None
    if not plain_causal or kw["segment_ids_BT"] is not None:
        mask = _mask_BTS(qp, kp, kw["segment_ids_BT"], kw["kv_segment_ids_BS"], t, s, causal)
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
            implementation=implementation,
        )
    if mask is not None:
        # A query row with no allowed key (a padded decode slot) gives zeros, as the reference.
        out = jnp.where(jnp.any(mask, axis=-1)[..., None, None], out, 0)
    return out


def query_block(t: int, s: int) -> int | None:
    """Rows per step of `attention_blocked` for a [t, s] self-attention: the largest of 512,
    256, 128 that divides t and is smaller than it (None: no blocking pays)."""
    if t != s:
        return None
    return next((c for c in (512, 256, 128) if t % c == 0 and c < t), None)


def attention_blocked(
    q_BTHK,
    k_BSGK,
    v_BSGV,
    *,
    block: int,
    causal: bool,
    scale,
    segment_ids_BT,
    kv_segment_ids_BS=None,
    q_positions_BT=None,
    kv_positions_BS=None,
) -> jax.Array:
    """The XLA form over `block` query rows at a time: [B, H, block, S] scores live at once,
    not [B, H, T, S]. Each step is rematerialised in the backward (`jax.checkpoint`), so
    neither pass keeps a [T, S] tensor. Same FLOPs as the XLA form (no block is skipped).

    Same contract as `attention_reference` (q: [B, T, H, K], k: [B, S, G, K], v: [B, S, G, V]
    → [B, T, H, V]); a T that `block` does not divide is padded with query rows that see no
    key and are cut off again.
    """
    b, t, h, kd = q_BTHK.shape
    s = k_BSGK.shape[1]
    pad = -t % block
    n = (t + pad) // block
    rows_pad = lambda x, value: jnp.pad(x, [(0, 0), (0, pad)], constant_values=value)
    qpos = q_positions_BT if q_positions_BT is not None else jnp.arange(t, dtype=jnp.int32)[None]
    kpos = kv_positions_BS if kv_positions_BS is not None else jnp.arange(s, dtype=jnp.int32)[None]
    # padded rows: segment -1 (with ids) or position -1 (causal) leaves them no key
    qpos = rows_pad(jnp.asarray(qpos, jnp.int32), -1)
    kseg = kv_segment_ids_BS if kv_segment_ids_BS is not None else segment_ids_BT
    q_NBCHK = jnp.pad(q_BTHK, [(0, 0), (0, pad), (0, 0), (0, 0)])
    q_NBCHK = q_NBCHK.reshape(b, n, block, h, kd).swapaxes(0, 1)
    pos_NBC = qpos.reshape(qpos.shape[0], n, block).swapaxes(0, 1)
    seg = None if segment_ids_BT is None else rows_pad(segment_ids_BT, -1)
    seg_NBC = None if seg is None else seg.reshape(b, n, block).swapaxes(0, 1)

    @jax.checkpoint
    def rows(xs):
        q_c, pos_c, seg_c = xs
        return _dot_product_attention(
            q_c, k_BSGK, v_BSGV, causal=causal, scale=scale, implementation="xla",
            segment_ids_BT=seg_c, kv_segment_ids_BS=kseg, q_positions_BT=pos_c,
            kv_positions_BS=kpos,
        )  # fmt: skip

    o_NBCHV = jax.lax.map(rows, (q_NBCHK, pos_NBC, seg_NBC))
    return o_NBCHV.swapaxes(0, 1).reshape(b, n * block, h, v_BSGV.shape[-1])[:, :t]


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
    """Same contract as `attention_reference`; `impl` in auto | reference | xla | cudnn | splash
    | flash.

    q: [B, T, H, K], k: [B, S, G, K], v: [B, S, G, V] → [B, T, H, V]. `auto`: splash when
    lowered for TPU, cuDNN when lowered for CUDA, each where its check passes
    (`attention_splash.unsupported`, `cudnn_unsupported`); on CUDA otherwise the Triton flash
    kernel (`flash_unsupported`: packed self-attention in bf16 / fp16), else
    `attention_blocked` for self-attention of T > 128 tokens; with positions and T > `BLOCK`
    queries (a long prefill) `attention_blocked` everywhere; the XLA form everywhere else.
    `splash` and `flash` ask for a kernel by name (flash: interpret mode off CUDA) and raise
    where it cannot run.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    kw = dict(
        segment_ids_BT=segment_ids_BT, kv_segment_ids_BS=kv_segment_ids_BS,
        q_positions_BT=q_positions_BT, kv_positions_BS=kv_positions_BS,
    )  # fmt: skip
    if impl == "reference":
        return attention_reference(q_BTHK, k_BSGK, v_BSGV, causal=causal, scale=scale, **kw)

    def splash(q, k, v):
        return attention_splash.splash_attention(
            q, k, v, segment_ids_BT=segment_ids_BT, causal=causal, scale=scale
        )

    def dpa(implementation):
        return lambda q, k, v: _dot_product_attention(
            q, k, v, causal=causal, scale=scale, implementation=implementation, **kw
        )

    splash_why = attention_splash.unsupported(q_BTHK, k_BSGK, v_BSGV, **kw)
    if impl == "splash":
        if splash_why is not None:
            raise ValueError(f"impl='splash' cannot run these inputs: {splash_why}")
        return splash(q_BTHK, k_BSGK, v_BSGV)

    def flash(q, k, v):
        return kernels_flash.flash_attention(q, k, v, segment_ids=segment_ids_BT, causal=causal,
                                             scale=scale)  # fmt: skip

    flash_why = flash_unsupported(
        q_BTHK, k_BSGK, v_BSGV, kv_segment_ids_BS=kv_segment_ids_BS,
        q_positions_BT=q_positions_BT, kv_positions_BS=kv_positions_BS,
    )  # fmt: skip
    if impl == "flash":
        if flash_why is not None:
            raise ValueError(f"impl='flash' cannot run these inputs: {flash_why}")
        return flash(q_BTHK, k_BSGK, v_BSGV)
    if impl != "auto":
        return dpa(impl)(q_BTHK, k_BSGK, v_BSGV)
    if q_positions_BT is not None and q_BTHK.shape[1] > BLOCK:
        # no fast path takes positions (splash, cuDNN refuse them): bound the scores instead
        return attention_blocked(q_BTHK, k_BSGK, v_BSGV, block=BLOCK, causal=causal,
                                 scale=scale, **kw)  # fmt: skip
    branches = {}
    if splash_why is None:
        branches["tpu"] = splash
    if cudnn_unsupported(q_BTHK, k_BSGK, v_BSGV, causal=causal, **kw) is None:
        branches["cuda"] = dpa("cudnn")
    elif flash_why is None:
        branches["cuda"] = flash
    elif (c := query_block(q_BTHK.shape[1], k_BSGK.shape[1])) and q_positions_BT is None:
        if kv_segment_ids_BS is None and kv_positions_BS is None:
            branches["cuda"] = lambda q, k, v: attention_blocked(
                q, k, v, block=c, causal=causal, scale=scale, segment_ids_BT=segment_ids_BT
            )
    if not branches:
        return dpa("xla")(q_BTHK, k_BSGK, v_BSGV)
    # Every branch is traced, only the lowering platform's is lowered (and compiled).
    return jax.lax.platform_dependent(q_BTHK, k_BSGK, v_BSGV, default=dpa("xla"), **branches)
