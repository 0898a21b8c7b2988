"""How fast are the Pallas kernels: lightning attention against its XLA form and softmax
attention, and the FP8 GEMM against bf16?

    python benchmarks/kernels.py [--lengths 1024 2048 ... 65536] [--batch 4] [--heads 32]
        [--head-dim 128] [--dtype bfloat16] [--rounds 5] [--gla-lengths 2048 8192 32768]
        [--gemm 4096 8192] [--max-temp-gib 60]

Defaults are the official lightning-attention benchmark's shapes (b=4, h=32, d=128, bf16,
T = 1K…64K) and LLM-sized GEMMs: meant for a GPU (`JAX_PLATFORMS=cuda`) or a TPU. On the CPU
(the default platform here) shrink them, e.g. `--lengths 256 512 --batch 1 --heads 2
--head-dim 64 --gemm 256`: there the Pallas kernels run in *interpret mode*, so their times say
nothing about the kernels (the table says so).

Gated linear attention (--gla-lengths): forward + backward (gradients of q, k, v and the log
gates) of `kernels_pallas.gated_linear_attention` against `jaxllm.ops.gated_linear_attention
(impl="xla")`, the same shapes, after the same kind of check (RMS ratio ≤ 5e-5).

Lightning attention: one jitted forward + backward (gradients of q, k, v) of
- "pallas": `kernels_pallas.lightning_attention` (Mosaic on TPU, Triton on GPU),
- "xla": `jaxllm.ops.lightning_attention(impl="xla")`, the chunked form,
- "softmax": causal `jax.nn.dot_product_attention` (cuDNN flash attention on GPU),
the ops taking turns within each round, the median over rounds; a step whose XLA temp memory
exceeds --max-temp-gib is compiled but not run. Before timing, the kernel is checked against
the XLA form at a small size (float32, RMS ratio ≤ 1e-5).

Softmax attention (--softmax-lengths, GQA with H/4 kv heads): forward + backward of causal
attention over rows packed with 4 documents each, as a train batch is, by
- "pallas": `kernels_pallas.flash_attention` (the Triton flash kernel `ops.attention` takes
  for packed rows on CUDA), and "pallas_plain" the same kernel on unpacked rows,
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")` on unpacked rows (jax's cuDNN
  path takes no segment ids: the speed packed rows would have with one),
- "blocked": `jaxllm.ops.attention.attention_blocked`, the XLA form the packed rows took
  before the kernel;
after a check of the kernel against `attention_reference` (float32, RMS ratio ≤ 1e-5).

FP8 GEMM: TFLOP/s of [M, K] @ [K, N] (M = N = K = each --gemm size) for bf16 `jnp.dot`, the XLA
FP8 path (`lax.dot_general` on float8_e4m3fn with per-tensor scales applied to the product)
and `kernels_pallas.fp8_matmul`; skipped when that package does not import.

Prints tables and writes benchmarks/results/kernels.json.
"""

from __future__ import annotations

import argparse
import functools
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

from jaxllm.ops.attention import attention_blocked, attention_reference, query_block
from jaxllm.ops.gated_linear_attention import gated_linear_attention as gla_ops
from jaxllm.ops.lightning_attention import lightning_attention as la_ops
from kernels_pallas.flash_attention import flash_attention as flash_kernel
from kernels_pallas.gated_linear_attention import gated_linear_attention as gla_kernel
from kernels_pallas.lightning_attention import lightning_attention as la_kernel

CHECK_RATIO = 1e-5
# The gates' gradient of GLA is a reverse cumulative sum of terms that cancel (kernel api.py).
GLA_CHECK_RATIO = 5e-5
ATTENTION_OPS = ("pallas", "xla", "softmax")
GLA_OPS = ("pallas", "xla")
SOFTMAX_OPS = ("pallas", "pallas_plain", "cudnn", "blocked")


def _time(fns, args, rounds):
    """Median wall seconds per fn, the fns taking turns within each round."""
    for fn in fns.values():
        jax.block_until_ready(fn(*args))
    walls = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(fn(*args))
            walls[name].append(time.perf_counter() - t)
    return {name: statistics.median(w) for name, w in walls.items()}


def _rms_ratio(ref, got):
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    return float(np.sqrt(np.mean((ref - got) ** 2)) / np.sqrt(np.mean(ref**2)))


