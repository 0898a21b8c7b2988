"""jaxllm's train step against MaxText's on the same model shapes, in one process.

    python benchmarks/maxtext_compare.py [--shapes default wide] [--rounds 10] [--steps 1]

Needs an interpreter where both `jaxllm` and `maxtext` import (MaxText wants Python >= 3.12; see
benchmarks/README.md); without maxtext it prints why and exits 0. For each shape it builds
jaxllm's jitted train step (the trainer's shardings, donation, AdamW, clipping, as
benchmarks/train_step.py does) and MaxText's (its own `setup_train_loop` +
`jit_train_and_eval_step` + `train_step`, synthetic data, checkpointing off), same dims, dtype,
global batch, sequence length and device count. MaxText always wraps each decoder layer in
`jax.checkpoint`, so each MaxText setting is timed against the jaxllm setting that does the
same work: MaxText's fastest policy (`minimal_with_context`: every matmul output saved,
unrolled layers) against jaxllm's default (no remat, unrolled), and MaxText's defaults
(`full` remat, scanned layers) against jaxllm with `train.remat=full model.scan_layers=true`.

Timing: the systems take turns, `--steps` timed steps each per round, over `--rounds` rounds
(order rotated every round), so a load spike on a shared machine hits all of them. Speedups
(the paired jaxllm setting's tokens/s over the row's) are computed within each round: median
[min, max] over rounds,
from wall time and, less sensitive to other processes, from this process's CPU time. Also
reported: compile time, XLA's temp memory and FLOP count of each compiled step (XLA counts a
scanned layer's body once, so the scanned rows show about 1/n_layers of the layer FLOPs).
JSON goes to benchmarks/results/maxtext_compare.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

# name -> (d_model, n_layers, n_heads, n_kv_heads, d_ff, vocab, seq_len, global batch)
SHAPES = {
    "default": (256, 4, 8, 4, 768, 384, 256, 16),  # jaxllm's `default` preset
    "wide": (512, 4, 8, 4, 1536, 1024, 256, 8),
}
# label -> (remat_policy, scan_layers)
JAXLLM_SETTINGS = {"jaxllm": ("none", False), "jaxllm-scan-full": ("full", True)}
# label -> (remat_policy, scan_layers, the jaxllm setting it is timed against)
MAXTEXT_SETTINGS = {
    "maxtext": ("minimal_with_context", False, "jaxllm"),
    "maxtext-defaults": ("full", True, "jaxllm-scan-full"),
}


def _jaxllm_runner(shape: tuple, dtype: str, remat: str, scan: bool):
    """(step(), compile_s, stats) for jaxllm; step() runs one step and blocks."""
    from train_step import synthetic_batch

    from jaxllm import config
    from jaxllm.parallel.core.mesh import make_mesh
    from jaxllm.training.state import Trainer
    from jaxllm.training.step import make_train_step

    d, n_layers, h, g, f, vocab, t, b = shape
    cfg = config.load(
        "default",
        [
            f"model.d_model={d}",
            f"model.n_layers={n_layers}",
            f"model.n_heads={h}",
            f"model.n_kv_heads={g}",
            f"model.d_ff={f}",
            f"model.vocab_size={vocab}",
            f"model.max_seq_len={t}",
            f"model.dtype={dtype}",
            "model.param_dtype=float32",
            f"data.seq_len={t}",
            f"data.batch_size={b}",
            f"train.remat={remat}",
            f"model.scan_layers={str(scan).lower()}",
        ],
    )
    mesh = make_mesh(cfg.parallel.mesh.resolve(jax.device_count()))
    trainer = Trainer.create(cfg, mesh)
    step_fn = make_train_step(trainer)
    box = {"state": trainer.init_state(cfg.train.seed)}
    batch = {k: jax.device_put(v, trainer.batch_sharding) for k, v in synthetic_batch(cfg).items()}
    t0 = time.perf_counter()
    compiled = step_fn.lower(box["state"], batch).compile()
    compile_s = time.perf_counter() - t0

    def step() -> float:
        box["state"], m = step_fn(box["state"], batch)
        jax.block_until_ready(box["state"])
        return float(m["loss"])

    n_params = sum(x.size for x in jax.tree.leaves(trainer.model.abstract_params))
    return step, compile_s, _compiled_stats(compiled, n_params)


def _maxtext_runner(shape: tuple, dtype: str, remat: str, scan: bool, out_dir: str):
    """(step(), compile_s, stats) for MaxText's pre-training step (NNX path, synthetic data)."""
    import maxtext
    from flax import nnx
    from flax.core.spmd import logical_axis_rules
    from maxtext.trainers.pre_train import train as mt_train
    from maxtext.utils import maxtext_utils, sharding, train_utils

    d, n_layers, h, g, f, vocab, t, b = shape
    base_yml = Path(maxtext.__file__).parent / "configs" / "base.yml"
    argv = [
        "maxtext_compare",
        str(base_yml),
        f"run_name=compare_{remat}_{scan}",
        f"base_output_directory={out_dir}",
        "dataset_type=synthetic",
        "steps=1000000",
        "hardware=cpu" if jax.default_backend() == "cpu" else "hardware=gpu",
        "skip_jax_distributed_system=true",
        "jax_cache_dir=",  # no persistent compilation cache: compile times stay comparable
        "enable_checkpointing=false",
        "enable_tensorboard=false",
        "enable_goodput_recording=false",
        "monitor_goodput=false",
        f"base_emb_dim={d}",
        f"base_num_decoder_layers={n_layers}",
        f"base_num_query_heads={h}",
        f"base_num_kv_heads={g}",
        f"head_dim={d // h}",
        f"base_mlp_dim={f}",
        f"vocab_size={vocab}",
        f"max_target_length={t}",
        f"per_device_batch_size={b / jax.device_count()}",
        f"dtype={dtype}",
        "weight_dtype=float32",
        "decoder_block=llama2",
        "logits_via_embedding=false",
        "attention=dot_product",
        f"remat_policy={remat}",
        f"scan_layers={str(scan).lower()}",
        "dropout_rate=0.0",
        "opt_type=adamw",
        "gradient_clipping_threshold=1.0",
    ]
    config, recorder = mt_train.initialize(argv)
    setup = train_utils.setup_train_loop(config, recorder)
    state_mesh_shardings, mesh, state = setup[2], setup[4], setup[-1]
    jit_model, state = nnx.split(state)
    params_shardings, state_mesh_shardings = sharding.maybe_update_params_sharding_with_opt(
        config, state_mesh_shardings
    )
    p_train_step, _ = train_utils.jit_train_and_eval_step(
        config,
        jit_model,
        mesh,
        state,
        state_mesh_shardings,
        mt_train.train_step,
        params_shardings=params_shardings,
    )
    rules = config.logical_axis_rules
    with jax.set_mesh(mesh), logical_axis_rules(rules):
        data_sharding = sharding.get_input_data_sharding(config, mesh)
        shaped = maxtext_utils.get_shaped_batch(config, batch_sharding=data_sharding)
        batch = mt_train.make_synthetic_batch(config, shaped, seed=0)
        t0 = time.perf_counter()
        compiled = p_train_step.lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
    box = {"state": state}

    def step() -> float:
        with jax.set_mesh(mesh), logical_axis_rules(rules):
            box["state"], m = p_train_step(box["state"], batch)
        jax.block_until_ready(box["state"])
        return float(m["scalar"]["learning/loss"])

    _, params, _ = nnx.split(nnx.merge(jit_model, state).model, nnx.Param, ...)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    return step, compile_s, _compiled_stats(compiled, n_params)


