"""Does the FP-quantization law (Capybara, arXiv 2501.02423) order real tiny runs correctly?

    python benchmarks/precision_law_check.py [--steps 300] [--block 32] [--seq 128] [--batch 16]

Trains the same tiny model on the embedded corpus with the paper's study design — the weight in
the forward and backward GEMMs and the activation in the weight-gradient GEMM (P2, P4, P6)
fake-quantized to ExMy with one scale per `--block` elements along each GEMM's inner dimension
— in bfloat16 (no quantization), E4M3 and E2M1, and compares the final validation losses with
the ordering and the gaps `jaxllm.scaling.fp_quant_loss` predicts at this N and D. The law's
constants come from 41M–679M-parameter runs, so at a tiny N only the ordering (and the sign of
the gaps) is a fair check, not the values. Prints a table and writes
benchmarks/results/precision_law_check.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from jaxllm import config
from jaxllm.scaling import fp_quant_loss
from jaxllm.training.loop import train

FORMATS = {"bf16": None, "e4m3": (4, 3), "e2m1": (2, 1)}


def run(fmt: str, args) -> dict:
    spec = FORMATS[fmt]
    q = []
    if spec is not None:
        s = f"e{spec[0]}m{spec[1]}/{args.block}"
        q = [f"precision.quantize.{n}={s}" for n in ("w", "w_dx", "x_dw")]
    with tempfile.TemporaryDirectory() as d:
        cfg = config.load("default", [
            f"model.d_model={args.d_model}", "model.n_layers=2", "model.n_heads=4",
            f"model.d_ff={3 * args.d_model}", "model.vocab_size=260", "model.max_seq_len=128",
            "model.dtype=bfloat16", f"data.seq_len={args.seq}", f"data.batch_size={args.batch}",
            f"train.steps={args.steps}", "train.eval_every=0", "train.eval_batches=16",
            "train.sample_lines=0", "optim.lr=3e-3", "optim.warmup_steps=20",
            "checkpoint.every=0", "logging.tensorboard=false", "logging.plot=false",
            "logging.progress=lines", "logging.every=50", f"train.run_dir={d}", *q,
        ])  # fmt: skip
        summary = train(cfg)
    n = cfg.model.n_layers * (4 * cfg.model.d_model**2 + 3 * cfg.model.d_model * cfg.model.d_ff)
    tokens = args.steps * cfg.data.batch_size * cfg.data.seq_len
    e, m = spec if spec else (8, 7)
    return {
        "format": fmt,
        "val_loss": next(r["val_loss"] for r in reversed(summary["records"]) if "val_loss" in r),
        "train_loss_last": summary["records"][-2]["loss"] if len(summary["records"]) > 1 else None,
        "n_params_nonembed": n,
        "tokens": tokens,
        "law_loss": float(fp_quant_loss(n, tokens, e, m, args.block)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", default="benchmarks/results/precision_law_check.json")
    args = ap.parse_args()
    rows = [run(f, args) for f in FORMATS]
    base = rows[0]
    print(f"\nN={base['n_params_nonembed']} D={base['tokens']} block={args.block} (P2+P4+P6)")
    print(f"{'format':>8} {'val loss':>10} {'Δ vs bf16':>10} {'law loss':>10} {'law Δ':>10}")
    for r in rows:
        print(f"{r['format']:>8} {r['val_loss']:>10.4f} {r['val_loss'] - base['val_loss']:>+10.4f} "
              f"{r['law_loss']:>10.4f} {r['law_loss'] - base['law_loss']:>+10.4f}")  # fmt: skip
    real = [r["format"] for r in sorted(rows, key=lambda r: r["val_loss"])]
    law = [r["format"] for r in sorted(rows, key=lambda r: r["law_loss"])]
    print(f"ordering, measured: {' < '.join(real)}; law: {' < '.join(law)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"block": args.block, "steps": args.steps, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
