"""The three GEMMs of a projection, and quantizing an operand along a GEMM's inner dims.

A projection ``y = einsum("a,b->c", x, w)`` (letters as in `jnp.einsum`, no ellipsis, no
repeated letters) has a forward GEMM and two backward GEMMs:

    Y  = einsum(a, b -> c)    inner dims: letters of x and w not in y       (P1 = X, P2 = W)
    dX = einsum(c, b -> a)    inner dims: letters of dy and w not in x      (P3 = dY, P4 = W)
    dW = einsum(c, a -> b)    inner dims: letters of dy and x not in w      (P5 = dY, P6 = X)

Scales are shared along the inner dims of the GEMM an operand enters (the paper's "channel"
dimension), which is what a scaled GEMM kernel can apply: one scale per block of the sum.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp


def parse(eq: str) -> tuple[str, str, str]:
    """``"BTD,DF->BTF"`` → ("BTD", "DF", "BTF"); rejects forms the GEMM split cannot take."""
    lhs, _, out = eq.replace(" ", "").partition("->")
    a, _, b = lhs.partition(",")
    if not (a and b and out) or "." in eq or any(len(set(s)) != len(s) for s in (a, b, out)):
        raise ValueError(f"projection einsum {eq!r} must be 'x,w->y' without ellipsis or repeats")
    return a, b, out


def inner(operand: str, other: str, result: str) -> str:
    """Letters of `operand` summed over in the GEMM with `other` producing `result`."""
    return "".join(ch for ch in operand if ch in other and ch not in result)


def along(x: jax.Array, letters: str, axes: str, fn: Callable[[jax.Array], jax.Array]):
    """Apply `fn` to `x` reshaped to ``[rest..., prod(axes)]`` (the `axes` letters moved last
    and flattened), and put the result back in `x`'s layout. `fn` maps [..., K] → [..., K]."""
    pos = [letters.index(ch) for ch in axes]
    rest = [i for i in range(x.ndim) if i not in pos]
    xt = jnp.transpose(x, rest + pos)
    lead = xt.shape[: len(rest)]
    k = math.prod(xt.shape[len(rest) :])
    y = fn(xt.reshape(*lead, k)).reshape(xt.shape)
    return jnp.transpose(y, _inverse(rest + pos))


def along_2d(x: jax.Array, letters: str, inner_axes: str, fn: Callable[[jax.Array], jax.Array]):
    """Apply `fn` to `x` as a matrix ``[prod(outer), prod(inner_axes)]`` and put it back."""
    outer = "".join(ch for ch in letters if ch not in inner_axes)
    pos = [letters.index(ch) for ch in outer + inner_axes]
    xt = jnp.transpose(x, pos)
    n = math.prod(xt.shape[: len(outer)])
    y = fn(xt.reshape(n, -1)).reshape(xt.shape)
    return jnp.transpose(y, _inverse(pos))


def _inverse(perm: list[int]) -> list[int]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return inv


def gemm_grads(eq: str, dy_for_dx, w_for_dx, dy_for_dw, x_for_dw, x_dtype, w_dtype):
    """(dx, dw) of ``einsum(eq, x, w)`` from the (possibly quantized) inputs of the two
    backward GEMMs."""
    a, b, c = parse(eq)
    dx = jnp.einsum(f"{c},{b}->{a}", dy_for_dx, w_for_dx, preferred_element_type=jnp.float32)
    dw = jnp.einsum(f"{c},{a}->{b}", dy_for_dw, x_for_dw, preferred_element_type=jnp.float32)
    return dx.astype(x_dtype), dw.astype(w_dtype)
