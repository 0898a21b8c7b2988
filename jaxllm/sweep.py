"""`python -m jaxllm.sweep CONFIG lr=1e-3,3e-3 data.batch_size=8,16 [key=value ...]`

Runs a grid of short trainings in this process (tiny models on the CPU) and collects, per run,
the final and best validation loss and the steps and tokens needed to reach a target loss,
into ``results.csv`` / ``results.json`` under ``--out``. A value with commas is a grid axis;
one without is a plain override. ``lr`` and ``batch`` are short for ``optim.lr`` and
``data.batch_size``.

With two or more batch sizes, the best run of each batch size (fewest steps to the target)
feeds the Surge fits of `jaxllm.scaling`: ``B_noise`` from the steps/tokens trade-off
(`fit_b_noise`, tokens), then ``lr_max`` (`fit_surge`), written to ``fit.json``.

The target loss (``--target``) defaults to the highest of the runs' best smoothed training
losses, so every run reaches it. Training losses are smoothed with a bias-corrected EMA
(``--smooth``, 0.9) before the threshold, because single-step losses are noisy.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
from pathlib import Path
from typing import Any

from jaxllm import choices
from jaxllm import config as config_lib
from jaxllm.optim import resolved
from jaxllm.scaling import fit_b_noise, fit_surge
from jaxllm.training.loop import train

ALIASES = {"lr": "optim.lr", "batch": "data.batch_size"}
FIXED = [
    "train.resume=never",
    "train.sample_lines=0",
    "checkpoint.every=0",
    "logging.every=1",
    "logging.plot=false",
    "logging.tensorboard=false",
    "logging.progress=lines",
]


def parse_grid(items: list[str]) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """(grid axes [(key, [values])], fixed overrides) from ``key=v1,v2`` / ``key=v`` items."""
    axes, fixed = [], []
    for item in items:
        if "=" not in item:
            raise config_lib.ConfigError(f"sweep argument {item!r} is not key=value[,value...]")
        key, raw = item.split("=", 1)
        key = ALIASES.get(key, key)
        if "," in raw and not raw.lstrip().startswith(("[", "{")):
            axes.append((key, [v.strip() for v in raw.split(",") if v.strip()]))
        else:
            fixed.append(f"{key}={raw}")
    return axes, fixed


def smoothed(losses: list[tuple[int, float]], beta: float) -> list[tuple[int, float]]:
    """Bias-corrected exponential moving average of (step, loss) pairs."""
    out, avg = [], 0.0
    for i, (step, loss) in enumerate(losses, start=1):
        avg = beta * avg + (1 - beta) * loss
        out.append((step, avg / (1 - beta**i)))
    return out


def steps_to_target(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((s for s, x in curve if x <= target), None)


def run_grid(
    preset: str, items: list[str], steps: int, out_dir: Path, smooth: float = 0.9
) -> list[dict[str, Any]]:
    """Train every point of the grid; returns one record per run (curves included)."""
    axes, fixed = parse_grid(items)
    combos = list(itertools.product(*[[(k, v) for v in vals] for k, vals in axes]))
    results = []
    for i, combo in enumerate(combos):
        point = [f"{k}={v}" for k, v in combo]
        cfg = config_lib.load(
            preset, [*FIXED, f"train.steps={steps}", f"train.run_dir={out_dir / f'run{i:03d}'}",
                     *fixed, *point],
        )  # fmt: skip
        choices.check(cfg)
        print(f"[sweep] run {i + 1}/{len(combos)}: {' '.join(point) or '(no grid)'}", flush=True)
        summary = train(cfg)
        records = summary["records"]
        train_curve = [(r["step"], r["loss"]) for r in records if "loss" in r]
        vals = [r["val_loss"] for r in records if "val_loss" in r]
        tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
        results.append({
            "run": i,
            **{k: v for k, v in combo},
            "lr": resolved(cfg.optim)["lr"],
            "batch_size": cfg.data.batch_size,
            "tokens_per_step": tokens_per_step,
            "steps": summary["step"],
            "final_train_loss": train_curve[-1][1] if train_curve else math.nan,
            "final_val_loss": summary.get("val_loss", vals[-1] if vals else math.nan),
            "best_val_loss": min(vals) if vals else math.nan,
            "curve": smoothed(train_curve, smooth),
        })  # fmt: skip
    return results


def add_target(results: list[dict], target: float | None) -> float:
    """Fill ``steps_to_target`` / ``tokens_to_target`` in every result; returns the target."""
    finite = [min(x for _, x in r["curve"]) for r in results if r["curve"]]
    finite = [x for x in finite if math.isfinite(x)]
    if target is None:
        target = max(finite) if finite else math.nan
    for r in results:
        s = steps_to_target(r["curve"], target)
        r["target_loss"] = target
        r["steps_to_target"] = s
        r["tokens_to_target"] = None if s is None else s * r["tokens_per_step"]
    return target


def surge_fit(results: list[dict]) -> dict[str, Any]:
    """Best lr per batch size (fewest steps to the target), then `fit_b_noise` on their
    (steps, tokens) and `fit_surge` on (tokens per step, best lr)."""
    best: dict[int, dict] = {}
    for r in results:
        if r["steps_to_target"] is None:
            continue
        b = r["batch_size"]
        if b not in best or r["steps_to_target"] < best[b]["steps_to_target"]:
            best[b] = r
    rows = [best[b] for b in sorted(best)]
    out: dict[str, Any] = {
        "best": [{k: r[k] for k in ("batch_size", "tokens_per_step", "lr", "steps_to_target",
                                     "tokens_to_target")} for r in rows],
    }  # fmt: skip
    if len(rows) < 2:
        out["error"] = "a Surge fit needs runs at 2 or more batch sizes that reach the target"
        return out
    try:
        bn = fit_b_noise(
            [r["steps_to_target"] for r in rows], [r["tokens_to_target"] for r in rows]
        )
        out["b_noise_tokens"], out["s_min"], out["e_min_tokens"] = bn.b_noise, bn.s_min, bn.e_min
        fit = fit_surge([r["tokens_per_step"] for r in rows], [r["lr"] for r in rows], bn.b_noise)
        out["lr_max"] = fit.lr_max
    except ValueError as e:
        out["error"] = str(e)
    # Without the steps/tokens trade-off, B_noise can still be fitted from the lr optimum.
    try:
        free = fit_surge([r["tokens_per_step"] for r in rows], [r["lr"] for r in rows])
        out["free_fit"] = {"b_noise_tokens": free.b_noise, "lr_max": free.lr_max}
    except ValueError as e:
        out["free_fit_error"] = str(e)
    return out


def write(results: list[dict], fit: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = [k for k in results[0] if k != "curve"] if results else []
    with open(out_dir / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(results)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    (out_dir / "fit.json").write_text(json.dumps(fit, indent=1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jaxllm.sweep", description=__doc__.split("\n")[0])
    ap.add_argument("config", help="preset name or YAML path")
    ap.add_argument("grid", nargs="*", help="key=v1,v2 (a grid axis) or key=v (an override)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--out", default="runs/sweep")
    ap.add_argument("--target", type=float, default=None, help="loss to reach")
    ap.add_argument("--smooth", type=float, default=0.9, help="EMA of the training loss")
    args = ap.parse_args(argv)
    out_dir = Path(args.out)
    try:
        results = run_grid(args.config, args.grid, args.steps, out_dir, args.smooth)
    except config_lib.ConfigError as e:
        print(f"error: {e}")
        return 2
    target = add_target(results, args.target)
    fit = surge_fit(results)
    write(results, fit, out_dir)
    print(f"target loss {target:.4f}")
    print("run  batch  lr        final_val  best_val  steps→target  tokens→target")
    for r in results:
        print(f"{r['run']:>3}  {r['batch_size']:>5}  {r['lr']:<8.3g}  {r['final_val_loss']:>9.4f}"
              f"  {r['best_val_loss']:>8.4f}  {r['steps_to_target']!s:>12}"
              f"  {r['tokens_to_target']!s:>13}")  # fmt: skip
    print("surge fit:", json.dumps({k: v for k, v in fit.items() if k != "best"}))
    print(f"wrote {out_dir / 'results.csv'}, results.json, fit.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
