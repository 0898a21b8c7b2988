"""How fast is the MoE layer, and what does expert parallelism send?

    python benchmarks/moe.py [--tokens 4096] [--d-model 256] [--experts 8] [--top-k 2]
                             [--expert-d-ff 512] [--dtype float32] [--iters 5] [--ep 4]

Times forward+backward of one `moe` layer — dropless (sort + ragged_dot + unsort; and the
`blocked` form: rows padded to whole blocks, batched matmul with gathered weights), capacity
(factor 1.25, [E, C, D] buffers) — against a dense SwiGLU of the same *active* width
(top_k · expert_d_ff), and reports tokens/s and the FLOP rate of the active parameters
(6 · tokens · 3·D·F_active, router included). Before timing it checks that dropless equals the
reference path.

Then it says where the time goes: for dropless, blocked and capacity, each stage — (1) routing
(router matmul, top-k, renormalisation: `MoE.route`), (2) dispatch (sort / permutation / gather
of the token copies into expert order, `dispatch_dropless` / `dispatch_blocked`; for capacity
`apply_capacity`'s slot assignment and the scatter into the [E·C, D] buffer,
`dispatch_capacity`), (3) the expert GEMMs (`grouped_swiglu` / `blocked_swiglu` /
`capacity_swiglu`: the three SwiGLU projections), (4) combine (un-permute / gather back and the
weighted sum over the K copies, `combine_*`) — is jitted on its own and timed forward+backward
(its forward and the VJP of a fixed random cotangent) on the layer's own intermediate values:
one jitted forward of the layer records what each of these library functions returned (through
`jax.debug.callback`), every stage's forward is checked against those values, then timed. The
table gives each stage's time and share of their sum, and the sum next to the whole layer's
forward+backward with x's gradient too (the stages differentiate all their inputs; the first
table's layer rows, kept comparable with earlier runs, take the parameters' gradients only). The
difference is what fusion across stages saves or costs (the layer's balancing losses are
sown, then dropped, so they are not in its time).

Then the expert GEMM alone (`grouped_matmul`, forward + dX + dW, M = tokens · top_k rows in
E balanced groups, K = D, N = F): XLA's ragged_dot, on a Hopper GPU jax's Mosaic GPU kernels
(`impl="mosaic_gpu"`, checked against ragged_dot first), and one dense [M, K] @ [K, N] product
as the ceiling: ms and TFLOP/s of the grouped work — the measurement `grouped_matmul(auto)`
waits for before it picks a GPU kernel.

Then it compiles the expert-parallel layer on `--ep` devices (CPU devices when no accelerators
are there) and sums the bytes of the all-to-all / ragged-all-to-all ops in the
optimized HLO, per device and step. Prints a table, writes benchmarks/results/moe.json.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
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
from jaxllm.ops import moe as M  # noqa: E402
from jaxllm.ops import moe_routing as R  # noqa: E402
from jaxllm.parallel.core.mesh import make_mesh  # noqa: E402
from jaxllm.parallel.core.rules import use_rules  # noqa: E402
from jaxllm.precision.grouped_matmul import grouped_matmul, mosaic_gpu_unsupported  # noqa: E402

_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1}


def fwd_bwd(layer, wrt_x: bool = False):
    """jit of (params, x) → (loss, grads): the parameters' gradients, and x's with `wrt_x` (as
    every layer but the first of a model needs)."""
    nnx.pop(layer, nnx.Intermediate)  # left over from an eager or nnx.jit call
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def step(params, x):
        def loss(params, x):
            m = nnx.merge(graphdef, params, rest)
            y = m(x)
            nnx.pop(m, nnx.Intermediate)
            return jnp.sum(y.astype(jnp.float32) ** 2)

        return jax.value_and_grad(loss, argnums=(0, 1) if wrt_x else 0)(params, x)

    return jax.jit(step), params


def time_it(fn, params, x, iters: int) -> float:
    jax.block_until_ready(fn(params, x))
    t0 = time.perf_counter()
    for _ in range(iters):
        out = fn(params, x)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / iters


STAGES = ("routing", "dispatch", "expert GEMMs", "combine")
STAGE_KEYS = dict(zip(STAGES, ("routing", "dispatch", "gemms", "combine"), strict=True))  # JSON
# The library functions whose results the layer's forward records for the stage checks.
_RECORDED = ((R, "route"), (R, "apply_capacity"), *((M, n) for n in (
    "dispatch_dropless", "grouped_swiglu", "combine_dropless", "dispatch_blocked",
    "blocked_swiglu", "combine_blocked", "dispatch_capacity", "capacity_swiglu",
    "combine_capacity")))  # fmt: skip


@contextlib.contextmanager
def recording(log: dict):
    """While active, each function of `_RECORDED` sends its result to `log[name]` from inside
    jit (as host arrays); the functions are restored on exit."""
    saved = [(mod, name, getattr(mod, name)) for mod, name in _RECORDED]

    def put(name, out):
        log[name] = jax.tree.map(np.asarray, out)

    def wrap(name, fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            jax.debug.callback(functools.partial(put, name), out)
            return out

        return wrapped

    for mod, name, fn in saved:
        setattr(mod, name, wrap(name, fn))
    try:
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


def layer_intermediates(layer: MoE, x) -> dict:
    """What the library's MoE functions returned in one jitted forward of `layer` on `x`."""
    log: dict = {}
    with recording(log):
        jax.block_until_ready(nnx.jit(lambda m, x: m(x))(layer, x))
        jax.effects_barrier()
    nnx.pop(layer, nnx.Intermediate)
    return jax.tree.map(jnp.asarray, log)


