"""Tokens/s and MFU of jaxllm's train step for a preset at a sequence length.

    python benchmarks/train_step.py default --seq-len 256 --batch 16 --steps 10 [key=value ...]

Runs the real jitted step (the trainer's shardings, donation, optimizer) on synthetic tokens,
after checking that one step gives a finite loss. Prints a table and writes JSON to
benchmarks/results/train_step.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import jax
import numpy as np

from jaxllm import config
from jaxllm.models import flops_per_token
from jaxllm.parallel.core.mesh import make_mesh
from jaxllm.training.metrics import peak_flops_per_device
from jaxllm.training.state import Trainer
from jaxllm.training.step import make_train_step


def synthetic_batch(cfg: config.Config, seed: int = 0) -> dict[str, np.ndarray]:
    b, t = cfg.data.batch_size, cfg.data.seq_len
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, min(cfg.model.vocab_size, 256), (b, t + 1), dtype=np.int32)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": np.ones((b, t), np.int32),
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
        "loss_mask": np.ones((b, t), np.float32),
    }


def bench(cfg: config.Config, steps: int, warmup: int = 2) -> dict:
    mesh = make_mesh(cfg.parallel.mesh.resolve(jax.device_count()))
    trainer = Trainer.create(cfg, mesh)
    step_fn = make_train_step(trainer)
    state = trainer.init_state(cfg.train.seed)
    batch = {k: jax.device_put(v, trainer.batch_sharding) for k, v in synthetic_batch(cfg).items()}
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    state, m = step_fn(state, batch)
    loss = float(m["loss"])
    if not math.isfinite(loss):
        raise SystemExit(f"check failed: loss {loss} after one step")
    for _ in range(warmup - 1):
        state, m = step_fn(state, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = step_fn(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    n_params = sum(x.size for x in jax.tree.leaves(trainer.model.abstract_params))
    n_embed = trainer.model.abstract_params["embed"].size
    fpt = flops_per_token(cfg.model, n_params, n_embed, cfg.data.seq_len)
    tokens = cfg.data.batch_size * cfg.data.seq_len
    peak, peak_src = peak_flops_per_device(cfg.model.dtype)
    tps = tokens / step_s
    return {
        "preset": cfg.name,
        "device": jax.devices()[0].device_kind,
        "n_devices": jax.device_count(),
        "params_m": n_params / 1e6,
        "seq_len": cfg.data.seq_len,
        "batch": cfg.data.batch_size,
        "dtype": cfg.model.dtype,
        "step_ms": step_s * 1e3,
        "tokens_per_s": tps,
        "tflops_per_s_per_device": tps * fpt / jax.device_count() / 1e12,
        "mfu": tps * fpt / (peak * jax.device_count()),
        "peak_tflops": peak / 1e12,
        "peak_source": peak_src,
        "compile_s": compile_s,
        "temp_mib": getattr(mem, "temp_size_in_bytes", 0) / 2**20 if mem else None,
        "loss_after_1_step": loss,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("preset", nargs="?", default="default")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--seq-len", type=int, nargs="+", default=[256])
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/train_step.json")
    args = ap.parse_args()
    rows = []
    for t in args.seq_len:
        extra = [f"data.seq_len={t}", f"model.max_seq_len={max(t, 2)}"]
        if args.batch:
            extra.append(f"data.batch_size={args.batch}")
        cfg = config.load(args.preset, [*args.overrides, *extra])
        rows.append(bench(cfg, args.steps))
    cols = ["preset", "seq_len", "batch", "dtype", "params_m", "step_ms", "tokens_per_s",
            "tflops_per_s_per_device", "mfu", "compile_s", "temp_mib"]  # fmt: skip
    print(" | ".join(f"{c:>12}" for c in cols))
    for r in rows:
        print(" | ".join(f"{r[c]:>12.4g}" if isinstance(r[c], float) else f"{r[c]!s:>12}"
                         for c in cols))  # fmt: skip
    print(f"device: {rows[0]['device']} × {rows[0]['n_devices']}; peak "
          f"{rows[0]['peak_tflops']:.3g} TFLOP/s/device ({rows[0]['peak_source']})")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
