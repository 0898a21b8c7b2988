"""Splash attention: the TPU flash-attention kernel behind `jaxllm.ops.attention` on TPU.

`jax.experimental.pallas.ops.tpu.splash_attention` computes softmax attention block by block
in VMEM, so neither the [T, S] scores nor a dense mask ever reach HBM; blocks that the causal
mask or the segment ids rule out entirely are skipped. GQA runs on the multi-head kernel with
the G kv heads as they are (query head h reads kv head h // (H/G)), nothing repeated.

What the kernel needs (read off `splash_attention_kernel.py` / `_mask_info.py`, jax 0.10.2),
checked by `unsupported`:
- self-attention over one packed row: S == T, causal by token index, one set of segment ids
  for queries and keys (no absolute positions: the decoder's cache path and the all-gather
  sequence parallelism pass those and keep the XLA form);
- T a multiple of the block (blocks are multiples of the 128 lanes; we take 512, 256 or 128,
  the largest dividing T);
- not inside a `shard_map` with `check_vma=True`: jax's kernel builds its `pallas_call`
  outputs without the manual-axis types that check needs (sequence parallelism's softmax map
  runs with `check_vma=False` for this);
- float32 or bfloat16, G dividing H.
Head dims are run as multiples of 64 (Mosaic tiles; 64 and 128 compiled in tests/ops/
test_attention_aot.py): any other is zero-padded on the way in (q·kᵀ is unchanged, the scale
is the true head dim's) and v's padding sliced off the output, so Hunyuan-Large's 80 runs at
128 (1.6x the kernel's FLOPs, still no [T, S] tensor).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as sa
from jax.sharding import PartitionSpec as P

from jaxllm.parallel.core.axes import BATCH_AXES, HEAD_AXES
from jaxllm.parallel.core.per_device import per_device

BLOCKS = (512, 256, 128)
HEAD_DIM_UNIT = 64  # head dims the kernel runs at (others are zero-padded up to one)


def block_size(t: int) -> int | None:
    """The largest of `BLOCKS` that divides t (None: none does)."""
    return next((b for b in BLOCKS if t % b == 0), None)


def unsupported(
    q_BTHK: jax.Array,
    k_BSGK: jax.Array,
    v_BSGV: jax.Array,
    *,
    segment_ids_BT: jax.Array | None,
    kv_segment_ids_BS: jax.Array | None,
    q_positions_BT: jax.Array | None,
    kv_positions_BS: jax.Array | None,
) -> str | None:
    """Why splash cannot run these inputs, or None when it can."""
    t, h = q_BTHK.shape[1:3]
    s, g = k_BSGK.shape[1:3]
    if q_positions_BT is not None or kv_positions_BS is not None:
        return "absolute positions (cache / sequence-parallel) need a masked offset"
    if kv_segment_ids_BS is not None:
        return "separate kv segment ids"
    if s != t:
        return f"S={s} != T={t}"
    if block_size(t) is None:
        return f"T={t} is not a multiple of {BLOCKS[-1]}"
    if h % g:
        return f"{g} kv heads do not divide {h} heads"
    dts = {x.dtype for x in (q_BTHK, k_BSGK, v_BSGV)}
    if len(dts) != 1 or dts.pop() not in (jnp.float32, jnp.bfloat16):
        return "dtypes must be one of float32 / bfloat16, the same for q, k, v"
    if segment_ids_BT is not None and segment_ids_BT.dtype != jnp.int32:
        return "segment ids must be int32"
    if any(_varying(x) for x in (q_BTHK, k_BSGK, v_BSGV, segment_ids_BT)):
        return "inside a shard_map with check_vma (the kernel cannot type its outputs' variance)"
    return None


def _varying(x) -> bool:
    """Whether x is typed as varying over manual mesh axes (a `check_vma=True` shard_map)."""
    if x is None or not isinstance(x, jax.Array):
        return False
    mat = getattr(jax.typeof(x), "manual_axis_type", None)
    return bool(getattr(mat, "varying", None))


def _kernel(t: int, h: int, causal: bool, interpret: bool):
    b = block_size(t)
    one = sa.CausalMask((t, t)) if causal else sa.FullMask((t, t))
    blocks = sa.BlockSizes(
        block_q=b, block_kv=b, block_kv_compute=b,
        block_q_dkv=b, block_kv_dkv=b, block_kv_dkv_compute=b,
        block_q_dq=b, block_kv_dq=b,
    )  # fmt: skip
    return sa.make_splash_mha(
        sa.MultiHeadMask((one,) * h),
        block_sizes=blocks,
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )


def _local(q_BTHK, k_BTGK, v_BTGV, seg_BT, *, causal: bool, interpret: bool):
    """The kernel on this device's rows and heads, vmapped over B."""
    t, h = q_BTHK.shape[1:3]
    kernel = _kernel(t, h, causal, interpret)
    heads_first = functools.partial(jnp.swapaxes, axis1=0, axis2=1)  # [T, H, K] ↔ [H, T, K]

    def row(q_THK, k_TGK, v_TGV, seg_T):
        ids = None if seg_T is None else sa.SegmentIds(q=seg_T, kv=seg_T)
        o_HTV = kernel(heads_first(q_THK), heads_first(k_TGK), heads_first(v_TGV),
                       segment_ids=ids)  # fmt: skip
        return heads_first(o_HTV)

    return jax.vmap(row, in_axes=(0, 0, 0, None if seg_BT is None else 0))(
        q_BTHK, k_BTGK, v_BTGV, seg_BT
    )