def _attention_inputs(B, T, H, K, dtype, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    q, k, v = (jax.random.normal(keys[i], (B, T, H, K)) / np.sqrt(K) for i in range(3))
    log_decay = -(2.0 ** (-8.0 * (jnp.arange(H) + 1) / H))
    return q.astype(dtype), k.astype(dtype), (v * np.sqrt(K)).astype(dtype), log_decay


def _attention_op(name, platform_):
    if name == "pallas":
        return lambda q, k, v, g: la_kernel(q, k, v, g)
    if name == "xla":
        return lambda q, k, v, g: la_ops(q, k, v, g, impl="xla")
    impl = "cudnn" if platform_ == "gpu" else None
    return lambda q, k, v, g: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation=impl
    )


def _fwd_bwd(name, platform_):
    fn = _attention_op(name, platform_)

    def loss(q, k, v, g):
        return fn(q, k, v, g).astype(jnp.float32).sum()

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def check_kernel():
    """Kernel vs XLA form, output and gradients, at B1 T300 H2 K64 in float32."""
    args = _attention_inputs(1, 300, 2, 64, jnp.float32, seed=1)

    def run(fn):
        return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(fn(*a) ** 2), argnums=(0, 1, 2)))(
            *args
        )

    l_ref, g_ref = run(_attention_op("xla", ""))
    l_got, g_got = run(_attention_op("pallas", ""))
    worst = max([_rms_ratio(l_ref, l_got)] + [_rms_ratio(r, g) for r, g in zip(g_ref, g_got)])
    if not worst <= CHECK_RATIO:
        raise SystemExit(f"lightning kernel differs from the XLA form: RMS ratio {worst:.3g}")
    return worst


def _gla_inputs(B, T, H, K, dtype, seed=0):
    """q, k, v as the attention inputs; log gates logsigmoid(randn + 4): HGRN2-like forget
    gates near 1 (f ≈ 0.98)."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q, k, v = (jax.random.normal(keys[i], (B, T, H, K)) / np.sqrt(K) for i in range(3))
    g = jax.nn.log_sigmoid(jax.random.normal(keys[3], (B, T, H, K)) + 4.0)
    return q.astype(dtype), k.astype(dtype), (v * np.sqrt(K)).astype(dtype), g


def _gla_fwd_bwd(name, platform_=""):
    """Forward + backward (gradients of q, k, v and the log gates) of the GLA kernel or its
    chunked XLA form."""
    fn = gla_kernel if name == "pallas" else functools.partial(gla_ops, impl="xla")

    def loss(q, k, v, g):
        return fn(q, k, v, g).astype(jnp.float32).sum()

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))


def check_gla():
    """GLA kernel vs XLA form, gradients of q, k, v, g at B1 T300 H2 K64 in float32."""
    args = _gla_inputs(1, 300, 2, 64, jnp.float32, seed=1)
    want, got = _gla_fwd_bwd("xla")(*args), _gla_fwd_bwd("pallas")(*args)
    worst = max(_rms_ratio(r, g) for r, g in zip(want, got))
    if not worst <= GLA_CHECK_RATIO:
        raise SystemExit(f"GLA kernel differs from the XLA form: RMS ratio {worst:.3g}")
    return worst


def _softmax_inputs(B, T, H, K, dtype, seed=0):
    """q [B, T, H, K], k, v [B, T, H/4, K] and segment ids of 4 equal documents per row."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    G = max(1, H // 4)
    q = jax.random.normal(keys[0], (B, T, H, K), dtype)
    k, v = (jax.random.normal(keys[i], (B, T, G, K), dtype) for i in (1, 2))
    seg = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32) * 4 // T, (B, T))
    return q, k, v, seg


def _softmax_fwd_bwd(name, platform_=""):
    def attend(q, k, v, seg):
        if name == "pallas":
            return flash_kernel(q, k, v, segment_ids=seg)
        if name == "pallas_plain":
            return flash_kernel(q, k, v)
        if name == "blocked":
            block = query_block(q.shape[1], k.shape[1]) or q.shape[1]
            return attention_blocked(q, k, v, block=block, causal=True, scale=None,
                                     segment_ids_BT=seg)  # fmt: skip
        impl = "cudnn" if platform_ == "gpu" else None
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)

    def loss(q, k, v, seg):
        return attend(q, k, v, seg).astype(jnp.float32).sum()

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def check_flash():
    """Flash kernel vs attention_reference, gradients of q, k, v, packed, B1 T300 H4 K64 fp32."""
    q, k, v, seg = _softmax_inputs(1, 300, 4, 64, jnp.float32, seed=1)

    def grads(fn):
        loss = lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    want = grads(lambda q, k, v: attention_reference(q, k, v, segment_ids_BT=seg))
    got = grads(lambda q, k, v: flash_kernel(q, k, v, segment_ids=seg))
    worst = max(_rms_ratio(r, g) for r, g in zip(want, got))
    if not worst <= CHECK_RATIO:
        raise SystemExit(f"flash kernel differs from the reference: RMS ratio {worst:.3g}")
    return worst


