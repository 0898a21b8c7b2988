"""A projection's three GEMMs as 2-D matmuls, for the Pallas FP8 kernel (`precision.fp8_impl`).

``y = einsum("a,b->c", x, w)`` is a plain matmul ``Y[M, N] = X[M, K] · W[K, N]`` when every
letter of x is either contracted (K: in w, not in y) or kept (M: not in w), every letter of w
is contracted or kept (N), and y is M then N in x's and w's order (``"BTD,DHK->BTHK"``,
``"BTHK,HKD->BTD"``). Then the forward is ``X·W``, ``dX = dY·Wᵀ`` and ``dW = Xᵀ·dY``, with
only reshapes (and FP8 transposes for the backward) around the kernel. Other forms (a batch
letter shared by x, w and y as in per-expert weights, a letter summed within one operand,
reordered outputs) have no such plan and stay on XLA's dot_general.

On a mesh (under `jaxllm.parallel.core.rules.use_rules`) the kernel runs inside a `shard_map`:
XLA cannot partition a Mosaic call itself. Tokens stay split over the batch axes (data, fsdp,
expert); the right operand's columns (N: the output features of the forward, the input
features of dX, the weight's columns of dW) split over `tensor` when they divide into
128-wide groups per shard, so each tensor shard computes its slice of every GEMM (a
column-parallel weight arrives as it lies; a row-parallel one is exchanged all-to-all, no
more than the all-gather a replicated operand costs). Other axes are replicated into the map
(XLA gathers the FP8 weight, as FSDP gathers it anyway). The weight-gradient GEMM sums over
the tokens, so its per-shard results are summed with a psum. Inside a `shard_map` that made
some axes manual already (the FP8 all-reduce's per-replica one, over `data`) the map nests,
over the axes still automatic there; where none is left (or each has size 1) the kernel is
called as it is.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxllm.parallel.core.axes import BATCH_AXES, HEAD_AXES
from jaxllm.parallel.core.per_device import per_device
from jaxllm.precision import einsum as es
from kernels_pallas.fp8_matmul import fp8_matmul


@dataclasses.dataclass(frozen=True)
class Plan:
    """Letters of x (a) as M + K, of w (b) as K + N, of y (c) as M + N."""

    a: str
    b: str
    c: str
    m: str
    k: str
    n: str

    def x2(self, x: jax.Array) -> jax.Array:
        """x → [M, K]."""
        return _to_2d(x, self.a, self.m, self.k)

    def w2(self, w: jax.Array) -> jax.Array:
        """w → [K, N]."""
        return _to_2d(w, self.b, self.k, self.n)

    def y2(self, y: jax.Array) -> jax.Array:
        """y (or dy) → [M, N]."""
        return _to_2d(y, self.c, self.m, self.n)

    def sizes(self, x: jax.Array, other: jax.Array, other_is_w: bool) -> dict[str, int]:
        """Every letter's size, from x and w (forward) or x and dy (backward)."""
        return dict(zip(self.a, x.shape)) | dict(zip(self.b if other_is_w else self.c, other.shape))

    def y(self, y2: jax.Array, sizes: dict[str, int]) -> jax.Array:
        return _from_2d(y2, self.m, self.n, self.c, sizes)

    def x_back(self, x2: jax.Array, sizes: dict[str, int]) -> jax.Array:
        return _from_2d(x2, self.m, self.k, self.a, sizes)

    def w_back(self, w2: jax.Array, sizes: dict[str, int]) -> jax.Array:
        return _from_2d(w2, self.k, self.n, self.b, sizes)


def _to_2d(v: jax.Array, letters: str, rows: str, cols: str) -> jax.Array:
    vt = jnp.transpose(v, [letters.index(ch) for ch in rows + cols])
    return vt.reshape(math.prod(vt.shape[: len(rows)]), -1)


def _from_2d(v2: jax.Array, rows: str, cols: str, letters: str, sizes: dict[str, int]):
    vt = v2.reshape([sizes[ch] for ch in rows + cols])
    return jnp.transpose(vt, [(rows + cols).index(ch) for ch in letters])


@functools.cache
def plan(eq: str) -> Plan | None:
    """The 2-D form of ``einsum(eq, x, w)``, or None when it has none (module docstring) or
    is a matrix-vector product (N or M empty: padding it to a kernel block wastes 128×)."""
    a, b, c = es.parse(eq)
    k = es.inner(a, b, c)
    m = "".join(ch for ch in a if ch not in b)
    n = "".join(ch for ch in b if ch not in a)
    if not (m and k and n) or c != m + n or len(m + k) != len(a) or len(k + n) != len(b):
        return None
    return Plan(a, b, c, m, k, n)


GROUP = 128  # the kernel's fine-grained scale group


def matmul(p8: jax.Array, q8: jax.Array, sp, sq, out_dtype, *, tokens: str) -> jax.Array:
    """The kernel's ``p8 @ q8`` with dequantization multipliers `sp`, `sq` (per tensor or
    fine-grained, `kernels_pallas.fp8_matmul`), cast to `out_dtype`.

    tokens: where the token dim is — "rows" (p8's rows: the forward and dX GEMMs) or "inner"
    (the contraction: the dW GEMM) — which decides how the GEMM splits over a mesh.
    """
    sp, sq = jnp.asarray(sp, jnp.float32), jnp.asarray(sq, jnp.float32)
    inner = tokens == "inner"
    kernel_out = (
        jnp.dtype(out_dtype)
        if jnp.dtype(out_dtype) == jnp.dtype(jnp.bfloat16) and not inner
        else jnp.dtype(jnp.float32)  # a psum of partial sums runs in float32
    )
    # nested in a shard_map (the FP8 all-reduce's per-replica one, manual over `data`), the
    # map splits over the axes still automatic there: the tokens it sees are that slice's
    dm = per_device()
    if dm is None or not dm.kernel_needs_map:
        return fp8_matmul(p8, q8, sp, sq, out_dtype=kernel_out).astype(out_dtype)
    n_tok = p8.shape[1] if inner else p8.shape[0]
    # whole scale groups per shard when the scales run along the tokens (dW, fine-grained)
    t = dm.axes(BATCH_AXES, n_tok, unit=GROUP if inner and sp.ndim == 2 else 1)
    # N in 128-wide groups per tensor shard: whole weight blocks of a fine-grained sq, and
    # kernel tiles that need no padding
    c = dm.axes(HEAD_AXES, q8.shape[1], unit=GROUP)
    if inner:  # p8 [K, M], q8 [M, N], sp [K, M/128] | (), sq [M/128, N] | ()
        specs = (
            P(None, t),
            P(t, c),
            P(None, t) if sp.ndim else P(),
            P(t, c) if sq.ndim else P(),
        )
        out_spec = P(None, c)
    else:  # p8 [M, K], q8 [K, N], sp [M, K/128] | (), sq [K/128, N/128 | N] | ()
        specs = (
            P(t, None),
            P(None, c),
            P(t, None) if sp.ndim else P(),
            P(None, c) if sq.ndim else P(),
        )
        out_spec = P(t, c)

    def local(p8, q8, sp, sq):
        y = fp8_matmul(p8, q8, sp, sq, out_dtype=kernel_out)
        return jax.lax.psum(y, t) if inner and t else y

    return dm(local, in_specs=specs, out_specs=out_spec)(p8, q8, sp, sq).astype(out_dtype)
