"""Peak device memory of a training step per `train.remat` policy, against sequence length.

    python benchmarks/memory.py [--seq 512 1024 2048 4096] [--layers 4] [--d-model 256]

For each policy (none, full, minimal, save_dots, offload with α = 0 and 0.5) and sequence
length the loss-and-gradient function of a small decoder (batch 1, bfloat16 compute) is
compiled ahead of time from abstract shapes (nothing is allocated) and XLA's
`compiled.memory_analysis()` gives the bytes: `temp` (activations and scratch: what remat
changes), arguments, outputs, and `host_temp` (what the offload policy puts in pinned host
memory). Peak device bytes = arguments + outputs + temp − aliased. Prints a table and writes
benchmarks/results/memory.json.

On the CPU backend the "pinned host" is the same memory as the device, so the offload rows
show what XLA's host-offload passes do there (compile and run, nothing moves); on a GPU or a
TPU the offloaded names leave the device. Note also that XLA:CPU's scheduler does not turn
rematerialisation into lower peak memory at all (jax 0.10.2): even a plain chain of eight
`jax.checkpoint`-ed tanh-MLP layers compiles to *more* temp memory than without (102 vs 88
MiB), with every `xla_cpu_scheduler_type`. The CPU table therefore shows that every policy
compiles and what XLA:CPU allocates, not the savings; the claim "offload fits a longer
sequence than full" needs a GPU/TPU compile (`--platform` is whatever JAX_PLATFORMS selects).

TPU mode (needs libtpu; nothing runs, the step is compiled ahead of time from this host):

    python benchmarks/memory.py --topology v5p-8 --preset tnl-7b --seq 32768 163840 \
        [--layers 32] [--batch 4] [--policies full offload] [--set model.vocab_size=32000]

compiles the preset's real train step (`jaxllm.compile.compile_for`: FSDP over the slice,
batch = one sequence per chip by default) per policy and sequence length and reports per-chip
device bytes (arguments, temporaries, total against the chip's HBM) and pinned-host bytes,
then per policy the longest measured sequence that fits and the affine estimate of where the
total reaches HBM (from the two longest measured lengths). Writes memory_tpu.json. The 7B
presets scan their layers (`model.scan_layers`); `--set model.scan_layers=false` compiles the
unrolled decoder, where XLA:TPU postpones the offload copies into the backward pass and
offload saves nothing.

Measured (tnl-7b scanned, v5p:2x2x1, batch 4, vocab 32000, jax 0.10.2; GiB per chip of 95):

    policy      seq  tokens/step   args    temp   total   host  fits
    full      32768      128K     18.99   33.66   52.68   0.00  yes
    full     131072      512K     18.99   86.27  105.29   0.00  no
    full     262144        1M     18.99  165.94 (refused)        no
    offload   32768      128K     18.99   25.69   44.74  16.00  yes
    offload  131072      512K     18.99   60.59   79.62  64.00  yes
    offload  262144        1M     18.99   60.15   79.19 128.00  yes

Longest fit: full 32768 measured (affine estimate 111838), offload 262144 measured: offload
trains a longer sequence than full remat in the same HBM (benchmarks/README.md: why, and
the caveats: XLA's own rematerialisation near the limit, pinned host memory per host).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm import config, models
from jaxllm.training.remat import POLICIES as POLICY_NAMES
from jaxllm.training.remat import block_remat

POLICIES = [("none", 0.0), ("full", 0.0), ("minimal", 0.0), ("save_dots", 0.0),
            ("offload", 0.0), ("offload", 0.5)]  # fmt: skip


def measure(cfg: config.Config, seq: int, policy: str, fraction: float) -> dict:
    abstract = nnx.eval_shape(lambda: models.build(cfg.model, 0))
    graphdef, params = nnx.split(abstract, nnx.Param)
    remat = block_remat(policy, fraction)

    def loss(p, tokens):
        logits = nnx.merge(graphdef, p)(tokens[:, :-1], remat=remat)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    tokens = jax.ShapeDtypeStruct((1, seq + 1), jnp.int32)
    compiled = jax.jit(jax.value_and_grad(loss)).lower(params, tokens).compile()
    m = compiled.memory_analysis()
    peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
    return {
        "policy": policy if policy != "offload" else f"offload(α={fraction})",
        "seq": seq,
        "temp_bytes": m.temp_size_in_bytes,
        "argument_bytes": m.argument_size_in_bytes,
        "output_bytes": m.output_size_in_bytes,
        "host_temp_bytes": getattr(m, "host_temp_size_in_bytes", 0),
        "peak_device_bytes": peak - m.alias_size_in_bytes,
    }


def measure_tpu(args, seq: int, policy: str, fraction: float) -> dict:
    """One ahead-of-time TPU compile of `args.preset`'s train step: per-chip bytes."""
    from jaxllm import compile as aot

    topo = aot.parse_topology(args.topology)
    cfg = config.load(
        args.preset,
        [f"data.seq_len={seq}", f"model.max_seq_len={seq}", f"data.batch_size={args.batch}",
         "parallel.mesh.data=1", "parallel.mesh.fsdp=-1", "train.microbatches=1",
         f"train.remat={policy}", f"train.offload_fraction={fraction}",
         *([f"model.n_layers={args.layers}"] if args.layers else []), *args.set],
    )  # fmt: skip
    row = {"policy": policy if policy != "offload" else f"offload(α={fraction})", "seq": seq,
           "tokens_per_step": seq * args.batch, "hbm_bytes": topo.chip.hbm_bytes}  # fmt: skip
    try:
        r = aot.compile_for(cfg, topo)
    except Exception as e:  # XLA:TPU may refuse a program over HBM at compile time
        if "RESOURCE_EXHAUSTED" not in str(e) and "Ran out of memory" not in str(e):
            raise
        need = re.search(r"HLO temporaries \(([\d.]+)G\)", str(e))
        if need:  # XLA's figure, in its GB (2**30 bytes, as memory_analysis counts)
            row["temp_required_bytes"] = int(float(need.group(1)) * 2**30)
        return {**row, "fits": False, "error": str(e)[:300]}
    return {**row, "argument_bytes": r.argument_bytes, "temp_bytes": r.temp_bytes,
            "total_bytes": r.total_bytes, "host_argument_bytes": r.host_argument_bytes,
            "host_temp_bytes": r.host_temp_bytes, "fits": r.fits}  # fmt: skip