def _compiled_stats(compiled, n_params: int) -> dict:
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {
        "params_m": n_params / 1e6,
        "temp_mib": mem.temp_size_in_bytes / 2**20 if mem else float("nan"),
        "step_gflop": (cost or {}).get("flops", float("nan")) / 1e9,
    }


def compare(shape_name: str, dtype: str, rounds: int, steps: int, settings: list[str]) -> dict:
    shape = SHAPES[shape_name]
    tokens = shape[6] * shape[7]
    jax.jit(lambda x: x + 1).lower(1.0).compile()  # one-time backend costs, outside the timings
    runners, paired = {}, {}
    for label in settings:
        remat, scan, mine = MAXTEXT_SETTINGS[label]
        if mine not in runners:
            runners[mine] = _jaxllm_runner(shape, dtype, *JAXLLM_SETTINGS[mine])
        runners[label] = _maxtext_runner(shape, dtype, remat, scan, f"/tmp/maxtext_compare_{label}")
        paired[label] = mine
    names = list(runners)
    losses = {}
    for name, (step, _, _) in runners.items():  # first call: a finite loss, and warm-up
        losses[name] = step()
        if not math.isfinite(losses[name]):
            raise SystemExit(f"check failed: {name} loss {losses[name]} after one step")
        step()
    per_round: dict[str, list[float]] = {n: [] for n in names}  # median step seconds per round
    cpu_round: dict[str, list[float]] = {n: [] for n in names}  # process CPU seconds, likewise
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times, cpu = [], []
            for _ in range(steps):
                t0, c0 = time.perf_counter(), time.process_time()
                runners[name][0]()
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            per_round[name].append(float(np.median(times)))
            cpu_round[name].append(float(np.median(cpu)))
    rows = []
    for name in names:
        s = np.array(per_round[name])
        mine = paired.get(name, name)
        ratio = np.array(per_round[name]) / np.array(per_round[mine])  # = jaxllm tok/s ÷ theirs
        remat, scan = (JAXLLM_SETTINGS | MAXTEXT_SETTINGS)[name][:2]
        rows.append(
            {
                "shape": shape_name,
                "system": name,
                "dtype": dtype,
                "remat": remat,
                "scan_layers": scan,
                "against": mine,
                "step_ms": float(np.median(s) * 1e3),
                "tokens_per_s": float(tokens / np.median(s)),
                "tokens_per_s_min": float(tokens / s.max()),
                "tokens_per_s_max": float(tokens / s.min()),
                "jaxllm_speedup": float(np.median(ratio)),
                "jaxllm_speedup_min": float(ratio.min()),
                "jaxllm_speedup_max": float(ratio.max()),
                "cpu_s_per_step": float(np.median(cpu_round[name])),
                "jaxllm_cpu_speedup": float(
                    np.median(np.array(cpu_round[name]) / np.array(cpu_round[mine]))
                ),
                "compile_s": runners[name][1],
                **runners[name][2],
                "loss_after_1_step": losses[name],
                "round_step_s": per_round[name],
                "round_cpu_s": cpu_round[name],
            }
        )
    return {
        "shape": dict(
            zip("d_model n_layers n_heads n_kv_heads d_ff vocab seq_len batch".split(), shape)
        ),
        "rows": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["default"], choices=list(SHAPES))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=1, help="timed steps per system per round")
    ap.add_argument(
        "--maxtext",
        nargs="+",
        default=list(MAXTEXT_SETTINGS),
        choices=list(MAXTEXT_SETTINGS),
        help="MaxText settings to run",
    )
    ap.add_argument("--out", default="benchmarks/results/maxtext_compare.json")
    args = ap.parse_args()
    try:
        import maxtext  # noqa: F401
    except ImportError as e:
        print(
            f"skipped: MaxText is not installed here ({e}). It needs Python >= 3.12: see "
            "benchmarks/README.md, 'jaxllm vs MaxText'."
        )
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "jax": jax.__version__,
        "device": jax.devices()[0].device_kind,
        "n_devices": jax.device_count(),
        "rounds": args.rounds,
        "steps": args.steps,
    }
    results = []
    for shape in args.shapes:  # written after each shape: a long run keeps what it finished
        results.append(compare(shape, args.dtype, args.rounds, args.steps, args.maxtext))
        out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    cols = [
        "shape",
        "system",
        "against",
        "remat",
        "scan_layers",
        "step_ms",
        "tokens_per_s",
        "cpu_s_per_step",
        "jaxllm_speedup",
        "jaxllm_cpu_speedup",
        "compile_s",
        "temp_mib",
        "step_gflop",
    ]
    print(" | ".join(f"{c:>16}" for c in cols))
    for res in results:
        for r in res["rows"]:
            cells = []
            for c in cols:
                v = r[c]
                if c == "jaxllm_speedup":
                    v = f"{v:.2f} [{r['jaxllm_speedup_min']:.2f},{r['jaxllm_speedup_max']:.2f}]"
                cells.append(f"{v:>16.4g}" if isinstance(v, float) else f"{v!s:>16}")
            print(" | ".join(cells))
    print(
        f"device: {jax.devices()[0].device_kind} × {jax.device_count()}, jax {jax.__version__}; "
        f"{args.rounds} rounds × {args.steps} steps; jaxllm_speedup = the paired jaxllm setting's "
        "tokens/s ÷ this row's, per round: median [min, max]"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
