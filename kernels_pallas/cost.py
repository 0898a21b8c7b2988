"""The FLOPs our Mosaic kernels declare (`pl.CostEstimate`): XLA counts a custom call as 0
FLOPs and schedules around it blind, so each TPU `pallas_call` says what its matmuls do.

Chunked linear attention (the lightning and GLA kernels), per chunk of C tokens and V tile of
width bv, counted from the kernels' matmuls (the decay and gate arithmetic is elementwise):
  forward  q·kᵀ, A·v, q·S and the state update kᵀ·v          2C²K + 2C²bv + 4CK·bv
  dq       dO·vᵀ, dA·k, dO·Sᵀ and the rebuilt state          2C²K + 2C²bv + 4CK·bv
  dk, dv   dO·vᵀ, q·kᵀ, dAᵀ·q, Aᵀ·dO, v·dSᵀ, k·dS, dS update 4C²K + 4C²bv + 6CK·bv
           with the lightning decay's gradient: 3 more state-sized products  + 6CK·bv
so a pass over [B, H, T] costs B·H·(T/C)·(V/bv) times its line.
"""

from __future__ import annotations

import math

from jax.experimental import pallas as pl

# (C², CK·bv) coefficients of each sweep's per-chunk matmul FLOPs: a·C²(K + bv) + b·CK·bv
_SWEEPS = {"forward": (2, 4), "dq": (2, 4), "dkv": (4, 6), "dkv_decay": (4, 12)}


def _bytes(arrays) -> int:
    return sum(math.prod(a.shape) * a.dtype.itemsize for a in arrays)


def chunked_linear(sweep: str, B, H, T, K, V, *, C, block_v, arrays) -> pl.CostEstimate:
    """One sweep of a chunked linear-attention kernel over [B, H, T] (`_SWEEPS`); `arrays`:
    its inputs and outputs (shapes and dtypes), read or written once."""
    a, b = _SWEEPS[sweep]
    per_chunk = a * C * C * (K + block_v) + b * C * K * block_v
    flops = B * H * (T // C) * (V // block_v) * per_chunk
    return pl.CostEstimate(flops=flops, transcendentals=0, bytes_accessed=_bytes(arrays))


def matmul(m: int, n: int, k: int, *, arrays) -> pl.CostEstimate:
    """An [m, k] · [k, n] product."""
    return pl.CostEstimate(flops=2 * m * n * k, transcendentals=0, bytes_accessed=_bytes(arrays))
