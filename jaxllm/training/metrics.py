"""Throughput and MFU, and where metrics go: metrics.jsonl, TensorBoard, progress display."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from tensorboardX import SummaryWriter
from tqdm import tqdm

# Dense bf16 peak FLOP/s per chip, matched against `device.device_kind`, longest key first.
PEAK_FLOPS = {
    "TPU v2": 45e12,
    "TPU v3": 123e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "TPU7x": 2307e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "H200": 989e12,
    "H800": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
    "V100": 125e12,
}


def peak_flops_per_device(dtype: str = "bfloat16") -> tuple[float, str]:
    """(peak FLOP/s of one local device, where the number came from).

    Accelerators: the table above. CPU: a matmul in `dtype` timed now, since CPUs vary too much
    for a table.
    """
    dev = jax.local_devices()[0]
    if dev.platform != "cpu":
        kind = dev.device_kind
        for key in sorted(PEAK_FLOPS, key=len, reverse=True):
            if key.lower() in kind.lower():
                return PEAK_FLOPS[key], f"table: {key}"
        return float("nan"), f"unknown device {kind!r}"
    return measure_matmul_flops(dtype), "measured matmul"


def measure_matmul_flops(dtype: str = "float32", n: int = 512, seconds: float = 0.3) -> float:
    """FLOP/s of an n×n×n matmul on the first device, best of a short run."""
    with jax.default_device(jax.local_devices()[0]):
        a = jnp.ones((n, n), dtype)
        f = jax.jit(lambda x: x @ x)
        f(a).block_until_ready()
        best = float("inf")
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            f(a).block_until_ready()
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


class MetricsWriter:
    """Appends metrics as JSON lines (and TensorBoard scalars when enabled)."""

    def __init__(self, run_dir: Path, *, tensorboard: bool, resume_step: int | None):
        # one writer per file: in a multi-process run the other processes keep their own
        p = jax.process_index()
        self.path = run_dir / ("metrics.jsonl" if p == 0 else f"metrics.process{p}.jsonl")
        if resume_step is None:
            self.path.write_text("")
        else:
            _truncate_after(self.path, resume_step)
        self.file = self.path.open("a")
        self.tb = None
        if tensorboard:
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _truncate_after(path: Path, step: int) -> None:
    """Drop lines logged after `step` by a run that died before its next checkpoint."""
    if not path.exists():
        return
    kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in kept))


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


class Progress:
    """A tqdm bar on a terminal, plain log lines otherwise."""

    def __init__(self, total: int, initial: int, mode: str = "auto"):
        self.bar = None
        if mode == "bar" or (mode == "auto" and sys.stderr.isatty()):
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, step: int, record: dict) -> None:
        text = _fmt(record)
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(text, refresh=True)
        else:
            print(f"step {step:>6} | {text}", flush=True)

    def log(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt(record: dict) -> str:
    parts = []
    for key, fmt in (
        ("loss", "{:.4f}"),
        ("val_loss", "{:.4f}"),
        ("grad_norm", "{:.3f}"),
        ("lr", "{:.2e}"),
        ("tokens_per_s", "{:,.0f}"),
        ("mfu", "{:.1%}"),
    ):
        if key in record:
            parts.append(f"{key} " + fmt.format(record[key]))
    return " | ".join(parts)


def plot_losses(path: Path, records: list[dict]) -> None:
    # matplotlib (about 1 s to import) only when a plot is asked for; the backend before pyplot.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train")
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
