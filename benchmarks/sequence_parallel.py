"""Bytes each device communicates per forward+backward of one sequence-parallel mixer, read
from the compiled HLO's collectives, against T and against the number of sequence shards.

    JAX_PLATFORMS=cpu python benchmarks/sequence_parallel.py [--json out.json]

Runs on 8 CPU devices (mesh sequence=P, data=8/P); nothing is timed, only the collectives
XLA emits are counted. Per-device traffic of one collective over a group of n devices, the
usual ring accounting: all-gather and reduce-scatter (n−1)/n of the full (gathered) buffer,
all-to-all (n−1)/n of the local buffer, all-reduce 2(n−1)/n of it, collective-permute the
buffer once. The claim: LASP's bytes do not grow with T (one [B, H, K, V] state per hop);
softmax all-gather's (K and V of the whole sequence) and Ulysses' (q, k, v, o) grow as T.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import json
import re

import jax
import jax.numpy as jnp

jax.config.update("jax_num_cpu_devices", 8)

from jaxllm.parallel.core.mesh import make_mesh  # noqa: E402
from jaxllm.parallel.sequence import attention_sp, lightning_attention_sp  # noqa: E402

B, H, K = 8, 8, 64
DTYPE = jnp.bfloat16
BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1}
OPS = ("all-gather", "reduce-scatter", "all-to-all", "all-reduce", "collective-permute")
LINE = re.compile(r"=\s*(?P<type>.+?)\s+(?P<op>" + "|".join(OPS) + r")(?:-start)?\(")
SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")


def _bytes(type_str: str) -> int:
    total = 0
    for dt, dims in SHAPE.findall(type_str):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * BYTES.get(dt, 4)
    return total


def _group_size(line: str, n_devices: int) -> int:
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=\{\{([\d,]+)\}", line)
    if m:
        return len(m.group(1).split(","))
    return n_devices


def collective_bytes(hlo: str, n_devices: int = 8) -> dict[str, float]:
    """Per-device bytes moved by each kind of collective in an HLO module's text."""
    out = dict.fromkeys(OPS, 0.0)
    for line in hlo.splitlines():
        m = LINE.search(line)
        if not m:
            continue
        op, size = m.group("op"), _bytes(m.group("type"))
        if op == "collective-permute":
            out[op] += size / 2 if m.group("type").startswith("(") else size
            continue
        n = _group_size(line, n_devices)
        frac = (n - 1) / n
        if op == "reduce-scatter":
            out[op] += size * n * frac  # the result is one shard of the reduced buffer
        elif op == "all-reduce":
            out[op] += 2 * size * frac
        else:
            out[op] += size * frac
    return out


def _fn(impl: str, mesh):
    if impl in ("lasp1", "lasp2"):
        g = -jnp.linspace(0.01, 0.5, H)
        return lambda q, k, v: lightning_attention_sp(q, k, v, g, mesh=mesh, impl=impl)
    return lambda q, k, v: attention_sp(q, k, v, mesh=mesh, impl=impl)


def measure(impl: str, T: int, shards: int) -> float:
    mesh = make_mesh({"data": 8 // shards, "sequence": shards})
    f = _fn(impl, mesh)
    loss = lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32))
    x = jax.ShapeDtypeStruct((B, T, H, K), DTYPE)
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile().as_text()
    return sum(collective_bytes(hlo).values())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="benchmarks/results/sequence_parallel.json")
    args = ap.parse_args()
    impls = ("lasp2", "lasp1", "allgather", "ulysses")
    rows = []
    for T, shards in [(1024, 4), (4096, 4), (16384, 4), (4096, 2), (4096, 8)]:
        row = {"T": T, "shards": shards}
        row.update({impl: measure(impl, T, shards) for impl in impls})
        rows.append(row)
        cells = " ".join(f"{row[i] / 2**20:>10.3f}" for i in impls)
        print(f"T={T:>6} shards={shards}  " + cells, flush=True)
    print(f"\nper-device MiB per fwd+bwd (B={B} H={H} K=V={K} bf16); columns: {', '.join(impls)}")
    header = f"| T | shards | {' | '.join(impls)} |"
    print(header + "\n|" + "---|" * (2 + len(impls)))
    for r in rows:
        print(f"| {r['T']} | {r['shards']} | " + " | ".join(f"{r[i] / 2**20:.3f}" for i in impls)
              + " |")  # fmt: skip
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"config": {"B": B, "H": H, "K": K, "dtype": "bf16"}, "bytes": rows}, f,
                  indent=1)  # fmt: skip
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
