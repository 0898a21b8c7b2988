"""Building the device mesh from `parallel.mesh`."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh


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
