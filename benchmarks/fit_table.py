"""Do the large presets fit their TPU slice, and the GPU pass's steps one H200? Ahead-of-time
compiles of each preset's real train step with its committed `parallel` / `train` layout (the
GPU rows: `GPU_FITS`), one at a time, from this (CPU) host.

    PYTHONPATH=. JAX_PLATFORMS=cpu python benchmarks/fit_table.py [--only llama-7b ...]
    PYTHONPATH=. JAX_PLATFORMS=cpu python benchmarks/fit_table.py --scan-compare   # the notes
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 PYTHONPATH=. JAX_PLATFORMS=cpu \
        python benchmarks/fit_table.py --gpu     # one H200, as benchmarks/gpu.sh runs it
    PYTHONPATH=. JAX_PLATFORMS=cpu python benchmarks/fit_table.py --only llama-7b \
        --set model.mixers.softmax.impl=xla --out benchmarks/results/fit_table_xla.json

Each compile runs in a child process (`jaxllm.compile.compile_for`: libtpu or the CUDA
plugin, no TPU or GPU) so its wall time and peak RSS are its own; per-chip memory is XLA's
`memory_analysis()` (a GPU's: what jax's allocator may take, XLA_PYTHON_CLIENT_MEM_FRACTION),
FLOPs per step count every loop iteration (`jaxllm.compile.loop_aware_flops`: XLA's ops and
the kernels' declared estimates), and the model's count (MFU's) stands beside them. Prints a
Markdown table and writes benchmarks/results/fit_table.json. `--scan-compare` compiles one
preset unrolled and scanned (`model.scan_layers`) for the compile-time note instead.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

# (preset, topology): the slice each preset's committed layout was sized for.
FITS = [
    ("llama-7b", "v5p-128"),
    ("lc-llama-7b", "v5p-128"),
    ("tnl-7b", "v5p-128"),
    ("hgrn2-7b", "v5p-128"),
    ("cosformer2-7b", "v5p-128"),
    ("llama-70b", "v5p-512"),
    ("mixtral-8x7b", "v5p-128"),
    ("hunyuan-large", "v5p-512"),
]
# --gpu: the GPU pass's train steps (benchmarks/gpu.sh) and the issues' memory targets on one
# H200, compiled without a GPU (the cuda extra)
# (32K rows: full remat and the loss over 2048-position chunks, train.loss_chunk)
_SCAN = "model.scan_layers=true"
_32K = ["data.seq_len=32768", "model.max_seq_len=32768", "train.remat=full",
        "train.loss_chunk=2048"]  # fmt: skip
GPU_FITS = [
    ("llama-1b", "h200", [_SCAN, "data.batch_size=8"]),
    ("llama-1b", "h200", [_SCAN, "data.batch_size=8", "precision.fp8=current"]),
    ("llama-1b", "h200", [_SCAN, "data.batch_size=16"]),
    ("llama-1b", "h200", [_SCAN, "data.batch_size=1", *_32K]),
    ("tnl-1b", "h200", [_SCAN, "data.batch_size=2", "data.seq_len=8192"]),
    ("hgrn2-1b", "h200", [_SCAN, "data.batch_size=2", "data.seq_len=8192"]),
    ("tnl-1b", "h200", [_SCAN, "data.batch_size=1", *_32K]),
    ("hgrn2-1b", "h200", [_SCAN, "data.batch_size=1", *_32K]),
]
# unrolled vs scanned compile of one preset on a small slice (the table's notes)
SCAN_COMPARE = ("llama-1b", "v5p:2x2x1", ["parallel.mesh.fsdp=4", "data.batch_size=16"])
GiB = 2**30


def child(preset: str, topology: str, overrides: list[str]) -> None:
    """Compile one layout and print its report as one JSON line (run in a subprocess)."""
    from jaxllm import compile as aot
    from jaxllm import config

    cfg = config.load(preset, overrides)
    topo = aot.parse_topology(topology)
    row = {"preset": preset, "topology": topology, "overrides": overrides,
           "remat": cfg.train.remat, "microbatches": cfg.train.microbatches,
           "scan_layers": cfg.model.scan_layers, "hbm_bytes": topo.chip.hbm_bytes,
           "chips": topo.chips, "seq_len": cfg.data.seq_len, "batch_size": cfg.data.batch_size,
           "fp8": cfg.precision.fp8}  # fmt: skip
    t0 = time.time()
    try:
        r = aot.compile_for(cfg, topo)
    except Exception as e:  # XLA:TPU refuses some programs over HBM at compile time
        if "RESOURCE_EXHAUSTED" not in str(e) and "Ran out of memory" not in str(e):
            raise
        print(json.dumps({**row, "fits": False, "error": str(e)[:500]}))
        return
    rep = {k: v for k, v in asdict(r).items() if k != "topology"}
    # ru_maxrss: KiB on Linux, this process's peak (lowering, compile and the FLOP count)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({**row, **rep, "total_bytes": r.total_bytes, "fits": r.fits,
                      "compile_s": time.time() - t0, "peak_rss_bytes": peak}))  # fmt: skip


def run_one(preset: str, topology: str, overrides: list[str]) -> dict:
    """`child` in a fresh process (its memory is its own and returned after): its result
    and the whole command's wall time (imports and libtpu start included)."""
    cmd = [sys.executable, __file__, "--child", preset, topology, *overrides]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    wall = time.time() - t0
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        tail = err.strip().splitlines()[-5:]
        return {"preset": preset, "topology": topology, "overrides": overrides, "fits": False,
                "error": " | ".join(tail), "wall_s": wall}  # fmt: skip
    return {**json.loads(lines[-1]), "wall_s": wall}