def measure_attention(lengths, B, H, K, dtype, rounds, max_temp, platform_, ops=ATTENTION_OPS,
                      fwd_bwd=_fwd_bwd, inputs=_attention_inputs):  # fmt: skip
    rows = []
    for T in lengths:
        args = inputs(B, T, H, K, dtype)
        row, fns = {"T": T}, {}
        for op in ops:
            try:
                exe = fwd_bwd(op, platform_).lower(*args).compile()
            except Exception as e:  # e.g. out of memory, or no cuDNN kernel for the shape
                row[op] = {"ran": False, "error": f"{type(e).__name__}: {str(e)[:200]}"}
                continue
            temp = int(exe.memory_analysis().temp_size_in_bytes)
            row[op] = {"temp_bytes": temp, "ran": temp <= max_temp}
            if row[op]["ran"]:
                fns[op] = exe
        for op, wall in _time(fns, args, rounds).items():
            row[op]["ms"] = wall * 1e3
            row[op]["ns_per_token"] = wall * 1e9 / (B * T)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def print_attention(rows, interpreted, title="lightning attention", ops=ATTENTION_OPS,
                    versus="softmax"):  # fmt: skip
    note = "  (pallas INTERPRETED on the CPU: not a kernel timing)" if interpreted else ""
    print(f"\n{title} forward+backward, median ms (ns/token){note}")
    print("T".rjust(7) + "".join(f"{op:>22}" for op in ops) + f"{versus + '/pallas':>16}")
    for row in rows:
        line = str(row["T"]).rjust(7)
        for op in ops:
            r = row[op]
            cell = "-" if "ms" not in r else f"{r['ms']:.2f} ({r['ns_per_token']:.1f})"
            line += cell.rjust(22)
        ms_vs, ms_pl = row[versus].get("ms"), row["pallas"].get("ms")
        line += ("-" if ms_vs is None or ms_pl is None else f"{ms_vs / ms_pl:.2f}").rjust(16)
        print(line)


def _fp8_ops():
    """name → fn(a_bf16, b_bf16, a8, b8, sa, sb); None when the fp8 kernel does not import."""
    ops = {
        "bf16": lambda a, b, a8, b8, sa, sb: jnp.dot(
            a, b, preferred_element_type=jnp.float32
        ).astype(jnp.bfloat16),
        "xla_fp8": lambda a, b, a8, b8, sa, sb: (
            jax.lax.dot_general(
                a8, b8, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
            )
            * (sa * sb)
        ).astype(jnp.bfloat16),
    }
    try:
        from kernels_pallas.fp8_matmul import fp8_matmul
    except Exception as e:  # the package is optional here
        print(f"FP8 kernel section skipped: {type(e).__name__}: {e}")
        return ops, False
    ops["pallas_fp8"] = lambda a, b, a8, b8, sa, sb: fp8_matmul(
        a8, b8, sa, sb, out_dtype=jnp.bfloat16
    )
    return ops, True


def measure_gemm(sizes, rounds):
    ops, have_kernel = _fp8_ops()
    rows = []
    for n in sizes:
        keys = jax.random.split(jax.random.PRNGKey(0), 2)
        a = jax.random.normal(keys[0], (n, n), jnp.bfloat16)
        b = jax.random.normal(keys[1], (n, n), jnp.bfloat16)
        # per-tensor quantization: x ≈ x8 · s with s = amax / 448 (e4m3's largest normal)
        sa, sb = jnp.max(jnp.abs(a)).astype(jnp.float32) / 448, jnp.max(jnp.abs(b)) / 448
        a8 = (a / sa).astype(jnp.float8_e4m3fn)
        b8 = (b / sb.astype(jnp.float32)).astype(jnp.float8_e4m3fn)
        args = (a, b, a8, b8, sa, sb.astype(jnp.float32))
        fns = {name: jax.jit(fn) for name, fn in ops.items()}
        ref = np.asarray(fns["bf16"](*args), np.float32)
        row = {"n": n}
        for name, wall in _time(fns, args, rounds).items():
            err = _rms_ratio(ref, np.asarray(fns[name](*args), np.float32))
            row[name] = {"ms": wall * 1e3, "tflops": 2 * n**3 / wall / 1e12, "rms_vs_bf16": err}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows, list(ops), have_kernel


