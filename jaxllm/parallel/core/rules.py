"""Logical axis names → mesh axes.

Parameters carry logical names (`nnx.Param(..., axes=("embed", "mlp"))`) and activations are
constrained with `constrain(x, ("batch", "length", "act_embed"))`. This file alone decides how
those names land on the mesh. A name maps to a mesh axis (or a tuple of them); a mapping is
dropped for one array where the axis has size 1, is already used by another dim, or does not
divide the dim — so small or odd shapes replicate instead of failing.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import jax
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from jaxllm.parallel.core.axes import BATCH_AXES, DATA, EMBED_AXES, dividing_axes

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

DEFAULT_RULES: Rules = (
    # activations
    ("batch", BATCH_AXES),
    ("length", "sequence"),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_vocab", "tensor"),
    # parameters: FSDP shards the model width, tensor parallelism the wide dims. The expert
    # axis shards the width too (as in MaxText): it also splits the batch, so without it the
    # weights that have no experts dim (attention, shared experts, embeddings) and their Adam
    # moments would be replicated over it (20 of Hunyuan-Large's 37 GiB of state per chip on
    # v5p-512). Expert weights keep their width on fsdp: their experts dim takes the axis.
    ("embed", EMBED_AXES),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("experts", "expert"),
    # the stacked layers of a scanned decoder (jaxllm.models.scan): one slice per step
    ("layers", None),
)

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "jaxllm_rules", default=None
)


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Iterator[None]:
    """Make `constrain` place activations on `mesh` while tracing inside this block."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_mesh() -> Mesh | None:
    """The mesh of the enclosing `use_rules` block (None outside one)."""
    active = _ACTIVE.get()
    return None if active is None else active[0]


def map_mesh(mesh: Mesh | AbstractMesh) -> tuple[Mesh | AbstractMesh, tuple[str, ...]]:
    """(the mesh to build a `shard_map` traced here on, its axes that map may make manual).

    At the top level: `mesh` and all its axes. Inside a `shard_map` (the train step's
    per-replica one is manual over `data`): the context's abstract mesh, which records the
    manual axes, and only the axes still automatic. A nested map splits over those alone, so
    its collectives stay within one slice of the outer map (one data replica's rows).
    """
    context = jax.sharding.get_abstract_mesh()
    if not context.manual_axes:
        return mesh, tuple(mesh.axis_names)
    manual = set(context.manual_axes)
    return context, tuple(a for a in context.axis_names if a not in manual)


def avoid_split_gathers() -> bool:
    """Whether gathers traced here should be given a layout by hand: inside a `shard_map`
    manual over some axes (the FP8 all-reduce's per-replica one, over `data`) that leaves two
    or more axes of size > 1 automatic (fsdp × tensor, fsdp × sequence, ...). There XLA's SPMD
    partitioner aborts on a gather whose operand and indices are split over different ones
    (a failed check in spmd_partitioner_util.cc, ExpandDeviceGroupsWithIota): the embedding
    lookup and the loss's target logits (`jaxllm.models.decoder.embed_lookup`,
    `jaxllm.training.step.cross_entropy`) then take a layout it partitions (checked with jax
    0.10.2 and 0.12: data × fsdp × tensor, data × fsdp × sequence)."""
    context = jax.sharding.get_abstract_mesh()
    if not context.manual_axes:
        return False
    _, free = map_mesh(context)
    return sum(context.shape[a] > 1 for a in free) > 1


def replica_rules(rules: Rules) -> Rules:
    """The rules inside one data-parallel replica: every mapping to `data` dropped (a
    `shard_map` manual over it, or a vmap with ``spmd_axis_name="data"``, owns that axis)."""
    out = []
    for name, target in rules:
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        kept = tuple(a for a in axes if a != DATA)
        out.append((name, None if not kept else kept[0] if len(kept) == 1 else kept))
    return tuple(out)


def spec_for(
    names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules = DEFAULT_RULES
) -> PartitionSpec:
    """The PartitionSpec of an array with logical axis `names` and `shape` on `mesh`."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name, dim in zip(names, shape, strict=True):
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        kept = dividing_axes(mesh, [a for a in axes if a not in used], dim) or ()
        used.update(kept)
        out.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    return PartitionSpec(*out)


def sharding_for(
    names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules = DEFAULT_RULES
) -> NamedSharding:
    return NamedSharding(mesh, spec_for(names, shape, mesh, rules))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside `use_rules`."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, sharding_for(names, x.shape, mesh, rules))