def splash_attention(
    q_BTHK: jax.Array,
    k_BTGK: jax.Array,
    v_BTGV: jax.Array,
    *,
    segment_ids_BT: jax.Array | None = None,
    causal: bool = True,
    scale: float | None = None,
    interpret: bool = False,
) -> jax.Array:
    """softmax(q·kᵀ·scale + mask)·v by the splash kernel; inputs must pass `unsupported`.

    q: [B, T, H, K], k: [B, T, G, K], v: [B, T, G, V], segment_ids: [B, T] int32 (tokens
    attend within their own id) → [B, T, H, V] in q's dtype. `interpret` runs the kernel in
    Pallas interpret mode (any backend; for tests).

    XLA cannot partition a Mosaic custom call: on a mesh (under `use_rules`) the kernel runs in
    a `shard_map` over the axes no enclosing one made manual, rows split over the batch axes
    and heads over `tensor` (where G divides, so H does), as `lightning_attention` does.
    """
    kd, vd = q_BTHK.shape[-1], v_BTGV.shape[-1]
    scale = kd**-0.5 if scale is None else scale
    # The kernel takes no scale; MaxText scales q the same way.
    q_BTHK = _pad_last((q_BTHK * scale).astype(q_BTHK.dtype), HEAD_DIM_UNIT)
    k_BTGK = _pad_last(k_BTGK, HEAD_DIM_UNIT)
    v_BTGV = _pad_last(v_BTGV, HEAD_DIM_UNIT)
    return _mapped(q_BTHK, k_BTGK, v_BTGV, segment_ids_BT, causal, interpret)[..., :vd]


def _pad_last(x: jax.Array, unit: int) -> jax.Array:
    """x with its last dim zero-padded to a multiple of `unit`."""
    pad = -x.shape[-1] % unit
    return x if not pad else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])


def _mapped(q_BTHK, k_BTGK, v_BTGV, segment_ids_BT, causal: bool, interpret: bool):
    """`_local` on this device's rows and heads: directly, or in a shard_map on a mesh."""
    fn = functools.partial(_local, causal=causal, interpret=interpret)
    dm = per_device()
    if dm is None or not dm.kernel_needs_map:
        return fn(q_BTHK, k_BTGK, v_BTGV, segment_ids_BT)
    b = dm.axes(BATCH_AXES, q_BTHK.shape[0])
    heads = dm.axes(HEAD_AXES, k_BTGK.shape[2])
    x = P(b, None, heads, None)
    if segment_ids_BT is None:
        local = lambda q, k, v: fn(q, k, v, None)
        args, specs = (q_BTHK, k_BTGK, v_BTGV), (x, x, x)
    else:
        local, args, specs = fn, (q_BTHK, k_BTGK, v_BTGV, segment_ids_BT), (x, x, x, P(b, None))
    return dm(local, in_specs=specs, out_specs=x)(*args)
