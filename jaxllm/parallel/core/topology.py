"""Accelerators described without one, for ahead-of-time compiles (`jaxllm.compile`): names →
chip grid, the chip's memory and peak FLOP/s, and the devices built from jax's topology
description.
- TPU slices (`v5e-16`, `v5p:2x2x1`): libtpu (the `tpu` extra), no TPU.
- NVIDIA GPUs (`h200`, `h100-8`): the CUDA plugin (the `cuda` extra), no GPU. jax compiles for a
  target description (`GPU_TARGETS`: compute capability, SMs, shared memory) with XLA:GPU's real
  passes, Triton and ptxas, so Pallas Triton kernels are compiled for sm_90 here. What it cannot
  check: cuDNN builds its attention graphs on the device (a cuDNN custom call compiles here
  whatever its shapes), and GEMMs take XLA's untuned Triton form (no autotuner without a GPU).
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import jax
import numpy as np
from jax._src import xla_bridge
from jax.experimental import topologies
from jax.sharding import AxisType, Mesh

from jaxllm.parallel.core.mesh import make_mesh

MiB = 1024**2
GiB = 1024**3


def _gpu_mem_fraction() -> float:
    return float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75"))


@dataclass(frozen=True)
class Chip:
    hbm_bytes: int  # usable HBM of one chip
    cores_per_chip: int  # in the Cloud name's count (megacore generations count 2)
    dims: int  # torus dimensions of the chip grid
    peak_bf16_flops: float  # per chip, for the step-time lower bound
    platform: str = "tpu"  # jax's platform name: "tpu" or "cuda"


# HBM per chip: the Cloud TPU system-architecture pages (v4 32 GiB, v5e 16 GiB, v5p 95 GiB,
# v6e Trillium 32 GiB); peak dense bf16 FLOP/s per chip from the same pages.
CHIPS: dict[str, Chip] = {
    "v4": Chip(32 * GiB, 2, 3, 275e12),
    "v5e": Chip(16 * GiB, 1, 2, 197e12),
    "v5p": Chip(95 * GiB, 2, 3, 459e12),
    "v6e": Chip(32 * GiB, 1, 2, 918e12),
    # GPUs: what the allocator may use of nvidia-smi's total (jax preallocates
    # XLA_PYTHON_CLIENT_MEM_FRACTION of it, 0.75 by default), dense bf16 tensor-core peak.
    "h100": Chip(int(_gpu_mem_fraction() * 81_559 * MiB), 1, 1, 989e12, "cuda"),
    "h200": Chip(int(_gpu_mem_fraction() * 143_771 * MiB), 1, 1, 989e12, "cuda"),
}

# XLA:GPU's description of each GPU (GpuTargetConfigProto, text format): Hopper SXM, sm_90,
# 132 SMs, 228 KiB shared memory per SM (227 KiB for one block); what a device reports through
# `jax._src.lib.xla_client.get_topology_for_devices(jax.devices()).target_config`.
_HOPPER = """gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: {bandwidth} l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: {memory} shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 minor: 0 }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
runtime_version {{ major: 12 minor: 8 }}
device_description_str: "{name}"
"""
GPU_TARGETS = {
    "h100": _HOPPER.format(bandwidth=3_352_320_000_000, memory=81_559 * MiB,
                           name="NVIDIA H100 80GB HBM3"),
    "h200": _HOPPER.format(bandwidth=4_800_000_000_000, memory=143_771 * MiB, name="NVIDIA H200"),
}  # fmt: skip
GPUS_PER_HOST = 8


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
        if self.chip.platform == "cuda":
            return f"{self.generation}-{self.chips}"
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
    """`v5e-16` / `v5p-128` (Cloud names), `v5e:4x4` / `v5p:2x2x1` (jax's), or GPUs: `h200`
    (one), `h100-8` (eight in one host), `h200-16` (hosts of 8)."""
    m = re.fullmatch(r"(v\d+[a-z]*|h\d+)(?:[:\-](.+))?", name.strip().lower())
    if not m or m.group(1) not in CHIPS:
        known = ", ".join(CHIPS)
        raise TopologyError(f"unknown topology {name!r}: use GEN-N or GEN:AxB[xC], GEN in {known}")
    gen, rest = m.groups()
    if CHIPS[gen].platform == "cuda":
        n = int(rest) if rest and rest.isdigit() else 1 if rest is None else 0
        if n < 1 or (n > GPUS_PER_HOST and n % GPUS_PER_HOST):
            raise TopologyError(f"topology {name!r}: {gen}-N, N ≤ {GPUS_PER_HOST} or hosts of 8")
        return Topology(gen, (n,))
    if rest is None:
        raise TopologyError(f"topology {name!r}: GEN-N or GEN:AxB[xC]")
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
    """The devices of `topo`, built from its description (libtpu or the CUDA plugin; no TPU or
    GPU needed)."""
    if topo.chip.platform == "cuda":
        # The CUDA plugin registers without a GPU only when the platforms jax starts exclude
        # CUDA (its version check needs a device); the devices below are compile-only.
        if not xla_bridge.backends_are_initialized() and not jax.config.jax_platforms:
            jax.config.update("jax_platforms", "cpu")
        hosts = max(1, topo.chips // GPUS_PER_HOST)
        desc = topologies.get_topology_desc(
            platform="cuda",
            target_config=GPU_TARGETS[topo.generation],
            topology=f"1x{hosts}x{topo.chips // hosts}",
        )
        return list(desc.devices)
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
    """Whether libtpu is installed, i.e. TPU topologies can be compiled for."""
    return importlib.util.find_spec("libtpu") is not None


def cuda_available() -> bool:
    """Whether jax's CUDA plugin is installed, i.e. GPUs can be compiled for."""
    if importlib.util.find_spec("jax_plugins") is None:
        return False
    return any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") for v in (12, 13))


def compiler_available(topo: Topology) -> bool:
    """Whether `topo`'s compiler is installed (libtpu for TPUs, the CUDA plugin for GPUs)."""
    return cuda_available() if topo.chip.platform == "cuda" else tpu_available()


def topology_mesh(sizes: Mapping[str, int], devices: list) -> Mesh:
    """`make_mesh` on a slice's devices. Where jax's torus-aware layout knows no mapping for
    the axis sizes (e.g. an expert axis of 8 on a 4x4x4 slice): the devices in id order, which
    keeps neighbours along the last axis."""
    try:
        return make_mesh(sizes, devices=devices)
    except NotImplementedError:
        arr = np.asarray(devices).reshape(tuple(sizes.values()))
        return Mesh(arr, tuple(sizes), axis_types=(AxisType.Auto,) * len(sizes))
