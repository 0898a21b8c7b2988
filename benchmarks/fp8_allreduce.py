"""Bytes per parameter that the data-parallel gradient all-reduce moves, float32 (GSPMD's
all-reduce, `precision.fp8=none`) against FP8-LM's (`precision.fp8=current`, O1: the train
step's shard_map over `data` and `jaxllm.parallel.fp8_allreduce`), read from the compiled HLO of
the real train step.

    JAX_PLATFORMS=cpu python benchmarks/fp8_allreduce.py [--json out.json] [key=value ...]

Pure data parallelism on N = 2, 4, 8 CPU devices, so every collective in the step runs over
`data`: the gradient reduction plus a few scalars (token sums, FP8 amaxes, overflow counts).
Bytes per device are counted with `sequence_parallel.collective_bytes` (ring accounting: an
all-reduce moves 2(N-1)/N of its buffer, an all-to-all and an all-gather (N-1)/N) and divided
by the parameter count. Expected: 8(N-1)/N for float32, 2(N-1)/N for the FP8 all-to-all +
all-gather. Before counting, one step of each runs and must give a finite loss (and, for FP8,
log μ).
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import json
import math

import jax
import numpy as np

jax.config.update("jax_num_cpu_devices", 8)

from sequence_parallel import collective_bytes  # noqa: E402

from jaxllm import config  # noqa: E402
from jaxllm.parallel.core.mesh import make_mesh  # noqa: E402
from jaxllm.training.state import Trainer  # noqa: E402
from jaxllm.training.step import make_train_step  # noqa: E402

SMALL = ["model.n_layers=2", "data.seq_len=64", "data.batch_size=8", "model.max_seq_len=64"]
KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def _batch(cfg) -> dict[str, np.ndarray]:
    b, t = cfg.data.batch_size, cfg.data.seq_len
    tokens = np.random.default_rng(0).integers(0, 256, (b, t + 1), dtype=np.int32)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": np.ones((b, t), np.int32),
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
        "loss_mask": np.ones((b, t), np.float32),
    }


def measure(n: int, fp8: str, overrides: list[str]) -> dict:
    cfg = config.load("default", [*SMALL, f"precision.fp8={fp8}", *overrides])
    mesh = make_mesh({"data": n, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:n])
    trainer = Trainer.create(cfg, mesh)
    assert trainer.fp8_allreduce == (fp8 != "none")
    step = make_train_step(trainer)
    batch = _batch(cfg)
    abstract = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=trainer.batch_sharding)
        for k, v in batch.items()
    }
    hlo = step.lower(trainer.abstract_state(), abstract).compile().as_text()
    _, metrics = step(trainer.init_state(0), jax.device_put(batch, trainer.batch_sharding))
    assert math.isfinite(float(metrics["loss"])), metrics
    assert (fp8 != "none") == ("fp8_mu" in metrics)
    params = sum(x.size for x in jax.tree.leaves(trainer.model.abstract_params))
    per_op = {op: b / params for op, b in collective_bytes(hlo, n).items() if b}
    return {"params": params, "bytes_per_param": sum(per_op.values()), "by_op": per_op}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="benchmarks/results/fp8_allreduce.json")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    rows = []
    for n in (2, 4, 8):
        f32, fp8 = measure(n, "none", args.overrides), measure(n, "current", args.overrides)
        rows.append({"replicas": n, "float32": f32, "fp8": fp8})
        print(f"N={n}: float32 {f32['bytes_per_param']:.3f} B/param {f32['by_op']}  "
              f"fp8 {fp8['bytes_per_param']:.3f} B/param {fp8['by_op']}", flush=True)  # fmt: skip
    print(f"\nbytes per parameter per device, gradient all-reduce of one train step "
          f"({rows[0]['fp8']['params']} parameters)")  # fmt: skip
    print("| N | float32 | FP8 | ratio | 8(N-1)/N | 2(N-1)/N |\n|---|---|---|---|---|---|")
    for r in rows:
        n, a, b = r["replicas"], r["float32"]["bytes_per_param"], r["fp8"]["bytes_per_param"]
        print(f"| {n} | {a:.3f} | {b:.3f} | {a / b:.2f} | {8 * (n - 1) / n:.3f} | "
              f"{2 * (n - 1) / n:.3f} |")  # fmt: skip
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"overrides": [*SMALL, *args.overrides], "rows": rows}, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
