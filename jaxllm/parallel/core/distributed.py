"""Multi-process runs: join the other processes before jax starts its backends.

A run is one of several processes when `JAX_NUM_PROCESSES` > 1 (with `JAX_COORDINATOR_ADDRESS`
= host:port of process 0 and `JAX_PROCESS_ID`), or the same given as flags
`--coordinator HOST:PORT --num-processes N --process-id I` to `python -m jaxllm.train`. On
Cloud TPU pods and SLURM clusters jax finds all three itself (`JAXLLM_DISTRIBUTED=auto`).
After `initialize`, `jax.devices()` lists every process's devices: the mesh spans them all,
each process feeds its own round-robin share of the data (`jaxllm.data.Pipeline`), and orbax
writes every array as one logical array, each process its own shards.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import jax

FLAGS = {"--coordinator": "coordinator", "--num-processes": "num_processes",
         "--process-id": "process_id", "--local-devices": "local_devices"}  # fmt: skip


@dataclass(frozen=True)
class Cluster:
    coordinator: str | None = None
    num_processes: int = 1
    process_id: int = 0
    local_devices: int | None = None  # CPU only: virtual devices per process
    auto: bool = False  # let jax detect the cluster (TPU pods, SLURM)

    @property
    def multi(self) -> bool:
        return self.auto or self.num_processes > 1


def pop_flags(argv: list[str]) -> tuple[Cluster, list[str]]:
    """The cluster from `--coordinator ...` flags (else the environment) and the other args."""
    found: dict[str, str] = {}
    rest = []
    it = iter(argv)
    for a in it:
        key, eq, val = a.partition("=")
        if key in FLAGS:
            v = val if eq else next(it, None)
            if v is None:
                raise ValueError(f"{key} needs a value")
            found[FLAGS[key]] = v
        else:
            rest.append(a)
    return from_env(found), rest


def from_env(overrides: dict[str, str] | None = None) -> Cluster:
    env = {
        "coordinator": os.environ.get("JAX_COORDINATOR_ADDRESS"),
        "num_processes": os.environ.get("JAX_NUM_PROCESSES"),
        "process_id": os.environ.get("JAX_PROCESS_ID"),
        "local_devices": os.environ.get("JAXLLM_LOCAL_DEVICES"),
    }
    env.update(overrides or {})
    n = int(env["num_processes"] or 1)
    if n > 1 and (env["coordinator"] is None or env["process_id"] is None):
        raise ValueError(
            f"{n} processes need a coordinator address and a process id "
            "(JAX_COORDINATOR_ADDRESS, JAX_PROCESS_ID or --coordinator, --process-id)"
        )
    return Cluster(
        coordinator=env["coordinator"],
        num_processes=n,
        process_id=int(env["process_id"] or 0),
        local_devices=int(env["local_devices"]) if env["local_devices"] else None,
        auto=os.environ.get("JAXLLM_DISTRIBUTED") == "auto",
    )


def initialize(cluster: Cluster) -> bool:
    """Join the cluster (a no-op for one process); call before anything touches devices."""
    if cluster.local_devices is not None:
        jax.config.update("jax_num_cpu_devices", cluster.local_devices)
    if not cluster.multi:
        return False
    if (os.environ.get("JAX_PLATFORMS") or "").startswith("cpu"):
        # CPU collectives across processes go through gloo (TCP)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if cluster.auto:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(
            coordinator_address=cluster.coordinator,
            num_processes=cluster.num_processes,
            process_id=cluster.process_id,
        )
    return True


def is_main() -> bool:
    """Process 0: the one that prints and writes the run's logs."""
    return jax.process_index() == 0
