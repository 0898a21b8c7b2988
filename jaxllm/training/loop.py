"""The training loop: set up, resume, step, evaluate, checkpoint, stop cleanly."""

from __future__ import annotations

import math
import shutil
import signal
import time

import jax
import numpy as np

from jaxllm import config as config_lib
from jaxllm.config import Config, ConfigError
from jaxllm.data import Pipeline
from jaxllm.interop import hf
from jaxllm.models import flops_per_token
from jaxllm.parallel.core.mesh import make_mesh
from jaxllm.sampling import Sampler
from jaxllm.training.checkpoint import Checkpointer
from jaxllm.training.metrics import (
    MetricsWriter,
    Progress,
    peak_flops_per_device,
    plot_losses,
    read_metrics,
)
from jaxllm.training.state import Trainer
from jaxllm.training.step import make_eval_params, make_eval_step, make_train_step


class StopFlag:
    """Set by SIGTERM / SIGINT; the loop saves a checkpoint and returns at the next step."""

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second signal: give up at once
            signal.signal(signum, self._old.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def check_batch_layout(cfg: Config, mesh_sizes: dict[str, int]) -> None:
    # the expert axis also splits the batch (jaxllm.parallel.core.rules), when the mesh has one
    shards = mesh_sizes["data"] * mesh_sizes["fsdp"] * mesh_sizes.get("expert", 1)
    micro = cfg.data.batch_size // cfg.train.microbatches
    if micro % shards:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} / train.microbatches="
            f"{cfg.train.microbatches} = {micro} sequences per micro-batch must be a multiple "
            f"of the {shards} data × fsdp × expert shards"
        )
    if cfg.data.seq_len % mesh_sizes.get("sequence", 1):
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} must divide over the "
            f"{mesh_sizes['sequence']} parallel.mesh.sequence shards"
        )
    if cfg.data.batch_size % jax.process_count():
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} must divide over "
            f"{jax.process_count()} processes"
        )


def _global(batch: dict, sharding) -> dict:
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def evaluate(eval_step, params, batches, sharding) -> float:
    loss_sum, tokens = 0.0, 0.0
    for b in batches:
        out = jax.device_get(eval_step(params, _global(b, sharding)))
        loss_sum += float(out["loss_sum"])
        tokens += float(out["tokens"])
    return loss_sum / max(tokens, 1.0)


