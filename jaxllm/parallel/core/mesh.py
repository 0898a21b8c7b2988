"""The device mesh: the sizes `parallel.mesh` asks for, resolved, and the mesh built on them."""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from jaxllm.parallel.core.axes import EXPERT, MESH_AXES, SEQUENCE


def resolve_sizes(sizes: Mapping[str, int], n_devices: int) -> dict[str, int]:
    """Axis sizes (every one of `MESH_AXES`, at most one -1) with the -1 filled in so that
    they tile `n_devices`; `ValueError` if they cannot. An `expert` or `sequence` axis of size
    1 is left out: meshes without expert or sequence parallelism keep their three-axis shape.
    """
    sizes = {a: sizes[a] for a in MESH_AXES}
    known = math.prod(s for s in sizes.values() if s != -1)
    for axis, size in sizes.items():
        if size == -1:
            if n_devices % known:
                raise ValueError(
                    f"parallel.mesh: {known} devices in the fixed axes do not divide "
                    f"the {n_devices} devices"
                )
            sizes[axis] = n_devices // known
    if math.prod(sizes.values()) != n_devices:
        raise ValueError(
            f"parallel.mesh: {sizes} uses {math.prod(sizes.values())} devices, "
            f"but {n_devices} are available"
        )
    return {a: n for a, n in sizes.items() if n > 1 or a not in (EXPERT, SEQUENCE)}


def make_mesh(sizes: Mapping[str, int], devices: list | None = None) -> Mesh:
    """A mesh with the named axis sizes (already resolved, product = device count).

    Axes are `Auto` so the logical-axis rules (GSPMD-style sharding constraints) drive the
    partitioner; `shard_map` regions make their own axes manual.
    """
    devices = devices if devices is not None else jax.devices()
    names = tuple(sizes)
    shape = tuple(sizes[n] for n in names)
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh {dict(sizes)} does not use the {len(devices)} devices")
    try:
        return jax.make_mesh(
            shape, names, axis_types=(AxisType.Auto,) * len(names), devices=devices
        )
    except TypeError:  # older jax without `devices=` in make_mesh
        arr = np.asarray(devices).reshape(shape)
        return Mesh(arr, names, axis_types=(AxisType.Auto,) * len(names))