def vjp_stage(f):
    """jit of (diff, nondiff, ct) → (out, aux, grads of diff): `f(diff, nondiff)` returns
    (out, aux); forward and the VJP of cotangent `ct` of `out`, as a train step runs them."""

    def step(diff, nondiff, ct):
        out, pull, aux = jax.vjp(lambda d: f(d, nondiff), diff, has_aux=True)
        return out, aux, pull(ct)

    return jax.jit(step)


def layer_stages(layer: MoE, x, impl: str) -> list[tuple[str, object, tuple, object]]:
    """[(stage, step, (diff, nondiff, ct), expected forward output)] for `impl` ("dropless",
    "blocked", "capacity"), the inputs taken from the layer's own forward on `x`."""
    c = layer.cfg
    dt, e = c.compute_dtype, c.n_experts
    x_TD = x.reshape(-1, x.shape[-1]).astype(dt)  # as the layer flattens it
    groups = [g.weights() for g in layer.groups]
    rec = layer_intermediates(layer, x)
    routing, scores_TE = rec["route"]
    graphdef, router_p, rest = nnx.split(layer, nnx.PathContains("w_router"), ...)

    def routing_f(d, nd):
        r, s, _ = nnx.merge(graphdef, d[1], rest).route(d[0], None)
        return r.weights_TK, (r.experts_TK, r.valid_TK, s)

    stages = [("routing", routing_f, (x_TD, router_p), None, routing.weights_TK)]
    if impl == "dropless":
        xs_ND, order, counts_E = rec["dispatch_dropless"]
        stages += [
            ("dispatch", lambda d, r: M.dispatch_dropless(d, r, e, dt)[0], x_TD, routing, xs_ND),
            ("expert GEMMs", lambda d, n: M.grouped_swiglu(d[0], n, d[1], dt), (xs_ND, groups),
             counts_E, rec["grouped_swiglu"]),
            ("combine", lambda d, o: M.combine_dropless(d[0], o, d[1]),
             (rec["grouped_swiglu"], routing.weights_TK), order, rec["combine_dropless"]),
        ]  # fmt: skip
    elif impl == "blocked":
        xbs, plans = rec["dispatch_blocked"]
        stages += [
            ("dispatch", lambda d, n: M.dispatch_blocked(d, n[0], n[1], dtype=dt)[0], x_TD,
             (routing, groups), xbs),
            ("expert GEMMs", lambda d, p: M.blocked_swiglu(d[0], p, d[1], dt), (xbs, groups),
             plans, rec["blocked_swiglu"]),
            ("combine", lambda d, p: M.combine_blocked(d[0], p, d[1]),
             (rec["blocked_swiglu"], routing.weights_TK), plans, rec["combine_blocked"]),
        ]  # fmt: skip
    else:
        cap = R.capacity_for(x_TD.shape[0], c.top_k, e, c.capacity_factor)
        kept, slot_TK, _ = rec["apply_capacity"]

        def dispatch_f(d, nd):
            r = R.Routing(nd[0].experts_TK, d[1], nd[0].valid_TK)
            key = layer._recycle_key(r, c.layer_index)
            r, slot, _ = R.apply_capacity(r, nd[1] * c.scale, n_experts=e, capacity=cap,
                                          policy=c.drop_policy, key=key)  # fmt: skip
            return M.dispatch_capacity(d[0], slot, e, cap, dt), r.weights_TK

        stages += [
            ("dispatch", dispatch_f, (x_TD, routing.weights_TK), (routing, scores_TE),
             (rec["dispatch_capacity"], kept.weights_TK)),
            ("expert GEMMs", lambda d, _: M.capacity_swiglu(d[0], d[1], cap, dt),
             (rec["dispatch_capacity"], groups), (), rec["capacity_swiglu"]),
            ("combine", lambda d, s: M.combine_capacity(d[0], s, d[1]),
             (rec["capacity_swiglu"], kept.weights_TK), slot_TK, rec["combine_capacity"]),
        ]  # fmt: skip
    out = []
    for i, (name, f, diff, nondiff, want) in enumerate(stages):
        g = f if name == "routing" else _no_aux(f)
        step = vjp_stage(g)
        shapes, treedef = jax.tree.flatten(
            jax.eval_shape(lambda d, nd, g=g: g(d, nd)[0], diff, nondiff)
        )
        keys = jax.random.split(jax.random.key(100 + i), len(shapes))
        ct = jax.tree.unflatten(
            treedef, [jax.random.normal(k, s.shape, s.dtype) for k, s in zip(keys, shapes)]
        )
        out.append((name, step, (diff, nondiff, ct), want))
    return out


