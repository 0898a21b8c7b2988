"""jaxllm's linear-attention kernels beside their JAX peers on one GPU: how fast, how accurate?

    python benchmarks/peers.py [--lengths 2048 8192 32768] [--batch 4] [--heads 32]
        [--head-dim 128] [--rounds 5] [--dump benchmarks/results/peers_ref.npz]

Forward + backward (the gradients of q, k, v, and of the gates for GLA) of
- simple GLA (one log decay per head): jaxllm's lightning kernel and jax-linear-attention's
  (jla, Mosaic GPU kernels for Hopper; Python ≥ 3.12, jax 0.11.2) `simple_gla`;
- GLA (a log gate per key channel, HGRN2's core): jaxllm's GLA kernel and jla's `gla`;
timed as benchmarks/kernels.py (median of --rounds synchronised calls after a warm-up call),
B4 H32 K=V=128 bf16 by default (the official lightning benchmark's shapes). Accuracy: each op
at B1 T1000 H4 K=V=128 bf16 against jaxllm's float32 references (the worst RMS ratio over the
output and the gradients). The inputs and references of that shape go to --dump, where
peers_torch.py reads them to put fla's `chunk_simple_gla` and `chunk_gla` in the same table.
A peer that does not import or run is reported with its error (jla needs a GPU and jax 0.11.2).

Prints a table and writes benchmarks/results/peers.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.ops.gated_linear_attention import gated_linear_attention_reference
from jaxllm.ops.lightning_attention import lightning_attention_reference
from kernels_pallas.gated_linear_attention import gated_linear_attention
from kernels_pallas.lightning_attention import lightning_attention

try:  # optional: jla is on the GPU image's Python 3.12 with jax 0.11.2 (carried wheel)
    from jla.ops import linear_attention as jla_linear_attention
except ImportError as e:
    jla_linear_attention, JLA_MISSING = None, f"{type(e).__name__}: {e}"

ACCURACY_SHAPE = (1, 1000, 4, 128)


def _jla(kind):
    """jla's Mosaic GPU kernel of `kind` as fn(q, k, v, g) with g [H] ("simple_gla", broadcast
    to jla's [B, T, H]) or [B, T, H, K] ("gla")."""

    def fn(q, k, v, g):
        if kind == "simple_gla":
            g = jnp.broadcast_to(g, q.shape[:3])
        return jla_linear_attention(kind, q, k, v, g=g, impl="mosaic_gpu", scale=1.0)[0]

    return fn


# name → (family, fn)
OPS = {
    "jaxllm_lightning": ("simple_gla", lightning_attention),
    "jla_simple_gla": ("simple_gla", _jla("simple_gla")),
    "jaxllm_gla": ("gla", gated_linear_attention),
    "jla_gla": ("gla", _jla("gla")),
}
REFERENCES = {
    "simple_gla": lightning_attention_reference,
    "gla": lambda q, k, v, g: gated_linear_attention_reference(q, k, v, g),
}


