"""Which precision the dense projections run in, and the one function they all call.

Layers call `project(x, w, eq, name=...)` (via `jaxllm.layers.base.dense`) for every dense
projection, and the MoE experts call `project_ragged` for their grouped GEMM; outside a
`use_precision` block they are exactly ``jnp.einsum`` / `grouped_matmul` (``ragged_dot``, on
TPU megablox). The train and eval steps open `use_precision(spec, fp8_state)` around the
forward pass, so the layers never see the global config. Embedding, head, norms, routers and
attention's own products do not go through `project` and stay in high precision.

Delayed FP8 scaling needs state per projection. Projections are numbered in the order the
forward pass calls them (``"007_q"``), so their state is a flat dict that `record_delayed_keys`
discovers by tracing the forward once; the numbering restarts at every `use_precision`. The
projections of a scanned run of layers (`jaxllm.models.scan`) are traced once for all its
repeats: they are numbered apart (``"scan/003_q"``) and their entries are stacked [U, ...],
one slice per repeat, handed to each scan step by `scanned_unit`.

A projection that cannot use its delayed state on some path (the experts under expert
parallelism, which run inside a shard_map that the replicated state does not enter) runs in a
`current_scaling` block, where it takes no number; the caller numbers those projections as its
reference path would (the MoE layer traces its single-device experts abstractly), so the keys
of every later projection are the same whichever path traced the forward.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp

from jaxllm.precision import einsum as es
from jaxllm.precision import fp8 as fp8_lib
from jaxllm.precision import ragged
from jaxllm.precision.exmy import BlockSize, parse_exmy, quantize_exmy
from jaxllm.precision.grouped_matmul import grouped_matmul

QSpec = tuple[int, int, BlockSize]  # (E, M, block_size)
# The six GEMM inputs (Sun et al. 2025): P1 x, P2 w (forward); P3 dy, P4 w (dX = dY W);
# P5 dy, P6 x (dW = dYᵀ X).
GEMM_INPUTS = ("x", "w", "dy_dx", "w_dx", "dy_dw", "x_dw")


@dataclasses.dataclass(frozen=True)
class PrecisionSpec:
    """fp8: none | current | delayed | blockwise; quantize: ExMy per GEMM input (or None);
    fp8_impl: xla | pallas, what runs the FP8 GEMMs of `project`."""

    fp8: str = "none"
    quantize: tuple[QSpec | None, ...] = (None,) * 6
    amax_history_len: int = 16
    margin: int = 0
    fp8_impl: str = "xla"

    @property
    def active(self) -> bool:
        return self.fp8 != "none" or any(q is not None for q in self.quantize)

    @classmethod
    def from_config(cls, c) -> PrecisionSpec:
        """From a `jaxllm.config.PrecisionConfig`."""
        q = tuple(
            parse_exmy(getattr(c.quantize, n)) if getattr(c.quantize, n) else None
            for n in GEMM_INPUTS
        )
        return cls(c.fp8, q, c.amax_history_len, c.margin, c.fp8_impl)


@dataclasses.dataclass
class _Scope:
    spec: PrecisionSpec
    state: dict | None
    recorded: dict | None  # key → (repeats or None, shape of the weight's scale)
    counter: int = 0
    prefix: str = ""
    current_only: bool = False  # inside `current_scaling`: unnumbered, the state not read


SCAN_PREFIX = fp8_lib.SCAN_PREFIX


_ACTIVE: contextvars.ContextVar[_Scope | None] = contextvars.ContextVar(
    "jaxllm_precision", default=None
)


@contextlib.contextmanager
def use_precision(spec: PrecisionSpec, fp8_state: dict | None = None) -> Iterator[None]:
    """Run the projections traced inside this block in `spec`'s precision.

    fp8_state: the delayed-scaling state (from `record_delayed_keys` / the train state). With
    `delayed` and no state (e.g. evaluation with parameters only) the scales fall back to
    `current` scaling.
    """
    token = _ACTIVE.set(_Scope(spec, fp8_state, None))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def record_delayed_keys(spec: PrecisionSpec, forward) -> dict:
    """The fresh delayed-scaling state of every projection `forward()` calls (traced once,
    abstractly). `forward` takes no arguments and runs the model."""
    scope = _Scope(spec, None, {})
    token = _ACTIVE.set(scope)
    try:
        jax.eval_shape(forward)
    finally:
        _ACTIVE.reset(token)
    out = {}
    for k, (repeats, w_scales) in scope.recorded.items():
        entry = fp8_lib.init_delayed_entry(spec.amax_history_len, w_scales)
        if repeats is not None:
            entry = jax.tree.map(lambda x, n=repeats: jnp.broadcast_to(x, (n, *x.shape)), entry)
        out[k] = entry
    return out


def scanned_state() -> dict | None:
    """The delayed-FP8 entries of the active scope's scanned layers, stacked [U, ...] (the
    `xs` a layer scan hands `scanned_unit` one slice at a time); None without such state."""
    scope = _ACTIVE.get()
    if scope is None or scope.state is None or scope.spec.fp8 != "delayed":
        return None
    return {k: v for k, v in scope.state.items() if k.startswith(SCAN_PREFIX)}


@contextlib.contextmanager
def scanned_unit(repeats: int, state_slice: dict | None) -> Iterator[None]:
    """Trace one repeat of a scanned run of layers: its projections are numbered apart
    (`SCAN_PREFIX`), read their delayed state from `state_slice` (this repeat's slice of
    `scanned_state()`), and while recording they are recorded as stacked over `repeats`."""
    parent = _ACTIVE.get()
    if parent is None:
        yield
        return
    state = state_slice if parent.state is not None else None
    child = _Scope(parent.spec, state, None if parent.recorded is None else {}, prefix=SCAN_PREFIX)
    token = _ACTIVE.set(child)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
    if parent.recorded is not None:
        parent.recorded.update({k: (repeats, w) for k, (_, w) in child.recorded.items()})


@contextlib.contextmanager
def current_scaling() -> Iterator[None]:
    """Delayed-scaling projections traced inside this block use current scaling (this step's
    amax): they take no number, read no state and are not recorded. The caller numbers what
    they stand for (see the module docstring); other modes are unchanged."""
    scope = _ACTIVE.get()
    if scope is None:
        yield
        return
    before = scope.current_only
    scope.current_only = True
    try:
        yield
    finally:
        scope.current_only = before


def active_spec() -> PrecisionSpec | None:
    """The precision of the enclosing `use_precision` block (None outside one)."""
    scope = _ACTIVE.get()
    return None if scope is None else scope.spec


def _delayed_key(scope: _Scope, name: str, w_scales: tuple[int, ...]) -> str:
    """Number this projection; while recording, note the shape of its weight scale."""
    key = f"{scope.prefix}{scope.counter:03d}_{name}"
    scope.counter += 1
    if scope.recorded is not None:
        scope.recorded[key] = (None, w_scales)
    return key


def _delayed_entry(scope: _Scope, key: str) -> dict:
    if key not in scope.state:
        raise KeyError(
            f"no delayed FP8 state for projection {key!r}; the state has "
            f"{len(scope.state)} entries (was it recorded for this model?)"
        )
    return scope.state[key]


def project(x: jax.Array, w: jax.Array, eq: str, *, name: str = "proj") -> jax.Array:
    """``einsum(eq, x, w)`` in the active precision; result in `x.dtype`.

    eq: an ``"x,w->y"`` einsum whose inner dims are the contraction (e.g. ``"BTD,DHK->BTHK"``);
    name: a label for the projection's delayed-scaling state (unique names not required).
    """
    scope = _ACTIVE.get()
    if scope is None or not scope.spec.active:
        return jnp.einsum(eq, x, w)
    spec = scope.spec
    if any(q is not None for q in spec.quantize):
        return exmy_einsum(eq, x, w, spec.quantize)
    if spec.fp8 == "current":
        return fp8_lib.fp8_einsum_current(eq, x, w, spec.fp8_impl)
    if spec.fp8 == "blockwise":
        return fp8_lib.fp8_einsum_blockwise(eq, x, w, fp8_lib.TILE, spec.fp8_impl)
    if spec.fp8 == "delayed":
        if scope.current_only:
            return fp8_lib.fp8_einsum_current(eq, x, w, spec.fp8_impl)
        key = _delayed_key(scope, name, ())
        if scope.recorded is not None:
            return jnp.einsum(eq, x, w)
        if scope.state is None:
            return fp8_lib.fp8_einsum_current(eq, x, w, spec.fp8_impl)
        return fp8_lib.fp8_einsum_delayed(eq, x, w, _delayed_entry(scope, key), spec.fp8_impl)
    raise ValueError(f"unknown precision.fp8 mode {spec.fp8!r}")


def project_ragged(
    x_ND: jax.Array, w_EDF: jax.Array, sizes_E: jax.Array, *, name: str = "experts"
) -> jax.Array:
    """The grouped expert GEMM ``jax.lax.ragged_dot(x_ND, w_EDF, sizes_E)`` in the active
    precision (`jaxllm.precision.ragged`); result in `x_ND.dtype`.

    x_ND: rows sorted by expert; w_EDF: one [D, F] weight per expert; sizes_E: rows per
    expert. FP8 scales are per tensor for x and dy and per expert for w (delayed: a [L, E]
    history and [E] scales for w).
    """
    scope = _ACTIVE.get()
    if scope is None or not scope.spec.active:
        return grouped_matmul(x_ND, w_EDF, sizes_E)
    spec = scope.spec
    if any(q is not None for q in spec.quantize):
        return ragged.qdq_ragged(x_ND, w_EDF, sizes_E, ("exmy", spec.quantize))
    if spec.fp8 == "current":
        return ragged.fp8_ragged_current(x_ND, w_EDF, sizes_E)
    if spec.fp8 == "blockwise":
        return ragged.qdq_ragged(x_ND, w_EDF, sizes_E, ("blockwise", fp8_lib.TILE))
    if spec.fp8 == "delayed":
        if scope.current_only:
            return ragged.fp8_ragged_current(x_ND, w_EDF, sizes_E)
        key = _delayed_key(scope, name, (w_EDF.shape[0],))
        if scope.recorded is not None:
            return grouped_matmul(x_ND, w_EDF, sizes_E)
        if scope.state is None:
            return ragged.fp8_ragged_current(x_ND, w_EDF, sizes_E)
        return ragged.fp8_ragged_delayed(x_ND, w_EDF, sizes_E, _delayed_entry(scope, key))
    raise ValueError(f"unknown precision.fp8 mode {spec.fp8!r}")


# --------------------------------------------------------------------- ExMy GEMMs


def _q(v: jax.Array, letters: str, inner: str, spec: QSpec | None) -> jax.Array:
    """Fake-quantize a GEMM input with blocks along that GEMM's inner dims."""
    if spec is None:
        return v
    e, m, block = spec
    if not inner:  # an outer product: nothing is summed, so one scale per tensor
        return quantize_exmy(v, e, m, block_size=None if block is None else "tensor")
    return es.along(v, letters, inner, lambda u: quantize_exmy(u, e, m, block_size=block))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def exmy_einsum(eq: str, x: jax.Array, w: jax.Array, specs: tuple) -> jax.Array:
    """``einsum(eq, x, w)`` with each of the six GEMM inputs fake-quantized by `specs`
    (ordered as `GEMM_INPUTS`; None leaves one in high precision). Quantized values are
    dequantized to the input dtype and multiplied with float32 accumulation, as in the paper
    (QPyTorch simulation)."""
    return _exmy_fwd(eq, x, w, specs)[0]


def _exmy_fwd(eq, x, w, specs):
    a, b, c = es.parse(eq)
    k = es.inner(a, b, c)
    y = jnp.einsum(eq, _q(x, a, k, specs[0]), _q(w, b, k, specs[1]),
                   preferred_element_type=jnp.float32)  # fmt: skip
    return y.astype(x.dtype), (x, w)


def _exmy_bwd(eq, specs, res, dy):
    x, w = res
    a, b, c = es.parse(eq)
    k_dx, k_dw = es.inner(c, b, a), es.inner(c, a, b)
    return es.gemm_grads(
        eq,
        _q(dy, c, k_dx, specs[2]),
        _q(w, b, es.inner(b, c, a), specs[3]),
        _q(dy, c, k_dw, specs[4]),
        _q(x, a, es.inner(a, c, b), specs[5]),
        x.dtype,
        w.dtype,
    )


exmy_einsum.defvjp(_exmy_fwd, _exmy_bwd)
