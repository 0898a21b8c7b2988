"""The mesh's axis names, the groups of them that split one kind of dimension, and the one
helper that finds which of a group divide a dimension."""

from __future__ import annotations

from collections.abc import Sequence

from jax.sharding import AbstractMesh, Mesh

DATA, FSDP, TENSOR, EXPERT, SEQUENCE = "data", "fsdp", "tensor", "expert", "sequence"
# every axis a mesh may have, in the order `parallel.mesh` lists them
MESH_AXES = (DATA, FSDP, TENSOR, EXPERT, SEQUENCE)
# the axes that split the batch (the "batch" rule): the expert axis too, outside the experts,
# as in MaxText
BATCH_AXES = (DATA, FSDP, EXPERT)
# the axes that split a parameter's model width (the "embed" rule)
EMBED_AXES = (FSDP, EXPERT)
# the axes that split heads (and the other wide dims of tensor parallelism)
HEAD_AXES = (TENSOR,)


def dividing_axes(
    mesh: Mesh | AbstractMesh, names: Sequence[str], dim: int, unit: int = 1
) -> tuple[str, ...] | None:
    """The axes among `names`, in order, that together split a dimension of size `dim` into
    equal shards of whole `unit`s: an axis of size 1 is skipped, and so is one whose size
    would not divide what the axes kept before it leave. None when no axis is kept."""
    kept, size = [], 1
    for name in names:
        n = mesh.shape.get(name, 1)
        if n > 1 and dim % (unit * size * n) == 0:
            kept.append(name)
            size *= n
    return tuple(kept) or None
