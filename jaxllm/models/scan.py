"""Scanning the decoder's layers (`model.scan_layers`, MaxText's `scan_layers`).

The longest run of layers that repeats with some period P is kept as P blocks whose parameters
are stacked over the run's U repeats on a leading ``"layers"`` axis, and the forward pass runs
it as one `lax.scan` over the repeats: the traced program, the compile time and XLA's buffer
assignment no longer grow with depth, and XLA schedules one layer's host offloads, remat and
FSDP all-gathers for every layer alike. Layers before and after the run (a first dense MoE
layer, HGRN2's unbounded layer 0, Cog's plain-softmax ends) stay unrolled.

Two layers are the same program when their configs' `scan_key()` agree (every option but the
index, plus what a layer derives from its index). Numbers that depend on the index (TNL's decay,
hash-routing seeds) are read from the index at run time, an int32 scalar inside the scan
(`uses_layer` layers). A model's parameters are laid out as ``blocks`` (the layers before the
run, each as an unrolled model's), ``scan`` (P stacked blocks) and ``tail`` (the layers after
it); `stack_params` / `unstack_params` convert to and from the unrolled layout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

LAYERS_AXIS = "layers"


@dataclasses.dataclass(frozen=True)
class ScanPlan:
    """Layers [start, stop) run as `units` repeats of `period` consecutive layers."""

    start: int
    period: int
    units: int
    n_layers: int

    @property
    def stop(self) -> int:
        return self.start + self.period * self.units

    def where(self, i: int) -> tuple:
        """Where layer `i` lives: ("blocks", i), ("scan", q, u) = slice u of stacked block q,
        or ("tail", i − stop)."""
        if i < self.start:
            return ("blocks", i)
        if i >= self.stop:
            return ("tail", i - self.stop)
        u, q = divmod(i - self.start, self.period)
        return ("scan", q, u)


def plan_layers(keys: Sequence[Any], min_units: int = 2) -> ScanPlan | None:
    """The scan covering the most layers whose `keys` (one per layer, compared with ==)
    repeat with a period P; ties go to the shorter period, then the earlier start. None when
    no run of at least `min_units` repeats exists."""
    n = len(keys)
    best, plan = None, None
    for period in range(1, n // min_units + 1):
        for offset in range(period):
            units = [keys[s : s + period] for s in range(offset, n - period + 1, period)]
            k = 0
            while k < len(units):
                j = k
                while j + 1 < len(units) and units[j + 1] == units[k]:
                    j += 1
                count, start = j - k + 1, offset + k * period
                score = (count * period, -period, -start)
                if count >= min_units and (best is None or score > best):
                    best, plan = score, ScanPlan(start, period, count, n)
                k = j + 1
    return plan


def stack_modules(modules: Sequence[nnx.Module]) -> nnx.Module:
    """One module with `modules[0]`'s structure whose parameters are every module's stacked on
    a new leading axis, annotated ``"layers"`` for the sharding rules."""
    graphdef, first = nnx.split(modules[0])
    states = [first] + [nnx.split(m)[1] for m in modules[1:]]
    structure = jax.tree.structure(first)
    for i, s in enumerate(states[1:], 1):
        if jax.tree.structure(s) != structure:
            raise ValueError(f"scanned layers differ in structure: repeat 0 vs {i}")

    def stack(*vs: nnx.Variable) -> nnx.Variable:
        axes = vs[0].get_metadata().get("axes")
        value = jnp.stack([v[...] for v in vs])
        if axes is None:
            return vs[0].replace(value)
        return vs[0].replace(value, axes=(LAYERS_AXIS, *axes))

    is_var = lambda x: isinstance(x, nnx.Variable)
    return nnx.merge(graphdef, jax.tree.map(stack, *states, is_leaf=is_var))


def stack_params(params: dict, plan: ScanPlan | None) -> dict:
    """An unrolled model's parameter dict ({"blocks": {i: ...}, ...}) in `plan`'s layout."""
    if plan is None:
        return params
    blocks = params["blocks"]
    out = {k: v for k, v in params.items() if k != "blocks"}
    out["blocks"] = {i: blocks[i] for i in range(plan.start)}
    out["scan"] = {
        q: jax.tree.map(
            lambda *xs: jnp.stack(xs),
            *[blocks[plan.start + u * plan.period + q] for u in range(plan.units)],
        )
        for q in range(plan.period)
    }
    out["tail"] = {i - plan.stop: blocks[i] for i in range(plan.stop, plan.n_layers)}
    return {k: v for k, v in out.items() if k not in ("blocks", "tail") or v}


def unstack_params(params: dict, plan: ScanPlan | None, take=lambda x, u: x[u]) -> dict:
    """`plan`'s parameter layout back to an unrolled model's ({"blocks": {i: ...}, ...});
    `take(leaf, u)` gives repeat u of a stacked leaf (default: the slice)."""
    if plan is None:
        return params
    out = {k: v for k, v in params.items() if k not in ("blocks", "scan", "tail")}
    blocks = {}
    for i in range(plan.n_layers):
        where = plan.where(i)
        if where[0] == "scan":
            _, q, u = where
            blocks[i] = jax.tree.map(lambda x, u=u: take(x, u), params["scan"][q])
        else:
            blocks[i] = params[where[0]][where[1]]
    out["blocks"] = blocks
    return out
