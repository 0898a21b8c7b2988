"""The plain grouped expert GEMM: ``jax.lax.ragged_dot`` everywhere, megablox `gmm` on TPU.

``y_MN = grouped_matmul(x_MK, w_EKN, sizes_E)``: the M rows are sorted by group, ``sizes_E[e]``
rows multiplied by ``w_EKN[e]``; rows past ``sum(sizes_E)`` give zeros. On TPU XLA lowers
ragged_dot's forward and row gradient to grouped kernels, but the weight gradient (grouped
over the contracted rows) to a masked product over every group: E times its FLOPs. Megablox
computes Y and dX with `gmm` and dW with `tgmm`, all three grouped.

On GPU XLA (jax 0.10.2) expands ragged_dot and both gradients into dense products over every
group: E times the FLOPs (an H200 compile of the forward + backward at M 32768, K 2048,
N 2816, E 8 counts 8.0× the grouped work; measured: 13% of the dense rate). `impl="mosaic_gpu"`
runs jax's Hopper grouped-GEMM kernels instead (`jax.experimental.pallas.ops.gpu`:
`ragged_dot_mgpu` for Y and dX, `transposed_ragged_dot_mgpu` for dW; Mosaic GPU, sm_90, no
interpret mode), where `mosaic_gpu_unsupported` accepts the call. It is asked for by name
until a GPU session has measured it against the XLA and blocked forms
(`benchmarks/moe.py`'s grouped-GEMM table).

`impl="auto"` picks by lowering platform (`lax.platform_dependent`), so a TPU compile traced
on a CPU host (AOT) takes megablox. Mosaic kernels cannot be partitioned automatically, so
"auto" takes megablox only where the call runs unpartitioned: no multi-device mesh active
(`jaxllm.parallel.core.rules.use_rules`), or inside a `shard_map` that made every mesh axis manual.
`interpret=True` runs megablox's kernels on the CPU, for tests.
"""

from __future__ import annotations

import functools
import importlib
from typing import Literal

import jax
import jax.numpy as jnp

from jaxllm.parallel.core.rules import active_mesh

# the kernel module (gmm, tgmm); the package's `gmm` attribute is its custom_vjp wrapper
megablox = importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")

Impl = Literal["auto", "xla", "megablox", "mosaic_gpu"]
# jax's example tuning space's middle: 128 × 128 output tiles, 64-deep K steps, 4 in flight
MGPU_BLOCKS = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=1)


def grouped_matmul_reference(x_MK, w_EKN, sizes_E, preferred_element_type=None):
    """[M, N]: ``jax.lax.ragged_dot`` (the XLA path)."""
    return jax.lax.ragged_dot(x_MK, w_EKN, sizes_E, preferred_element_type=preferred_element_type)


def grouped_matmul(
    x_MK: jax.Array,
    w_EKN: jax.Array,
    sizes_E: jax.Array,
    *,
    preferred_element_type=None,
    impl: Impl = "auto",
    interpret: bool = False,
) -> jax.Array:
    """[M, N] in `preferred_element_type` (default: x and w's promoted dtype).

    x_MK: rows sorted by group; w_EKN: one [K, N] matrix per group; sizes_E: rows per group.
    impl: "xla" ragged_dot, "megablox" gmm/tgmm (TPU, or any backend with `interpret`),
    "auto" megablox when lowering for TPU unpartitioned (see above), else ragged_dot.
    """
    out = jnp.dtype(preferred_element_type or jnp.result_type(x_MK.dtype, w_EKN.dtype))
    xla = functools.partial(grouped_matmul_reference, preferred_element_type=out)
    mega = functools.partial(_megablox, out_dtype=out, interpret=interpret)
    if impl == "xla":
        return xla(x_MK, w_EKN, sizes_E)
    if impl == "megablox":
        return mega(x_MK, w_EKN, sizes_E)
    if impl == "mosaic_gpu":
        if why := mosaic_gpu_unsupported(x_MK, w_EKN, out):
            raise ValueError(f"grouped_matmul(impl='mosaic_gpu') cannot run this call: {why}")
        return _mgpu(x_MK, w_EKN, sizes_E.astype(jnp.int32))
    if impl == "auto":
        if not _unpartitioned():
            return xla(x_MK, w_EKN, sizes_E)
        return jax.lax.platform_dependent(x_MK, w_EKN, sizes_E, tpu=mega, default=xla)
    raise ValueError(f"unknown grouped_matmul impl {impl!r}")


def _unpartitioned() -> bool:
    """Whether this trace runs once per device with nothing left to GSPMD: in a `shard_map`
    whose manual axes are all the mesh's, or outside one with no multi-device mesh active."""
    abstract = jax.sharding.get_abstract_mesh()
    if abstract.manual_axes:
        return set(abstract.manual_axes) == set(abstract.axis_names)
    mesh = active_mesh()
    return mesh is None or mesh.size == 1


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def _tiling(m: int, k: int, n: int, itemsize: int) -> tuple[int, int, int]:
    """(tm, tk, tn). Large k/n tiles cut HBM traffic (each x tile is re-read once per n tile):
    (512, 1024, 1024) in bf16 reads ~3x fewer bytes than megablox's default 128³ and fits
    v5e's default scoped VMEM; halved for 4-byte inputs. A k or n smaller than its tile is
    one full-width tile; a remainder past the tile is masked by the kernels. m is padded to
    a multiple of tm by the caller."""
    big = 1024 if itemsize <= 2 else 512
    return min(512, _round_up(m, 16)), min(big, k), min(big, n)


