"""The one `shard_map` of jaxllm: a function run once per device over the mesh.

XLA cannot partition a Mosaic or Triton call, so a Pallas kernel on a mesh runs inside a
`shard_map`; the strategies (`jaxllm.parallel.sequence`, `.expert`, `.fp8_allreduce`) run their
collectives in one. Either way the map is built where it is traced: at the top level over the
whole mesh, inside another map (the train step's per-replica one, manual over `data`) over the
axes that map left automatic (`map_mesh`), so a nested map splits one slice of the outer one.

Every map runs with ``check_vma=False``: jax's Pallas calls (the splash kernel, ours) cannot
type their outputs' variance over the manual axes, and the FP8 all-reduce's all-gather leaves
its (identical) result typed as varying.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import jax
from jax.sharding import AbstractMesh, Mesh

from jaxllm.parallel.core.axes import dividing_axes
from jaxllm.parallel.core.rules import active_mesh, map_mesh


@dataclass(frozen=True)
class DeviceMap:
    """Where a per-device function traced here runs: `mesh` (the context's abstract mesh
    inside another map) and its axes `free` to make manual."""

    mesh: Mesh | AbstractMesh
    free: tuple[str, ...]

    @property
    def kernel_needs_map(self) -> bool:
        """Whether a Pallas kernel traced here must run inside this map: an axis left to
        split has size > 1, or an enclosing map left some axes automatic (jax refuses a
        Mosaic call in a partly manual context even where those axes have size 1)."""
        splits = any(self.mesh.shape[a] > 1 for a in self.free)
        return splits or 0 < len(self.free) < len(self.mesh.axis_names)

    def axes(self, names: Sequence[str], dim: int, unit: int = 1) -> tuple[str, ...] | None:
        """The free axes among `names` that split a dim of size `dim` (`dividing_axes`)."""
        return dividing_axes(self.mesh, [a for a in names if a in self.free], dim, unit)

    def __call__(
        self, fn: Callable, in_specs: Any, out_specs: Any, manual: Collection[str] | None = None
    ) -> Callable:
        """`fn` as a `shard_map` over the mesh, manual over `manual` (default: every free
        axis; the others stay with the partitioner)."""
        return jax.shard_map(
            fn,
            mesh=self.mesh,
            in_specs=in_specs,
            out_specs=out_specs,
            axis_names=set(self.free if manual is None else manual),
            check_vma=False,
        )


def per_device(mesh: Mesh | AbstractMesh | None = None) -> DeviceMap | None:
    """The `DeviceMap` of a function traced here over `mesh` (default: the mesh of the
    enclosing `use_rules`); None without one."""
    mesh = mesh if mesh is not None else active_mesh()
    return None if mesh is None else DeviceMap(*map_mesh(mesh))