def print_gemm(rows, names, interpreted):
    note = "  (pallas_fp8 INTERPRETED on the CPU)" if interpreted else ""
    print(f"\nGEMM n×n×n, TFLOP/s (RMS error vs bf16){note}")
    print("n".rjust(7) + "".join(f"{name:>22}" for name in names) + f"{'fp8/bf16':>10}")
    for row in rows:
        line = str(row["n"]).rjust(7)
        for name in names:
            r = row[name]
            line += f"{r['tflops']:.3g} ({r['rms_vs_bf16']:.1e})".rjust(22)
        best = max(row[x]["tflops"] for x in names if x != "bf16")
        line += f"{best / row['bf16']['tflops']:.2f}".rjust(10)
        print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+",
                    default=[1024, 2048, 4096, 8192, 16384, 32768, 65536])  # fmt: skip
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--gla-lengths", type=int, nargs="*", default=[2048, 8192, 32768],
                    help="T for the GLA kernel vs its XLA form; none: skip")  # fmt: skip
    ap.add_argument("--softmax-lengths", type=int, nargs="*", default=[2048, 8192, 32768],
                    help="T for softmax attention (flash, cuDNN, blocked); none: skip")  # fmt: skip
    ap.add_argument("--gemm", type=int, nargs="*", default=[4096, 8192])
    ap.add_argument("--max-temp-gib", type=float, default=60.0)
    ap.add_argument("--out", default="benchmarks/results/kernels.json")
    a = ap.parse_args()

    device = jax.devices()[0]
    interpreted = device.platform not in ("tpu", "gpu")
    with jax.default_matmul_precision("highest"):
        worst = check_kernel()
        gla_worst = check_gla() if a.gla_lengths else None
        flash_worst = check_flash() if a.softmax_lengths else None
    print(f"correctness (kernel vs XLA form, worst RMS ratio): {worst:.3g}", flush=True)
    if a.gla_lengths:
        print(f"correctness (GLA kernel vs XLA form, worst RMS ratio): {gla_worst:.3g}")
    if a.softmax_lengths:
        print(f"correctness (flash kernel vs reference, worst RMS ratio): {flash_worst:.3g}")
    shape = (a.batch, a.heads, a.head_dim, jnp.dtype(a.dtype), a.rounds, a.max_temp_gib * 2**30,
             device.platform)  # fmt: skip
    rows = measure_attention(a.lengths, *shape)
    gla = measure_attention(a.gla_lengths, *shape, ops=GLA_OPS, fwd_bwd=_gla_fwd_bwd,
                            inputs=_gla_inputs)  # fmt: skip
    softmax = measure_attention(a.softmax_lengths, *shape, ops=SOFTMAX_OPS,
                                fwd_bwd=_softmax_fwd_bwd, inputs=_softmax_inputs)  # fmt: skip
    gemm, names, have_kernel = measure_gemm(a.gemm, a.rounds) if a.gemm else ([], [], False)
    meta = {
        "device": device.device_kind,
        "platform": device.platform,
        "pallas_interpreted": interpreted,
        "jax": jax.__version__,
        "host": platform.node(),
        "shape": {"B": a.batch, "H": a.heads, "K": a.head_dim, "V": a.head_dim},
        "dtype": a.dtype,
        "rounds": a.rounds,
        "check_rms_ratio": worst,
        "gla_check_rms_ratio": gla_worst,
        "flash_check_rms_ratio": flash_worst,
        "fp8_kernel": have_kernel,
    }
    print(
        f"\n{meta['device']} ({meta['platform']}), B{a.batch} H{a.heads} K=V={a.head_dim}, "
        f"{a.dtype}; '-': not run (temp > --max-temp-gib, or an 'error' in the JSON)"
    )
    print_attention(rows, interpreted)
    if gla:
        print_attention(gla, interpreted, "gated linear attention (HGRN2's core)", GLA_OPS, "xla")
    if softmax:
        print_attention(softmax, interpreted, "softmax attention, GQA H/4, 4 documents per row "
                        "(pallas: the flash kernel, packed)", SOFTMAX_OPS, "blocked")  # fmt: skip
    if gemm:
        print_gemm(gemm, names, interpreted)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"meta": meta, "attention": rows, "gla": gla, "softmax": softmax, "gemm": gemm},
            indent=1,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
