"""What the first `make train` costs: wall time, CPU time, tokens/s and the final validation
loss of `python -m jaxllm.train` for candidate settings of the `default` preset.

    python benchmarks/first_run.py                       # the shipped default and candidates
    python benchmarks/first_run.py --only shipped        # one of them
    python benchmarks/first_run.py --extra "x=model.d_model=128 train.steps=200"

Each candidate runs as its own process, exactly as a user starts it (import, compile, train,
validate, checkpoint, sample), into a scratch run folder. CPU time (user + system of the child,
from its rusage) is reported beside the wall time: on a machine shared with other work the wall
time stretches, the CPU time much less, so compare candidates by CPU seconds and loss, and
quote wall times only from an idle machine. Prints a table and writes JSON to
benchmarks/results/first_run.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Overrides over the `default` preset; "shipped" is the preset as it is.
CANDIDATES: dict[str, list[str]] = {
    "shipped": [],
    # the preset before issue 23: float32, 256 tokens x 16 rows, 300 steps
    "old-300": [
        "model.dtype=float32", "model.vocab_size=384", "data.seq_len=256",
        "data.batch_size=16", "train.steps=300", "optim.lr=2e-3", "optim.warmup_steps=30",
        "train.eval_every=100", "checkpoint.every=100",
    ],
}  # fmt: skip


def run_one(name: str, overrides: list[str], python: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / name
        cmd = [python, "-m", "jaxllm.train", "default", *overrides, f"train.run_dir={run_dir}",
               "logging.progress=lines", "logging.plot=false"]  # fmt: skip
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        if proc.returncode != 0:
            raise SystemExit(f"{name}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
        records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    samples = proc.stdout.split("samples:", 1)[-1].strip().splitlines()
    # the first logged interval includes the compile: steady throughput from the others
    tps = [r["tokens_per_s"] for r in train[1:]] or [train[-1]["tokens_per_s"]]
    return {
        "name": name,
        "overrides": overrides,
        "steps": train[-1]["step"],
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "tokens_per_s": round(sorted(tps)[len(tps) // 2], 1),
        "final_val_loss": round(val[-1], 4),
        "sample": samples[:6],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", help="candidate names to run (default: all)")
    ap.add_argument("--extra", nargs="*", default=[], help="NAME=key=value key=value ...")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--out", default="benchmarks/results/first_run.json")
    args = ap.parse_args(argv)
    candidates = dict(CANDIDATES)
    for spec in args.extra:
        name, _, rest = spec.partition("=")
        candidates[name] = rest.split()
    names = args.only or list(candidates)
    rows = []
    header = f"{'candidate':<12} {'steps':>6} {'wall_s':>8} {'cpu_s':>8} {'tok/s':>8} {'val':>7}"
    print(header)
    for name in names:
        row = run_one(name, candidates[name], args.python)
        rows.append(row)
        print(
            f"{name:<12} {row['steps']:>6} {row['wall_s']:>8} {row['cpu_s']:>8} "
            f"{row['tokens_per_s']:>8} {row['final_val_loss']:>7}",
            flush=True,
        )
    for row in rows:
        print(f"\n--- {row['name']} samples:\n" + "\n".join(row["sample"]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"nproc": os.cpu_count(), "rows": rows}, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