def longest_fit(rows: list[dict]) -> tuple[int | None, float | None]:
    """(longest measured seq that fits, affine estimate of the seq where total = HBM from the
    two longest compiled lengths; None without two)."""
    fit = [r["seq"] for r in rows if r["fits"]]
    done = sorted((r for r in rows if "total_bytes" in r), key=lambda r: r["seq"])[-2:]
    est = None
    if len(done) == 2 and done[1]["total_bytes"] > done[0]["total_bytes"]:
        a, b = done
        slope = (b["total_bytes"] - a["total_bytes"]) / (b["seq"] - a["seq"])
        est = a["seq"] + (a["hbm_bytes"] - a["total_bytes"]) / slope
    return (max(fit) if fit else None), est


def main_tpu(args) -> None:
    gib = 2**30
    rows = []
    for policy in args.policies:
        name, _, frac = policy.partition(":")
        for seq in args.seq:
            rows.append(measure_tpu(args, seq, name, float(frac or 0.0)))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.preset} on {args.topology}, batch {args.batch}, "
          f"{args.layers or 'preset'} layers {' '.join(args.set)}; GiB per chip")  # fmt: skip
    print(f"{'policy':>16}{'seq':>8}{'tokens':>9}{'args':>8}{'temp':>8}{'total':>8}"
          f"{'host':>8}  fits")  # fmt: skip
    for r in rows:
        if "total_bytes" not in r:
            need = r.get("temp_required_bytes", 0) / gib
            print(f"{r['policy']:>16}{r['seq']:>8}{r['tokens_per_step']:>9}  over HBM at "
                  f"compile (temporaries {need:.2f})")  # fmt: skip
            continue
        host = (r["host_argument_bytes"] + r["host_temp_bytes"]) / gib
        print(f"{r['policy']:>16}{r['seq']:>8}{r['tokens_per_step']:>9}"
              f"{r['argument_bytes'] / gib:8.2f}{r['temp_bytes'] / gib:8.2f}"
              f"{r['total_bytes'] / gib:8.2f}{host:8.2f}  {r['fits']}")  # fmt: skip
    summary = {}
    for name in dict.fromkeys(r["policy"] for r in rows):
        best, est = longest_fit([r for r in rows if r["policy"] == name])
        summary[name] = {"longest_measured_fit": best, "affine_estimate": est}
        print(f"{name:>16}: longest measured seq that fits {best}, affine estimate "
              f"{'-' if est is None else round(est)}")  # fmt: skip
    out = Path(args.out.replace("memory.json", "memory_tpu.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    scan = config.load(args.preset, args.set).model.scan_layers
    meta = {"topology": args.topology, "preset": args.preset, "layers": args.layers,
            "batch": args.batch, "set": args.set, "scan_layers": scan}  # fmt: skip
    out.write_text(json.dumps({"meta": meta, "rows": rows, "summary": summary}, indent=1))
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--layers", type=int, default=None, help="CPU: 4; TPU: the preset's")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--out", default="benchmarks/results/memory.json")
    ap.add_argument("--topology", help="compile for this TPU slice (e.g. v5p-8) instead")
    ap.add_argument("--preset", default="tnl-7b")
    ap.add_argument("--batch", type=int, default=4, help="TPU: sequences per step")
    ap.add_argument("--policies", nargs="+", default=list(POLICY_NAMES),
                    help="TPU: train.remat values, offload:α for a fraction")  # fmt: skip
    ap.add_argument("--set", nargs="*", default=[], help="TPU: extra key=value overrides")
    args = ap.parse_args()
    if args.topology:
        main_tpu(args)
        return
    args.layers = args.layers or 4
    cfg = config.load(
        "default",
        [f"model.d_model={args.d_model}", f"model.n_layers={args.layers}",
         f"model.d_ff={3 * args.d_model}", "model.dtype=bfloat16",
         f"model.max_seq_len={max(args.seq) + 1}", f"data.seq_len={max(args.seq)}"],
    )  # fmt: skip
    rows = []
    for seq in args.seq:
        for policy, frac in POLICIES:
            rows.append(measure(cfg, seq, policy, frac))
            print(json.dumps(rows[-1]), flush=True)
    mib = 2**20
    names = list(dict.fromkeys(r["policy"] for r in rows))
    print(f"\npeak device MiB (temp MiB) — {jax.devices()[0].platform}, d_model "
          f"{args.d_model}, {args.layers} layers, batch 1, bf16")  # fmt: skip
    print("seq".rjust(6) + "".join(n.rjust(22) for n in names))
    for seq in args.seq:
        cells = []
        for n in names:
            r = next(r for r in rows if r["seq"] == seq and r["policy"] == n)
            cells.append(f"{r['peak_device_bytes'] / mib:.1f} ({r['temp_bytes'] / mib:.1f})")
        print(str(seq).rjust(6) + "".join(c.rjust(22) for c in cells))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"platform": jax.devices()[0].platform, "d_model": args.d_model,
            "layers": args.layers, "batch": 1, "dtype": "bfloat16"}  # fmt: skip
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
