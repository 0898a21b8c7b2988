"""Does lightning attention cost the same per token at any length, where softmax attention grows?

    python benchmarks/linear_attention.py [--lengths 512 1024 ... 16384] [--batch 1] [--heads 2]
        [--head-dim 64] [--dtype float32] [--rounds 3] [--gla] [--max-temp-gib 2]

On a GPU or TPU, longer and wider, e.g.:
    python benchmarks/linear_attention.py --lengths 2048 4096 8192 16384 32768 65536 \
        --batch 2 --heads 16 --head-dim 128 --dtype bfloat16 --max-temp-gib 60 --gla \
        --softmax-impl cudnn

Times one jitted forward + backward (gradients of q, k, v and the decay) of `lightning_attention`
(the chunked XLA form, impl="xla") and of causal `jax.nn.dot_product_attention` at equal shapes
[B, T, H, K], and with --gla also `gated_linear_attention`. The ops take turns within each
round; each time is the median over rounds, as wall time and as process CPU time (the second
is steadier on a shared CPU). Memory is XLA's temp allocation of the compiled step
(`memory_analysis().temp_size_in_bytes`); a step whose temp exceeds --max-temp-gib is compiled
but not run. Before timing, the chunked ops are checked against their references at a small
size (forward and gradients, float32, RMS ratio ≤ 1e-5). Prints a table of per-token times
and softmax/linear ratios and writes benchmarks/results/linear_attention.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.ops.gated_linear_attention import gated_linear_attention
from jaxllm.ops.lightning_attention import lightning_attention

CHECK_RATIO = 1e-5


def _inputs(B, T, H, K, dtype, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    q, k, v = (jax.random.normal(keys[i], (B, T, H, K)).astype(dtype) for i in range(3))
    log_decay = -(2.0 ** (-8.0 * (jnp.arange(H) + 1) / H))
    log_gate = jax.nn.log_sigmoid(jax.random.normal(keys[3], (B, T, H, K)))
    return q, k, v, log_decay, log_gate


LABELS = {"lightning": "LA", "softmax": "SM", "gla": "GLA"}


def _op(name, softmax_impl):
    if name == "lightning":
        return lambda q, k, v, ld, lg: lightning_attention(q, k, v, ld, impl="xla")
    if name == "gla":
        return lambda q, k, v, ld, lg: gated_linear_attention(q, k, v, lg, impl="xla")
    return lambda q, k, v, ld, lg: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation=softmax_impl
    )


def _step(op, softmax_impl):
    """jit(grad) of Σ o over (q, k, v, log_decay, log_gate); unused arguments get zeros."""
    fn = _op(op, softmax_impl)

    def loss(*args):
        return fn(*args).astype(jnp.float32).sum()

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))


def _rms_ratio(ref, got):
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    return float(np.sqrt(np.mean((ref - got) ** 2)) / np.sqrt(np.mean(ref**2)))


def check_correctness(ops):
    """Chunked vs reference, forward and grads, at B1 T300 H2 K16 in float32 (T % chunk ≠ 0)."""
    q, k, v, ld, lg = _inputs(1, 300, 2, 16, jnp.float32, seed=1)
    pairs = {
        "lightning": (lightning_attention, ld),
        "gla": (gated_linear_attention, lg),
    }
    worst = {}
    for op in ops:
        if op not in pairs:
            continue
        fn, decay = pairs[op]

        def run(impl, fn=fn, decay=decay):
            return jax.value_and_grad(
                lambda *a: jnp.sum(fn(*a, impl=impl) ** 2), argnums=(0, 1, 2, 3)
            )(q, k, v, decay)

        (ref_loss, ref_grads), (got_loss, got_grads) = run("reference"), run("xla")
        ratios = [_rms_ratio(ref_loss, got_loss)]
        ratios += [_rms_ratio(r, g) for r, g in zip(ref_grads, got_grads)]
        worst[op] = max(ratios)
        if not worst[op] <= CHECK_RATIO:
            raise SystemExit(f"{op}: chunked differs from reference, RMS ratio {worst[op]:.3g}")
    return worst


def measure(ops, lengths, B, H, K, dtype, rounds, max_temp, softmax_impl):
    rows = []
    for T in lengths:
        args = _inputs(B, T, H, K, dtype)
        compiled, row = {}, {"T": T}
        for op in ops:
            try:
                exe = _step(op, softmax_impl).lower(*args).compile()
            except Exception as e:  # e.g. XLA running out of memory while autotuning
                row[op] = {"ran": False, "error": f"{type(e).__name__}: {str(e)[:200]}"}
                continue
            temp = exe.memory_analysis().temp_size_in_bytes
            row[op] = {"temp_bytes": int(temp), "ran": temp <= max_temp}
            if row[op]["ran"]:
                jax.block_until_ready(exe(*args))
                compiled[op] = exe
        walls, cpus = {op: [] for op in compiled}, {op: [] for op in compiled}
        for _ in range(rounds):
            for op, exe in compiled.items():
                w, c = time.perf_counter(), time.process_time()
                jax.block_until_ready(exe(*args))
                walls[op].append(time.perf_counter() - w)
                cpus[op].append(time.process_time() - c)
        for op in compiled:
            row[op]["wall_s"] = statistics.median(walls[op])
            row[op]["cpu_s"] = statistics.median(cpus[op])
            row[op]["wall_us_per_token"] = row[op]["wall_s"] * 1e6 / (B * T)
            row[op]["cpu_us_per_token"] = row[op]["cpu_s"] * 1e6 / (B * T)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _fmt(row, op, key, scale=1.0, spec="{:.2f}"):
    value = row[op].get(key)
    return "-" if value is None else spec.format(value * scale)


def print_table(rows, ops, clock):
    key = f"{clock}_us_per_token"
    linear = [op for op in ops if op != "softmax"]
    head = "T".rjust(7)
    for op in ops:
        head += f"{LABELS[op] + ' µs/tok':>12}{LABELS[op] + ' MiB':>11}"
    for op in linear:
        head += f"{'SM/' + LABELS[op] + ' time':>13}{'SM/' + LABELS[op] + ' mem':>12}"
    print(f"\nforward+backward, {clock} time per token (median) and XLA temp memory")
    print(head)
    for row in rows:
        line = str(row["T"]).rjust(7)
        for op in ops:
            line += _fmt(row, op, key, 1.0, "{:.3f}").rjust(12)
            line += _fmt(row, op, "temp_bytes", 2**-20, "{:.1f}").rjust(11)
        for op in linear:
            t_sm, t_op = row["softmax"].get(key), row[op].get(key)
            m_sm, m_op = row["softmax"].get("temp_bytes"), row[op].get("temp_bytes")
            time_ratio = "-" if t_sm is None or t_op is None else f"{t_sm / t_op:.2f}"
            mem_ratio = "-" if m_sm is None or not m_op else f"{m_sm / m_op:.2f}"
            line += time_ratio.rjust(13) + mem_ratio.rjust(12)
        print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gla", action="store_true", help="also time gated_linear_attention")
    ap.add_argument("--max-temp-gib", type=float, default=2.0)
    ap.add_argument(
        "--softmax-impl", default=None, choices=["xla", "cudnn"],
        help="jax.nn.dot_product_attention's implementation (default: JAX's choice)",
    )  # fmt: skip
    ap.add_argument("--out", default="benchmarks/results/linear_attention.json")
    a = ap.parse_args()

    ops = ["lightning", "softmax"] + (["gla"] if a.gla else [])
    # Full float32 matmuls for the check: GPUs default to TF32, TPUs to bfloat16 passes.
    with jax.default_matmul_precision("highest"):
        worst = check_correctness(ops)
    print("correctness (chunked vs reference, worst RMS ratio):", worst, flush=True)
    rows = measure(
        ops, a.lengths, a.batch, a.heads, a.head_dim, jnp.dtype(a.dtype), a.rounds,
        a.max_temp_gib * 2**30, a.softmax_impl,
    )  # fmt: skip
    meta = {
        "device": str(jax.devices()[0].device_kind),
        "platform": jax.devices()[0].platform,
        "jax": jax.__version__,
        "host": platform.node(),
        "shape": {"B": a.batch, "H": a.heads, "K": a.head_dim, "V": a.head_dim},
        "dtype": a.dtype,
        "softmax_impl": a.softmax_impl,
        "rounds": a.rounds,
        "check_rms_ratio": worst,
    }
    print(
        f"\n{meta['device']} ({meta['platform']}), B{a.batch} H{a.heads} K=V={a.head_dim}, "
        f"{a.dtype}; '-': not run (temp > --max-temp-gib, or an 'error' in the JSON)"
    )
    print_table(rows, ops, "wall")
    if meta["platform"] == "cpu":
        # On an accelerator the process CPU time is only the host's dispatch.
        print_table(rows, ops, "cpu")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
