"""How fast is the MoE layer, and what does expert parallelism send?

    python benchmarks/moe.py [--tokens 4096] [--d-model 256] [--experts 8] [--top-k 2]
                             [--expert-d-ff 512] [--dtype float32] [--iters 5] [--ep 4]

Times forward+backward of one `moe` layer — dropless (sort + ragged_dot + unsort; and the
`blocked` form: rows padded to whole blocks, batched matmul with gathered weights), capacity
(factor 1.25, [E, C, D] buffers) — against a dense SwiGLU of the same *active* width
(top_k · expert_d_ff), and reports tokens/s and the FLOP rate of the active parameters
(6 · tokens · 3·D·F_active, router included). Before timing it checks that dropless equals the
reference path. Then it compiles the expert-parallel layer on `--ep` devices (CPU devices when
no accelerators are there) and sums the bytes of the all-to-all / ragged-all-to-all ops in the
optimized HLO, per device and step. Prints a table, writes benchmarks/results/moe.json.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import jax

# 8 CPU devices for the expert-parallel compile when there is no accelerator (GPU/TPU runs use
# their own devices; the CPU count does not touch them).
jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jaxllm.layers.mlp import SwiGLU, SwiGLUConfig  # noqa: E402
from jaxllm.layers.moe import MoE, MoEConfig  # noqa: E402
from jaxllm.parallel.mesh import make_mesh  # noqa: E402
from jaxllm.parallel.rules import use_rules  # noqa: E402

_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1}


def fwd_bwd(layer):
    nnx.pop(layer, nnx.Intermediate)  # left over from an eager or nnx.jit call
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def step(params, x):
        def loss(params):
            m = nnx.merge(graphdef, params, rest)
            y = m(x)
            nnx.pop(m, nnx.Intermediate)
            return jnp.sum(y.astype(jnp.float32) ** 2)

        return jax.value_and_grad(loss)(params)

    return jax.jit(step), params


def time_it(fn, params, x, iters: int) -> float:
    jax.block_until_ready(fn(params, x))
    t0 = time.perf_counter()
    for _ in range(iters):
        out = fn(params, x)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / iters


def comm_bytes(hlo: str) -> dict[str, int]:
    """Bytes produced by each collective kind in optimized HLO text (result shapes)."""
    out: dict[str, int] = {}
    pattern = re.compile(r"=\s*(\(?[^=]*?\)?)\s+(all-to-all|ragged-all-to-all|all-gather|"
                         r"reduce-scatter|all-reduce|collective-permute)\(")  # fmt: skip
    for line in hlo.splitlines():
        m = pattern.search(line)
        if not m:
            continue
        total = 0
        for dt, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)):
            n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
            total += n * _DTYPE_BYTES.get(dt, 4)
        out[m.group(2)] = out.get(m.group(2), 0) + total
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--expert-d-ff", type=int, default=512)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--ep", type=int, default=4)
    ap.add_argument("--out", default="benchmarks/results/moe.json")
    args = ap.parse_args()
    d, e, k, f = args.d_model, args.experts, args.top_k, args.expert_d_ff
    dims = dict(d_model=d, d_ff=f, dtype=args.dtype)
    x = jax.random.normal(jax.random.key(0), (args.tokens // 256, 256, d), args.dtype)
    active = 3 * d * f * k + d * e  # routed experts a token uses + the router
    flops = 6.0 * args.tokens * active

    layers = {
        "moe dropless": MoE(
            MoEConfig(n_experts=e, top_k=k, impl="dropless", **dims), rngs=nnx.Rngs(0)
        ),
        "moe dropless blocked": MoE(
            MoEConfig(n_experts=e, top_k=k, impl="blocked", **dims), rngs=nnx.Rngs(0)
        ),
        "moe capacity 1.25": MoE(
            MoEConfig(n_experts=e, top_k=k, capacity_factor=1.25, **dims), rngs=nnx.Rngs(0)
        ),
        f"dense swiglu d_ff={k * f}": SwiGLU(
            SwiGLUConfig(**{**dims, "d_ff": k * f}), rngs=nnx.Rngs(0)
        ),
    }
    # check before timing: dropless = the every-expert reference
    ref = MoE(MoEConfig(n_experts=e, top_k=k, impl="reference", **dims), rngs=nnx.Rngs(0))
    xs = x[:2]
    y_ref = nnx.jit(lambda m, x: m(x))(ref, xs).astype(jnp.float32)
    scale = float(jnp.max(jnp.abs(y_ref)))
    tol = 2e-5 if args.dtype == "float32" else 2e-2
    err = 0.0
    for name in ("moe dropless", "moe dropless blocked"):
        y_fast = nnx.jit(lambda m, x: m(x))(layers[name], xs).astype(jnp.float32)
        err = max(err, float(jnp.max(jnp.abs(y_fast - y_ref))))
        assert err <= tol * scale, f"{name} differs from the reference: {err} vs {scale}"

    rows = []
    for name, layer in layers.items():
        fn, params = fwd_bwd(layer)
        sec = time_it(fn, params, x, args.iters)
        rows.append({"layer": name, "ms": 1e3 * sec, "tokens_per_s": args.tokens / sec,
                     "active_tflops": flops / sec / 1e12})  # fmt: skip

    n_ep = min(args.ep, jax.device_count())
    ep = {}
    if n_ep > 1 and e % n_ep == 0:
        mesh = make_mesh({"expert": n_ep}, devices=jax.devices()[:n_ep])
        for name in ("moe dropless", "moe capacity 1.25"):
            fn, params = fwd_bwd(layers[name])
            with use_rules(mesh):
                hlo = fn.lower(params, x).compile().as_text()
            ep[name] = comm_bytes(hlo)

    print(f"\nbackend {jax.default_backend()}, {args.tokens} tokens, D={d}, E={e}, top-{k}, "
          f"F={f}, {args.dtype}; active params/token {active:,}")  # fmt: skip
    print(f"{'layer':<28}{'ms':>10}{'tokens/s':>14}{'active TFLOP/s':>16}")
    for r in rows:
        print(f"{r['layer']:<28}{r['ms']:>10.2f}{r['tokens_per_s']:>14,.0f}"
              f"{r['active_tflops']:>16.4f}")  # fmt: skip
    dense = rows[-1]["active_tflops"]
    for r in rows[:-1]:
        print(f"  {r['layer']}: {100 * r['active_tflops'] / dense:.0f}% of the dense FLOP rate")
    for name, by_kind in ep.items():
        per = ", ".join(f"{kind} {b / 2**20:.2f} MiB" for kind, b in sorted(by_kind.items()))
        print(f"EP={n_ep} {name}: per device and step (fwd+bwd): {per}")
    out = {
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "args": vars(args),
        "active_params_per_token": active,
        "check": {"max_abs_err": err, "scale": scale},
        "rows": rows,
        "ep_devices": n_ep,
        "ep_comm_bytes": ep,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
