"""fla's kernels in the table of benchmarks/peers.py: the same shapes, timing and accuracy check.

    python benchmarks/peers_torch.py [--dump benchmarks/results/peers_ref.npz]
        [--lengths 2048 8192 32768] [--batch 4] [--heads 32] [--head-dim 128] [--rounds 5]

Forward + backward of flash-linear-attention's `chunk_simple_gla` (g_gamma: one log decay per
head, scale 1) and `chunk_gla` (a log gate per key channel, scale 1), bf16, as peers.py times
jaxllm's kernels: the gradients of sum(o) with respect to q, k, v (and g for GLA), the median
of --rounds synchronised calls after warm-up. fla's Triton autotuning takes minutes on its
first calls (`/work/shared/GPU.md`): the warm-up calls are outside the timed part and their
time is reported. Accuracy: the inputs and float32 references peers.py dumped (--dump), the
worst RMS ratio over the output and the gradients. Needs torch, triton and the
`flash-linear-attention` / `fla-core` wheels (run on the GPU image, e.g. by benchmarks/gpu.sh).

Prints a table and writes benchmarks/results/peers_torch.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from fla.ops.gla import chunk_gla
from fla.ops.simple_gla import chunk_simple_gla


def simple_gla(q, k, v, g_H):
    return chunk_simple_gla(q, k, v, g_gamma=g_H, scale=1.0)[0]


def gla(q, k, v, g):
    return chunk_gla(q, k, v, g, scale=1.0)[0]


# name → (family, fn(q, k, v, gates)); the families' gates as peers.py's.
PEERS = {"fla_chunk_simple_gla": ("simple_gla", simple_gla), "fla_chunk_gla": ("gla", gla)}


def inputs(B, T, H, K, seed=0):
    """bf16 q, k (randn/√K), v (randn) [B, T, H, K]; float32 log decays [H] and log gates
    logsigmoid(randn + 4) [B, T, H, K], as peers.py's."""
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=gen)

    q, k, v = randn(B, T, H, K) / K**0.5, randn(B, T, H, K) / K**0.5, randn(B, T, H, K)
    g_H = -(2.0 ** (-8.0 * (torch.arange(H, device="cuda") + 1) / H))
    g = torch.nn.functional.logsigmoid(randn(B, T, H, K) + 4.0)
    return [x.bfloat16() for x in (q, k, v)], g_H.float(), g


def _leaves(q, k, v, gates, family):
    """Fresh leaves for one call: q, k, v, and the gates when they get a gradient (GLA)."""
    args = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    gate = gates.detach().clone().requires_grad_(family == "gla")
    return [*args, gate]


def fwd_bwd(fn, args):
    for a in args:
        a.grad = None
    o = fn(*args)
    o.float().sum().backward()
    return o


def time_fwd_bwd(fn, args, rounds):
    """(median seconds of a synchronised forward + backward, seconds of the two warm-up calls)."""
    t0 = time.perf_counter()
    for _ in range(2):
        fwd_bwd(fn, args)
    torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    walls = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fwd_bwd(fn, args)
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - t)
    return statistics.median(walls), warm


def _rms_ratio(ref, got):
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    return float(np.sqrt(np.mean((ref - got) ** 2)) / np.sqrt(np.mean(ref**2)))


def accuracy(dump):
    """Worst RMS ratio of each peer's output and gradients against peers.py's references."""
    d = np.load(dump)

    def cuda(name, dtype):
        return torch.tensor(d[name], device="cuda").to(dtype)

    q, k, v = (cuda(n, torch.bfloat16) for n in ("q", "k", "v"))
    gates = {"simple_gla": cuda("g_H", torch.float32), "gla": cuda("g", torch.float32)}
    out = {}
    for name, (family, fn) in PEERS.items():
        args = _leaves(q, k, v, gates[family], family)
        o = fwd_bwd(fn, args)
        got = [o, *(a.grad for a in args[: 4 if family == "gla" else 3])]
        names = ("o", "dq", "dk", "dv", "dg")
        out[name] = max(
            _rms_ratio(d[f"{family}_{n}"], x.float().cpu().numpy()) for n, x in zip(names, got)
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dump", default="benchmarks/results/peers_ref.npz")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/peers_torch.json")
    a = ap.parse_args()
    print("torch", torch.__version__, torch.cuda.get_device_name(), flush=True)
    rows = []
    for T in a.lengths:
        (q, k, v), g_H, g = inputs(a.batch, T, a.heads, a.head_dim)
        gates = {"simple_gla": g_H, "gla": g}
        row = {"T": T}
        for name, (family, fn) in PEERS.items():
            try:
                args = _leaves(q, k, v, gates[family], family)
                wall, warm = time_fwd_bwd(fn, args, a.rounds)
            except Exception as e:  # e.g. out of memory
                row[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                continue
            row[name] = {"ms": wall * 1e3, "ns_per_token": wall * 1e9 / (a.batch * T),
                         "warmup_s": warm}  # fmt: skip
            torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
    acc = accuracy(a.dump) if Path(a.dump).exists() else {}
    print(f"\nB{a.batch} H{a.heads} K=V={a.head_dim} bf16, forward + backward, median ms "
          "(ns/token); accuracy: worst RMS ratio vs float32 references (peers.py's)")  # fmt: skip
    print("T".rjust(7) + "".join(f"{n:>24}" for n in PEERS))
    for row in rows:
        print(str(row["T"]).rjust(7) + "".join(
            (f"{row[n]['ms']:.2f} ({row[n]['ns_per_token']:.1f})" if "ms" in row[n]
             else "error").rjust(24) for n in PEERS))  # fmt: skip
    if acc:
        print("acc".rjust(7) + "".join(f"{acc[n]:.2e}".rjust(24) for n in PEERS))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "accuracy": acc}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