def _no_aux(f):
    return lambda d, nd: (f(d, nd), ())


def check_stage(name: str, got, want, tol: float) -> float:
    """Max abs difference of a stage's forward from the layer's value, relative to its scale;
    stops the run when it exceeds `tol`."""
    err = 0.0
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
        assert a.shape == b.shape, f"stage {name}: shape {a.shape} vs the layer's {b.shape}"
        scale = max(float(jnp.max(jnp.abs(b))), 1e-30)
        err = max(err, float(jnp.max(jnp.abs(a - b))) / scale)
    assert err <= tol, f"stage {name} differs from the layer's own value: {err:.3g} > {tol}"
    return err


def time_call(fn, args, iters: int) -> float:
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / iters


def grouped_gemm_rows(m: int, k: int, n: int, e: int, dtype, iters: int) -> list[dict]:
    """Forward + dX + dW of the expert GEMM by each available form (module docstring)."""
    kx, kw, kd = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, (m, k), dtype)
    w = jax.random.normal(kw, (e, k, n), dtype)
    dy = jax.random.normal(kd, (m, n), dtype)
    sizes = jnp.full((e,), m // e, jnp.int32).at[-1].add(m % e)

    def grouped(impl):
        def f(x, w, dy):
            y, vjp = jax.vjp(lambda x, w: grouped_matmul(x, w, sizes, impl=impl), x, w)
            return y, *vjp(dy)

        return jax.jit(f)

    def dense(x, w, dy):  # the same M, K, N as one product: the ceiling
        y, vjp = jax.vjp(lambda x, w: x @ w, x, w[0])
        return y, *vjp(dy)

    fns = {"ragged_dot (xla)": grouped("xla")}
    if jax.default_backend() == "gpu" and mosaic_gpu_unsupported(x, w, dtype) is None:
        fns["mosaic_gpu"] = grouped("mosaic_gpu")
    fns["dense product"] = jax.jit(dense)
    ref = fns["ragged_dot (xla)"](x, w, dy)
    rows = []
    for name, fn in fns.items():
        row = {"gemm": name}
        if name == "mosaic_gpu":
            got = fn(x, w, dy)
            row["max_rel_err"] = max(
                float(jnp.max(jnp.abs(g.astype(jnp.float32) - r.astype(jnp.float32))))
                / float(jnp.max(jnp.abs(r.astype(jnp.float32))))
                for g, r in zip(got, ref, strict=True)
            )
        sec = time_call(fn, (x, w, dy), iters)
        row.update(ms=1e3 * sec, tflops=3 * 2 * m * k * n / sec / 1e12)
        rows.append(row)
    return rows


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

    m = args.tokens * k
    gemm = grouped_gemm_rows(m, d, f, e, jnp.dtype(args.dtype), args.iters)

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
    print(f"\nexpert GEMM alone, forward + dX + dW, M={m} K={d} N={f} in {e} groups")
    for r in gemm:
        err = f"  (max rel err vs ragged_dot {r['max_rel_err']:.1e})" if "max_rel_err" in r else ""
        print(f"  {r['gemm']:<20}{r['ms']:>10.2f} ms{r['tflops']:>10.1f} TFLOP/s{err}")
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
        "grouped_gemm": gemm,
        "ep_devices": n_ep,
        "ep_comm_bytes": ep,
    }
    # written now and again with the stages, so a run cut short keeps the layer rows
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))

    # where the time goes: each stage alone, on the layer's own intermediate values
    print("\nwhere the time goes: each stage jitted alone on the layer's own intermediates, "
          "fwd+bwd ms (share of the stages' sum)")  # fmt: skip
    heads = ("layer", *STAGES, "sum", "layer +dx")
    print(f"{heads[0]:<22}" + "".join(f"{h:>15}" for h in heads[1:]), flush=True)
    impls = {"moe dropless": "dropless", "moe dropless blocked": "blocked",
             "moe capacity 1.25": "capacity"}  # fmt: skip
    out["stages"], out["stage_check"] = [], {"max_rel_err": 0.0, "tol": tol}
    for name, impl in impls.items():
        ms = {}
        for stage, step, stage_args, want in layer_stages(layers[name], x, impl):
            stage_err = check_stage(stage, step(*stage_args)[0], want, tol)
            out["stage_check"]["max_rel_err"] = max(out["stage_check"]["max_rel_err"], stage_err)
            ms[STAGE_KEYS[stage]] = 1e3 * time_call(step, stage_args, args.iters)
        # the stages differentiate their inputs (x included): compare with the layer's step
        # that returns x's gradient too (the table above: the parameters' only)
        fn, params = fwd_bwd(layers[name], wrt_x=True)
        layer_ms = 1e3 * time_it(fn, params, x, args.iters)
        total = sum(ms.values())
        share = {k: v / total for k, v in ms.items()}
        r = {"layer": name, **{f"{k}_ms": v for k, v in ms.items()}, "sum_ms": total,
             "layer_dx_ms": layer_ms, "share": share}  # fmt: skip
        out["stages"].append(r)
        cells = [f"{r[f'{k}_ms']:.2f} ({100 * r['share'][k]:.0f}%)" for k in ms]
        cells += [f"{r['sum_ms']:.2f}", f"{r['layer_dx_ms']:.2f}"]
        print(f"{r['layer']:<22}" + "".join(f"{c:>15}" for c in cells), flush=True)
        Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