def _megablox(x_MK, w_EKN, sizes_E, *, out_dtype, interpret):
    return _gmm(x_MK, w_EKN, sizes_E.astype(jnp.int32), out_dtype, interpret)


def _pad_rows(a, m_pad):
    return jnp.pad(a, ((0, m_pad - a.shape[0]), (0, 0)))


def _rows_in_groups(y, sizes_E):
    # gmm leaves rows past the last group unwritten (tiles it never visits)
    row = jax.lax.broadcasted_iota(jnp.int32, (y.shape[0], 1), 0)
    return jnp.where(row < jnp.sum(sizes_E), y, 0).astype(y.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gmm(x_MK, w_EKN, sizes_E, out_dtype, interpret):
    return _gmm_fwd(x_MK, w_EKN, sizes_E, out_dtype, interpret)[0]


def _gmm_fwd(x_MK, w_EKN, sizes_E, out_dtype, interpret):
    m, k = x_MK.shape
    n = w_EKN.shape[2]
    tiling = _tiling(m, k, n, x_MK.dtype.itemsize)
    y = megablox.gmm(
        _pad_rows(x_MK, _round_up(m, tiling[0])), w_EKN, sizes_E, out_dtype, tiling,
        interpret=interpret,
    )  # fmt: skip
    return _rows_in_groups(y[:m], sizes_E), (x_MK, w_EKN, sizes_E)


def _gmm_bwd(out_dtype, interpret, res, dy_MN):
    x_MK, w_EKN, sizes_E = res
    m, k = x_MK.shape
    n = w_EKN.shape[2]
    tiling = _tiling(m, k, n, x_MK.dtype.itemsize)
    m_pad = _round_up(m, tiling[0])
    dy = _pad_rows(dy_MN.astype(x_MK.dtype), m_pad)
    # dX = dY Wᵀ: gmm over [M, N] · [E, N, K] (k and n swap roles: tiling is (tm, tn, tk))
    dx = megablox.gmm(dy, w_EKN, sizes_E, x_MK.dtype, (tiling[0], tiling[2], tiling[1]),
                      transpose_rhs=True, interpret=interpret)  # fmt: skip
    # dW[e] = X[rows of e]ᵀ dY[rows of e]: tgmm, grouped over the contracted rows
    dw = megablox.tgmm(_pad_rows(x_MK, m_pad).T, dy, sizes_E, w_EKN.dtype, tiling,
                       interpret=interpret)  # fmt: skip
    return _rows_in_groups(dx[:m], sizes_E), dw, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


# ------------------------------------------------------------------ Mosaic GPU (Hopper)


def mosaic_gpu_unsupported(x_MK, w_EKN, out_dtype) -> str | None:
    """Why jax's Hopper grouped-GEMM kernels cannot run this call, or None: operands and result
    in one 16-bit float dtype, K and N multiples of the 128-wide tiles (dW tiles [K, N])."""
    k, n = w_EKN.shape[1:]
    if x_MK.dtype != w_EKN.dtype or x_MK.dtype not in (jnp.bfloat16, jnp.float16):
        return "operands of one dtype, bfloat16 or float16"
    if jnp.dtype(out_dtype) != x_MK.dtype:
        return "the result in the operands' dtype"
    tile = MGPU_BLOCKS["block_m"]
    if k % tile or n % MGPU_BLOCKS["block_n"]:
        return f"K {k} and N {n} multiples of {tile}"
    try:
        _mgpu_kernels()
    except ImportError as e:  # Mosaic GPU needs jaxlib's CUDA extension
        return f"Mosaic GPU does not import here ({e})"
    return None


def _mgpu_kernels():
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu, transposed_ragged_dot_mgpu

    return ragged_dot_mgpu.ragged_dot, transposed_ragged_dot_mgpu.transposed_ragged_dot


@jax.custom_vjp
def _mgpu(x_MK, w_EKN, sizes_E):
    ragged_dot, _ = _mgpu_kernels()
    y = ragged_dot(x_MK, w_EKN, group_sizes=sizes_E, **MGPU_BLOCKS)
    return _rows_in_groups(y, sizes_E)


def _mgpu_fwd(x_MK, w_EKN, sizes_E):
    return _mgpu(x_MK, w_EKN, sizes_E), (x_MK, w_EKN, sizes_E)


def _mgpu_bwd(res, dy_MN):
    x_MK, w_EKN, sizes_E = res
    ragged_dot, transposed_ragged_dot = _mgpu_kernels()
    dy = dy_MN.astype(x_MK.dtype)
    # dX = dY Wᵀ per group; dW[e] = X[rows of e]ᵀ dY[rows of e], grouped over the rows
    dx = ragged_dot(dy, w_EKN, group_sizes=sizes_E, transpose_rhs=True, **MGPU_BLOCKS)
    dw = transposed_ragged_dot(x_MK, dy, group_sizes=sizes_E, **MGPU_BLOCKS)
    return _rows_in_groups(dx, sizes_E), dw.astype(w_EKN.dtype), None


_mgpu.defvjp(_mgpu_fwd, _mgpu_bwd)