def mesh_str(mesh: dict) -> str:
    return " × ".join(f"{k} {v}" for k, v in mesh.items() if v > 1) or "1 chip"


def table(rows: list[dict]) -> str:
    head = ("| preset | topology | T × batch | mesh | remat | micro-batches | args GiB | "
            "temps GiB | total GiB / HBM | TFLOPs/step/chip | model TFLOPs | compile s | "
            "peak RSS GiB |")  # fmt: skip
    lines = [head, "|" + " --- |" * 13]
    for r in rows:
        name = r["preset"] + ("" if r.get("scan_layers", True) else " (unrolled)")
        name += f" FP8 {r['fp8']}" if r.get("fp8", "none") != "none" else ""
        shape = f"{r['seq_len']} × {r['batch_size']}" if "seq_len" in r else "-"
        cells = [name, r["topology"], shape, mesh_str(r.get("mesh", {})), r.get("remat", "-"),
                 str(r.get("microbatches", "-"))]  # fmt: skip
        if "total_bytes" in r:
            total, hbm = r["total_bytes"] / GiB, r["hbm_bytes"] / GiB
            cells += [f"{r['argument_bytes'] / GiB:.2f}", f"{r['temp_bytes'] / GiB:.2f}",
                      f"{total:.1f} / {hbm:.0f} ({100 * total / hbm:.0f}%)"
                      + ("" if r["fits"] else " **over**"),
                      f"{r['flops_per_chip'] / 1e12:.0f}"
                      + (f" ({r['kernels_without_flops']} kernels uncounted)"
                         if r.get("kernels_without_flops") else ""),
                      f"{r['model_flops_per_chip'] / 1e12:.0f}"]  # fmt: skip
        else:
            cells += ["-", "-", "fails: " + r.get("error", "")[:60].replace("|", "/"), "-", "-"]
        rss = r.get("peak_rss_bytes")
        cells += [f"{r['wall_s']:.0f}", "-" if rss is None else f"{rss / GiB:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="presets to compile (default: all of FITS)")
    ap.add_argument("--gpu", action="store_true", help="the GPU_FITS rows (one H200: the "
                    "GPU pass's steps) instead; needs the cuda extra")  # fmt: skip
    ap.add_argument("--scan-compare", action="store_true", help=f"unrolled vs scanned "
                    f"{SCAN_COMPARE[0]} on {SCAN_COMPARE[1]} instead")  # fmt: skip
    ap.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="overrides added to every preset's layout (e.g. an attention impl)",
    )
    ap.add_argument("--out", default="benchmarks/results/fit_table.json")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.child[2:])
        return
    if args.scan_compare:
        preset, topology, overrides = SCAN_COMPARE
        jobs = [(preset, topology, [*overrides, f"model.scan_layers={s}"])
                for s in ("false", "true")]  # fmt: skip
        out = Path(args.out.replace("fit_table.json", "fit_table_scan.json"))
    else:
        fits = GPU_FITS if args.gpu else [(p, t, []) for p, t in FITS]
        jobs = [(p, t, [*o, *args.set]) for p, t, o in fits if not args.only or p in args.only]
        out = Path(args.out.replace("fit_table.json", "fit_table_gpu.json") if args.gpu
                   else args.out)  # fmt: skip
    rows = []
    for job in jobs:
        # one compile at a time: a 70B compile alone takes GiBs of host memory
        rows.append(run_one(*job))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "error"}), flush=True)
    print()
    print(table(rows))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
