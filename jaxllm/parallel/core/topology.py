"""TPU slices described without a TPU: names (`v5e-16`, `v5p:2x2x1`) → chip grid, the chip's
HBM and peak FLOP/s, and the slice's devices built from jax's topology description (needs
libtpu, the `tpu` extra, but no TPU), for ahead-of-time compiles (`jaxllm.compile`)."""

from __future__ import annotations

import importlib.util
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from jax.experimental import topologies
from jax.sharding import AxisType, Mesh

from jaxllm.parallel.core.mesh import make_mesh

GiB = 1024**3


@dataclass(frozen=True)
class Chip:
    hbm_bytes: int  # usable HBM of one chip
    cores_per_chip: int  # in the Cloud name's count (megacore generations count 2)
    dims: int  # torus dimensions of the chip grid
    peak_bf16_flops: float  # per chip, for the step-time lower bound


# HBM per chip: the Cloud TPU system-architecture pages (v4 32 GiB, v5e 16 GiB, v5p 95 GiB,
# v6e Trillium 32 GiB); peak dense bf16 FLOP/s per chip from the same pages.
CHIPS: dict[str, Chip] = {
    "v4": Chip(32 * GiB, 2, 3, 275e12),
    "v5e": Chip(16 * GiB, 1, 2, 197e12),
    "v5p": Chip(95 * GiB, 2, 3, 459e12),
    "v6e": Chip(32 * GiB, 1, 2, 918e12),
}


class TopologyError(ValueError):
    pass


@dataclass(frozen=True)
class Topology:
    generation: str
    grid: tuple[int, ...]  # chips along each torus dimension

    @property
    def chips(self) -> int:
        return math.prod(self.grid)

    @property
    def chip(self) -> Chip:
        return CHIPS[self.generation]

    @property
    def jax_name(self) -> str:
        return f"{self.generation}:" + "x".join(map(str, self.grid))


def _balanced_grid(chips: int, dims: int) -> tuple[int, ...]:
    """Powers-of-two grid with `chips` chips, as square as possible, small dims first
    (`v5e:4x8`, `v5p:4x4x8`), the shapes Cloud TPU slices come in."""
    if chips < 1 or chips & (chips - 1):
        raise TopologyError(f"{chips} chips: slices come in powers of two")
    grid = [1] * dims
    for _ in range(int(math.log2(chips))):
        grid[grid.index(min(grid))] *= 2
    return tuple(sorted(grid))


def parse_topology(name: str) -> Topology:
    """`v5e-16` / `v5p-128` (Cloud names) or `v5e:4x4` / `v5p:2x2x1` (jax's)."""
    m = re.fullmatch(r"(v\d+[a-z]*)[:\-](.+)", name.strip().lower())
    if not m or m.group(1) not in CHIPS:
        known = ", ".join(CHIPS)
        raise TopologyError(f"unknown topology {name!r}: use GEN-N or GEN:AxB[xC], GEN in {known}")
    gen, rest = m.groups()
    chip = CHIPS[gen]
    if ":" in name:
        if not re.fullmatch(r"\d+(x\d+)+", rest):
            raise TopologyError(f"topology {name!r}: the grid looks like 4x4 or 2x2x1")
        grid = tuple(int(d) for d in rest.split("x"))
        if len(grid) != chip.dims or min(grid) < 1:
            raise TopologyError(f"topology {name!r}: {gen} grids have {chip.dims} dimensions")
        return Topology(gen, grid)
    if not rest.isdigit() or int(rest) % chip.cores_per_chip:
        raise TopologyError(f"topology {name!r}: GEN-N with N a count of {gen} cores")
    return Topology(gen, _balanced_grid(int(rest) // chip.cores_per_chip, chip.dims))


def topology_devices(topo: Topology) -> list:
    """The devices of `topo`, built from its description (libtpu, no TPU needed)."""
    # Only descriptions are built here (no TPU is touched), so several compiles (test workers,
    # a compile next to a run) may share libtpu instead of failing on its lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # Hosts hold a 2x2 block of chips (4 per host) on every generation listed here.
    per_host = (2, 2, 1) if topo.chips >= 4 else (*topo.grid, 1)[:3]
    chip_config = "megacore" if topo.chip.cores_per_chip == 2 else "default"
    desc = topologies.get_topology_desc(
        topology_name=topo.jax_name,
        platform="tpu",
        chip_config_name=chip_config,
        chips_per_host_bounds=per_host,
        num_slices=1,
    )
    return list(desc.devices)


def tpu_available() -> bool:
    """Whether libtpu is installed, i.e. topologies can be compiled for."""
    return importlib.util.find_spec("libtpu") is not None


def topology_mesh(sizes: Mapping[str, int], devices: list) -> Mesh:
    """`make_mesh` on a slice's devices. Where jax's torus-aware layout knows no mapping for
    the axis sizes (e.g. an expert axis of 8 on a 4x4x4 slice): the devices in id order, which
    keeps neighbours along the last axis."""
    try:
        return make_mesh(sizes, devices=devices)
    except NotImplementedError:
        arr = np.asarray(devices).reshape(tuple(sizes.values()))
        return Mesh(arr, tuple(sizes), axis_types=(AxisType.Auto,) * len(sizes))