def inputs(B, T, H, K, dtype, seed=0):
    """q, k (randn/√K), v (randn), per-head log decays (TNL's slopes) and per-channel log gates
    logsigmoid(randn + 4) (HGRN2-like forget gates, f ≈ 0.98)."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q, k = (jax.random.normal(keys[i], (B, T, H, K)) / np.sqrt(K) for i in range(2))
    v = jax.random.normal(keys[2], (B, T, H, K))
    g_H = -(2.0 ** (-8.0 * (jnp.arange(H) + 1) / H))
    g_BTHK = jax.nn.log_sigmoid(jax.random.normal(keys[3], (B, T, H, K)) + 4.0)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), g_H, g_BTHK


def fwd_bwd(fn, family):
    """jit(grad of sum(o)) with respect to q, k, v, and the gates for GLA."""
    argnums = (0, 1, 2, 3) if family == "gla" else (0, 1, 2)
    return jax.jit(jax.grad(lambda *a: fn(*a).astype(jnp.float32).sum(), argnums=argnums))


def _args(x, family):
    q, k, v, g_H, g_BTHK = x
    return (q, k, v, g_BTHK if family == "gla" else g_H)


def _rms_ratio(ref, got):
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    return float(np.sqrt(np.mean((ref - got) ** 2)) / np.sqrt(np.mean(ref**2)))


def accuracy(fns, dump):
    """(worst RMS ratio of each op's output and gradients against the float32 reference,
    the ops that failed with their errors)."""
    x = inputs(*ACCURACY_SHAPE, jnp.bfloat16, seed=1)
    saved = {name: np.asarray(a, np.float32) for name, a in zip(("q", "k", "v", "g_H", "g"), x)}
    want = {}
    for family, ref in REFERENCES.items():
        args = [a.astype(jnp.float32) for a in _args(x, family)]
        o = ref(*args)
        grads = fwd_bwd(ref, family)(*args)
        want[family] = (o, *grads)
        saved |= {f"{family}_{n}": np.asarray(a) for n, a in zip(("o", "dq", "dk", "dv", "dg"),
                                                                  want[family])}  # fmt: skip
    if dump:
        Path(dump).parent.mkdir(parents=True, exist_ok=True)
        np.savez(dump, **saved)
    out, failed = {}, {}
    for name, (family, fn) in fns.items():
        args = _args(x, family)
        try:
            got = (jax.jit(fn)(*args), *fwd_bwd(fn, family)(*args))
        except Exception as e:  # e.g. jla's Mosaic GPU kernels where there is no GPU
            failed[name] = f"{type(e).__name__}: {str(e)[:200]}"
            continue
        out[name] = max(_rms_ratio(w, g) for w, g in zip(want[family], got))
    return out, failed


def measure(fns, lengths, B, H, K, rounds):
    rows = []
    for T in lengths:
        x = inputs(B, T, H, K, jnp.bfloat16)
        row = {"T": T}
        for name, (family, fn) in fns.items():
            args = _args(x, family)
            try:
                step = fwd_bwd(fn, family).lower(*args).compile()
                jax.block_until_ready(step(*args))
                walls = []
                for _ in range(rounds):
                    t = time.perf_counter()
                    jax.block_until_ready(step(*args))
                    walls.append(time.perf_counter() - t)
            except Exception as e:  # out of memory, or a shape the peer does not take
                row[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                continue
            wall = statistics.median(walls)
            row[name] = {"ms": wall * 1e3, "ns_per_token": wall * 1e9 / (B * T)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dump", default="benchmarks/results/peers_ref.npz")
    ap.add_argument("--out", default="benchmarks/results/peers.json")
    a = ap.parse_args()

    fns = {n: op for n, op in OPS.items() if jla_linear_attention or not n.startswith("jla")}
    missing = {n: JLA_MISSING for n in OPS if n not in fns}
    acc, failed = accuracy(fns, a.dump)
    missing |= failed
    for name, why in missing.items():
        print(f"{name}: not run ({why})")
        fns.pop(name, None)
    rows = measure(fns, a.lengths, a.batch, a.heads, a.head_dim, a.rounds)
    device = jax.devices()[0]
    print(f"\n{device.device_kind}, B{a.batch} H{a.heads} K=V={a.head_dim} bf16, forward + "
          f"backward, median ms (ns/token); accuracy: worst RMS ratio vs float32 reference "
          f"at B{ACCURACY_SHAPE[0]} T{ACCURACY_SHAPE[1]} H{ACCURACY_SHAPE[2]}")  # fmt: skip
    print("T".rjust(7) + "".join(f"{n:>22}" for n in fns))
    for row in rows:
        cells = [row[n] for n in fns]
        print(str(row["T"]).rjust(7) + "".join(
            (f"{c['ms']:.2f} ({c['ns_per_token']:.1f})" if "ms" in c else "error").rjust(22)
            for c in cells))  # fmt: skip
    print("acc".rjust(7) + "".join(f"{acc[n]:.2e}".rjust(22) for n in fns))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": device.device_kind, "jax": jax.__version__, "batch": a.batch,
            "heads": a.heads, "head_dim": a.head_dim, "rounds": a.rounds}  # fmt: skip
    out.write_text(json.dumps({"meta": meta, "rows": rows, "accuracy": acc,
                               "unavailable": missing}, indent=1))  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