def train(cfg: Config) -> dict:
    """Run (or resume) the training `cfg` describes; returns a summary of the run."""
    if cfg.checkpoint.init_from:
        # The imported checkpoint fixes the architecture (see `hf.config_for_init`).
        cfg = hf.config_for_init(cfg)
    mesh_sizes = cfg.parallel.mesh.resolve(jax.device_count())
    check_batch_layout(cfg, mesh_sizes)
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)

    data = Pipeline(
        cfg.data,
        seed=cfg.train.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    if data.tokenizer.vocab_size > cfg.model.vocab_size and not cfg.checkpoint.init_from:
        # A file tokenizer's vocabulary flows into the model: the embedding grows to fit it
        # (rounded up to a multiple of 128 for even shards). Imported weights fix their size.
        vocab = -(-data.tokenizer.vocab_size // 128) * 128
        print(f"model.vocab_size {cfg.model.vocab_size} -> {vocab} (tokenizer: "
              f"{data.tokenizer.vocab_size} tokens)")  # fmt: skip
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"vocab_size": vocab})})
    if data.tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
            f"{data.tokenizer.vocab_size} tokens"
        )
    val_batches = data.val_batches(cfg.train.eval_batches)
    mesh = make_mesh(mesh_sizes)
    trainer = Trainer.create(cfg, mesh)
    train_step = make_train_step(trainer)
    eval_step = make_eval_step(trainer)
    eval_params = make_eval_params(trainer)  # CO2: the stale average applied first
    if cfg.train.resume == "never" and (run_dir / "checkpoints").exists():
        # Starting over in the same folder: the old run's checkpoints would be resumed from
        # (or collide with) the new ones.
        shutil.rmtree(run_dir / "checkpoints")
    ckpt = Checkpointer(run_dir / "checkpoints", keep=cfg.checkpoint.keep,
                        async_save=cfg.checkpoint.async_save)  # fmt: skip
    train_iter = data.train_iterator()

    resume_step = ckpt.latest_step() if cfg.train.resume == "auto" else None
    if resume_step is not None:
        state, _ = ckpt.restore(resume_step, trainer.abstract_state(), train_iter)
    elif cfg.checkpoint.init_from:
        path = cfg.checkpoint.init_from.removeprefix("hf:")
        params = hf.load_params(path, cfg.model, shardings=trainer.state_shardings["params"])
        state = trainer.init_state_from(params)
    else:
        state = trainer.init_state(cfg.train.seed)
    (run_dir / "config.yaml").write_text(config_lib.to_yaml(cfg))

    start = int(jax.device_get(state["step"]))
    n_params = sum(x.size for x in jax.tree.leaves(trainer.model.abstract_params))
    n_embed = trainer.model.abstract_params["embed"].size
    flops_tok = flops_per_token(cfg.model, n_params, n_embed, cfg.data.seq_len)
    peak, peak_src = peak_flops_per_device(cfg.model.dtype)
    peak_total = peak * jax.device_count()

    writer = MetricsWriter(run_dir, tensorboard=cfg.logging.tensorboard, resume_step=resume_step)
    progress = Progress(cfg.train.steps, start, cfg.logging.progress)
    progress.log(
        f"jaxllm | {cfg.name} | {n_params / 1e6:.2f}M params | mesh {mesh_sizes} | "
        f"{data.stats()} | "
        + (f"resumed at step {start}" if resume_step is not None else "from scratch")
        + f" | peak {peak / 1e12:.3g} TFLOP/s/device ({peak_src})"
    )

    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    last_saved = start if resume_step is not None else None
    pending = None  # the previous step's metrics, fetched one step late
    t_last, steps_since = time.perf_counter(), 0
    step = start
    end = min(cfg.train.steps, cfg.train.stop_at or cfg.train.steps)
    k = trainer.steps_per_call  # steps per call: τ with CO2 (a round), else 1
    with StopFlag() as stop:
        while step < end and stop.signum is None:
            stack = k if trainer.round_sharding is not None else None
            batch = _global(_next_batch(train_iter, stack), trainer.train_batch_sharding)
            state, metrics = train_step(state, batch)
            step += k
            steps_since += k
            if pending is not None:
                _log_train(pending, writer, progress)
                pending = None
            if _crossed(step, k, cfg.logging.every) or step == end:
                jax.block_until_ready(metrics)
                now = time.perf_counter()
                tps = steps_since * tokens_per_step / (now - t_last)
                t_last, steps_since = now, 0
                pending = (step, metrics, tps, flops_tok, peak_total)
            if _crossed(step, k, cfg.train.eval_every) and step < cfg.train.steps:
                val = evaluate(eval_step, eval_params(state), val_batches, trainer.batch_sharding)
                writer.write({"step": step, "val_loss": val})
                progress.log(f"step {step:>6} | val_loss {val:.4f}")
                t_last = time.perf_counter()
            if _crossed(step, k, cfg.checkpoint.every):
                ckpt.save(step, state, train_iter, {"step": step})
                last_saved = step
        if pending is not None:
            _log_train(pending, writer, progress)
        stopped = stop.signum is not None
        if stopped:
            progress.log(f"stopping on signal {stop.signum} at step {step}: saving a checkpoint")
        if last_saved != step:
            ckpt.save(step, state, train_iter, {"step": step})
        ckpt.close()

    stopped = stopped or step < cfg.train.steps
    summary = {"step": step, "stopped": stopped}
    if not stopped and step >= cfg.train.steps:
        val = evaluate(eval_step, eval_params(state), val_batches, trainer.batch_sharding)
        writer.write({"step": step, "val_loss": val})
        progress.log(f"step {step:>6} | val_loss {val:.4f} (final)")
        summary["val_loss"] = val
    progress.close()
    writer.close()
    records = read_metrics(run_dir / "metrics.jsonl")
    summary["records"] = records
    if cfg.logging.plot and records:
        plot_losses(run_dir / "loss.png", records)
    if not stopped and cfg.train.sample_lines:
        _print_samples(cfg, trainer, state["params"], data.tokenizer)
    return summary


def _next_batch(train_iter, k: int | None) -> dict:
    """The next batch, or with `k` given the next `k` stacked along a leading axis."""
    if k is None:
        return next(train_iter)
    batches = [next(train_iter) for _ in range(k)]
    return {key: np.stack([b[key] for b in batches]) for key in batches[0]}


def _crossed(step: int, k: int, every: int) -> bool:
    """Whether the last `k` steps (ending at `step`) reached a multiple of `every` (0 = never);
    for k = 1, ``step % every == 0``."""
    return bool(every) and step // every > (step - k) // every


def _log_train(pending, writer: MetricsWriter, progress: Progress) -> None:
    step, metrics, tps, flops_tok, peak_total = pending
    m = jax.device_get(metrics)
    record = {
        "step": step,
        "loss": float(m["loss"]),
        "grad_norm": float(m["grad_norm"]),
        "lr": float(m["lr"]),
        "tokens_per_s": tps,
        "mfu": tps * flops_tok / peak_total if math.isfinite(peak_total) else float("nan"),
    }
    for key, value in m.items():
        if key not in ("loss", "grad_norm", "lr", "tokens") and float(value) != 0.0:
            record[key] = float(value)
    writer.write(record)
    progress.update(step, record)


def _print_samples(cfg: Config, trainer: Trainer, params, tokenizer) -> None:
    sampler = Sampler(trainer.model, params, max_len=min(cfg.model.max_seq_len, 512))
    prompts = ["def ", "import ", "class "][: cfg.train.sample_lines]
    print("samples:")
    for i, prompt in enumerate(prompts):
        text = sampler.complete(
            tokenizer, prompt, max_new_tokens=cfg.train.sample_tokens, temperature=0.8,
            top_k=40, seed=cfg.train.seed + i,
        )  # fmt: skip
        first = (prompt + text).splitlines()[:3]
        print("  | " + "\n  | ".join(first))
