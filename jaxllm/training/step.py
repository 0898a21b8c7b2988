"""The jitted train and eval steps: forward, loss, gradients with micro-batch accumulation,
clipping and the optax update, on the state's shardings with the state donated."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxllm.models.decoder import head_logits
from jaxllm.optim import co2 as co2_lib
from jaxllm.parallel.core.axes import SEQUENCE
from jaxllm.parallel.core.rules import DEFAULT_RULES, avoid_split_gathers, replica_rules, use_rules
from jaxllm.parallel.fp8_allreduce import data_parallel_fp8, update_mu
from jaxllm.parallel.sequence import use_impl
from jaxllm.precision import PrecisionSpec, update_delayed_state, use_precision
from jaxllm.training.remat import block_remat
from jaxllm.training.state import Trainer, TrainState

Batch = dict[str, jax.Array]  # inputs, targets, segment_ids, positions [B, T] int32; loss_mask f32
# (and domain [B, T] int32 when data.domains is set)


def cross_entropy(
    logits_BTV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array, z_loss: float = 0.0
) -> tuple[jax.Array, jax.Array]:
    """(sum of masked token losses, sum of masked log(Z)²), in float32."""
    logits = logits_BTV.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    if avoid_split_gathers():
        # a one-hot sum (exact: one term) where XLA cannot partition the gather
        hot = jax.nn.one_hot(targets_BT, logits.shape[-1], dtype=logits.dtype)
        target_logit = jnp.sum(logits * hot, axis=-1)
    else:
        target_logit = jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]
    nll = (log_z - target_logit) * mask_BT
    z = jnp.square(log_z) * mask_BT
    return jnp.sum(nll) + z_loss * jnp.sum(z), jnp.sum(z)


def chunked_cross_entropy(
    x_BTD: jax.Array,
    w_DV: jax.Array,
    targets_BT: jax.Array,
    mask_BT: jax.Array,
    z_loss: float,
    chunk: int,
) -> tuple[jax.Array, jax.Array]:
    """`cross_entropy(head_logits(x, w), ...)` over `chunk` positions at a time (a scan whose
    steps are rematerialised): [B, chunk, V] float32 logits live at once in the forward and
    the backward, not [B, T, V]. T is zero-padded to whole chunks (masked out)."""
    b, t = x_BTD.shape[:2]
    pad = -t % chunk
    n = (t + pad) // chunk

    def chunks(a, value=0):
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2), constant_values=value)
        return a.reshape(b, n, chunk, *a.shape[2:]).swapaxes(0, 1)

    @jax.checkpoint
    def step(sums, xs):
        x_BCD, targets_BC, mask_BC = xs
        total, z = cross_entropy(head_logits(x_BCD, w_DV), targets_BC, mask_BC, z_loss)
        return (sums[0] + total, sums[1] + z), None

    zero = jnp.zeros((), jnp.float32)
    xs = (chunks(x_BTD), chunks(targets_BT), chunks(mask_BT.astype(jnp.float32)))
    (total, z), _ = jax.lax.scan(step, (zero, zero), xs)
    return total, z


def collect_sown(model: nnx.Module) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Pop what layers sowed this forward pass (`self.sow(nnx.Intermediate, name, value)`).

    Convention: values sown as `aux_loss` (scalars, already weighted by the layer) are summed
    into the loss; values sown as `metric_<name>` are averaged over layers and logged as
    `<name>`. Anything else is ignored.
    """
    sown = nnx.pop(model, nnx.Intermediate)
    aux = jnp.zeros((), jnp.float32)
    metrics: dict[str, list[jax.Array]] = {}
    for path, value in jax.tree_util.tree_leaves_with_path(sown):
        names = [str(getattr(p, "key", getattr(p, "name", ""))) for p in path]
        name = next((n for n in reversed(names) if n == "aux_loss" or n.startswith("metric_")), "")
        if name == "aux_loss":
            aux = aux + jnp.sum(value.astype(jnp.float32))
        elif name:
            metrics.setdefault(name.removeprefix("metric_"), []).append(value)
    return aux, {k: jnp.mean(jnp.stack([jnp.mean(v) for v in vs])) for k, vs in metrics.items()}


UPDATE_KEY = "update:"


def layer_updates(model: nnx.Module) -> dict[str, jax.Array]:
    """What layers sowed as `update_<param>` (before `collect_sown` pops it): an additive
    update of their own parameter `<param>` that the train step applies after the optimizer,
    for state the layer owns rather than the optimizer (the aux-loss-free router bias of
    `jaxllm.layers.moe`). Keyed `"update:" + the parameter's '/'-joined path`."""
    out: dict[str, jax.Array] = {}
    for path, value in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Intermediate)):
        names = [str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", "")))) for p in path]
        i = next((i for i, n in enumerate(names) if n.startswith("update_")), None)
        if i is not None:
            key = UPDATE_KEY + "/".join([*names[:i], names[i].removeprefix("update_")])
            out[key] = out[key] + value if key in out else value
    return out


def apply_layer_updates(old: dict, new: dict, metrics: dict) -> tuple[dict, dict]:
    """(params, metrics): pop the `"update:"` entries of `metrics` (micro-batch means) and set
    each named parameter to its pre-step value plus the update (the optimizer's own step for it,
    zero-gradient anyway, is discarded)."""
    metrics = dict(metrics)
    for key in [k for k in metrics if k.startswith(UPDATE_KEY)]:
        delta = metrics.pop(key)
        parts = key.removeprefix(UPDATE_KEY).split("/")

        new = _put_update(old, new, parts, delta)
    return new, metrics


def _put_update(old: dict, new: dict, parts: list[str], delta: jax.Array) -> dict:
    """`new` with the leaf at `parts` replaced by old leaf + delta (dicts copied on the way)."""
    k = next(k for k in new if str(k) == parts[0])
    out = dict(new)
    if len(parts) == 1:
        out[k] = old[k] + delta.astype(old[k].dtype)
    else:
        out[k] = _put_update(old[k], new[k], parts[1:], delta)
    return out


def _forward_loss(trainer: Trainer, params: dict, mb: Batch, fp8_state: dict | None = None):
    """(objective, sums) for one micro-batch, all summed over its tokens.

    objective = NLL + z_loss · log(Z)² + aux; `sums` = {"nll", "z", "aux"} token sums and
    `metrics`, the layers' own (averaged over layers). The projections run in
    `cfg.precision` (with `fp8_state` for delayed FP8 scaling), the blocks under `train.remat`.
    """
    t = trainer.cfg.train
    chunk = loss_chunk(trainer, mb["inputs"].shape[-1])
    with use_precision(PrecisionSpec.from_config(trainer.cfg.precision), fp8_state):
        model = trainer.model.merge(params)
        out = model(mb["inputs"], positions_BT=mb["positions"],
                    segment_ids_BT=mb["segment_ids"], domain_BT=mb.get("domain"),
                    remat=block_remat(t.remat, t.offload_fraction), hidden=bool(chunk))  # fmt: skip
    if chunk:
        total, z = chunked_cross_entropy(out, model.head_DV(), mb["targets"], mb["loss_mask"],
                                         t.z_loss, chunk)  # fmt: skip
    else:
        total, z = cross_entropy(out, mb["targets"], mb["loss_mask"], t.z_loss)
    updates = layer_updates(model)
    aux, layer_metrics = collect_sown(model)
    layer_metrics.update(updates)
    # Auxiliary losses are per-token means: weight them by this micro-batch's tokens so the
    # final division by the global token count averages them like the main loss.
    aux_sum = aux * jnp.sum(mb["loss_mask"])
    nll = total - trainer.cfg.train.z_loss * z
    return total + aux_sum, ({"nll": nll, "z": z, "aux": aux_sum}, layer_metrics)


def loss_chunk(trainer: Trainer, t: int) -> int:
    """`train.loss_chunk` where it applies to rows of t positions, else 0 (whole rows): it
    does not when the chunk covers the row, or when the mesh splits the sequence (the chunks
    would cut across its shards)."""
    chunk = trainer.cfg.train.loss_chunk
    if not chunk or chunk >= t or trainer.mesh.shape.get(SEQUENCE, 1) > 1:
        return 0
    return chunk


def _z_metric(cfg, sums: dict, n_tokens: jax.Array) -> dict:
    """The mean log(Z)² as `z_loss`, logged only when it is part of the objective."""
    return {"z_loss": sums["z"] / n_tokens} if cfg.train.z_loss > 0 else {}


def _accumulator(trainer: Trainer) -> Callable:
    """`accumulate(params, fp8_state, batch) -> (grads, sums, fp8_rec, layer_metrics)`: the
    gradients of the token-summed objective of `batch`, its token sums, the recorded amax
    histories and the layers' metrics, over `train.microbatches` micro-batches."""
    n_micro = trainer.cfg.train.microbatches
    # Differentiated in the delayed-FP8 state too: its "gradient" is the recorded amax
    # histories (jaxllm.precision.fp8), the state is None otherwise.
    grad_fn = jax.value_and_grad(
        lambda p, f, mb: _forward_loss(trainer, p, mb, f), argnums=(0, 1), has_aux=True
    )

    def accumulate(params, fp8_state, batch):
        if n_micro == 1:
            (_, (sums, layer_metrics)), (grads, fp8_rec) = grad_fn(params, fp8_state, batch)
        else:
            micro = jax.tree.map(lambda x: x.reshape(n_micro, -1, *x.shape[1:]), batch)

            def body(carry, mb):
                g_acc, s_acc, f_acc = carry
                (_, (s, lm)), (g, f) = grad_fn(params, fp8_state, mb)
                g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
                # amax histories of the micro-batches: their max is the whole batch's
                f_acc = jax.tree.map(jnp.maximum, f_acc, f)
                return (g_acc, jax.tree.map(jnp.add, s_acc, s), f_acc), lm

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
            sums0 = {k: jnp.zeros((), jnp.float32) for k in ("nll", "z", "aux")}
            f0 = jax.tree.map(jnp.zeros_like, fp8_state)
            (grads, sums, fp8_rec), lms = jax.lax.scan(body, (zeros, sums0, f0), micro)
            layer_metrics = jax.tree.map(lambda x: jnp.mean(x, axis=0), lms)
        return grads, sums, fp8_rec, layer_metrics

    return accumulate


def make_train_step(trainer: Trainer) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """`step(state, batch) -> (state, metrics)`, jitted and donating `state`.

    The loss is the mean over every unmasked target token of the global batch, however the
    batch is split into `train.microbatches` (token sums are accumulated, then divided once).
    With `trainer.fp8_allreduce` the gradients are summed over `data` by FP8-LM's all-reduce
    (`jaxllm.parallel.fp8_allreduce.data_parallel_fp8`), its μ carried in `state["fp8_comm"]`
    and logged as `fp8_mu`.
    """
    cfg = trainer.cfg
    if cfg.optim.co2.enabled:
        return _make_co2_step(trainer)
    accumulate = _accumulator(trainer)
    fp8_reduced = (
        data_parallel_fp8(accumulate, trainer.mesh, trainer.state_shardings["params"])
        if trainer.fp8_allreduce
        else None
    )

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        params = state["params"]
        fp8_state = state.get("fp8_state")
        n_tokens = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
        if fp8_reduced is None:
            grads, sums, fp8_rec, layer_metrics = accumulate(params, fp8_state, batch)
        else:
            mu = state["fp8_comm"]["mu"]
            grads, sums, fp8_rec, layer_metrics, overflow = fp8_reduced(
                params, fp8_state, batch, mu
            )
        grads = jax.tree.map(lambda g: g / n_tokens, grads)
        grad_norm = optax.tree.norm(grads)
        opt_state = state["opt_state"]
        if cfg.train.optimizer_offload:
            # in from pinned host memory; the out_shardings send the new state back there
            on_device = lambda s: s.with_memory_kind("device")
            opt_state = jax.device_put(
                opt_state, jax.tree.map(on_device, trainer.state_shardings["opt_state"])
            )
        updates, opt_state = trainer.tx.update(grads, opt_state, params)
        new_params, layer_metrics = apply_layer_updates(
            params, optax.apply_updates(params, updates), layer_metrics
        )
        new_state = {
            "step": state["step"] + 1,
            "params": new_params,
            "opt_state": opt_state,
        }
        if fp8_state is not None:
            margin = cfg.precision.margin
            new_state["fp8_state"] = update_delayed_state(fp8_state, fp8_rec, margin)
        if fp8_reduced is not None:
            new_state["fp8_comm"] = {"mu": update_mu(mu, overflow)}
        metrics = {
            **layer_metrics,
            "loss": sums["nll"] / n_tokens,
            "aux_loss": sums["aux"] / n_tokens,
            "grad_norm": grad_norm,
            "lr": trainer.schedule(state["step"]),
            "tokens": n_tokens,
            **_z_metric(cfg, sums, n_tokens),
        }
        if fp8_reduced is not None:
            # μ this step ran with, and the fraction of summed values that hit the FP8 max
            metrics.update(fp8_mu=mu, fp8_overflow=overflow)
        return new_state, metrics

    replicated = NamedSharding(trainer.mesh, PartitionSpec())
    jitted = jax.jit(
        step,
        in_shardings=(trainer.state_shardings, trainer.batch_sharding),
        out_shardings=(trainer.state_shardings, replicated),
        donate_argnums=0,
    )
    return _under_rules(trainer, jitted)


def _make_co2_step(trainer: Trainer):
    """`step(state, batches [τ, B, T]) -> (state, metrics)`: one CO2 round (optim/co2.py).

    Metrics are the round's: loss = token-weighted mean over its τ steps and all replicas,
    grad_norm = mean over steps and replicas of each replica's gradient norm, lr = the last
    local step's, outer_norm = the norm of the outer pseudo-gradient.
    """
    cfg = trainer.cfg
    grad_fn = jax.grad(lambda p, mb: _forward_loss(trainer, p, mb), has_aux=True)

    def local_grad(params, mb, norm):
        grads, (sums, layer_metrics) = grad_fn(params, mb)
        return jax.tree.map(lambda g: g / norm, grads), {"sums": sums, "layer": layer_metrics}

    local_shardings = trainer.state_shardings["co2"]["prev_local"]

    def step(state: TrainState, batches: Batch) -> tuple[TrainState, dict]:
        new_state, m = co2_lib.co2_round(
            local_grad, trainer.tx, cfg.optim.co2, state, batches, trainer.replicas,
            local_shardings,
        )  # fmt: skip
        n_tokens = jnp.maximum(jnp.sum(m["tokens"]), 1.0)
        sums = jax.tree.map(jnp.sum, m["sums"])
        # Layers' own parameter updates ("update:" entries) are not applied per replica.
        layer = {k: jnp.mean(v) for k, v in m["layer"].items() if not k.startswith("update:")}
        metrics = {
            **layer,
            "loss": sums["nll"] / n_tokens,
            "aux_loss": sums["aux"] / n_tokens,
            **_z_metric(cfg, sums, n_tokens),
            "grad_norm": jnp.mean(m["grad_norm"]),
            "lr": trainer.schedule(new_state["step"] - 1),
            "tokens": n_tokens,
            "outer_norm": m["outer_norm"],
        }
        return new_state, metrics

    replicated = NamedSharding(trainer.mesh, PartitionSpec())
    jitted = jax.jit(
        step,
        in_shardings=(trainer.state_shardings, trainer.train_batch_sharding),
        out_shardings=(trainer.state_shardings, replicated),
        donate_argnums=0,
    )
    return _under_rules(trainer, jitted, replica_rules(DEFAULT_RULES))


def make_eval_step(trainer: Trainer) -> Callable[[dict, Batch], dict]:
    """`eval(params, batch) -> {"loss_sum", "tokens"}` (sum, so batches combine exactly)."""

    def step(params: dict, batch: Batch) -> dict:
        _, (sums, _) = _forward_loss(trainer, params, batch)
        return {"loss_sum": sums["nll"], "tokens": jnp.sum(batch["loss_mask"])}

    replicated = NamedSharding(trainer.mesh, PartitionSpec())
    jitted = jax.jit(
        step,
        in_shardings=(trainer.state_shardings["params"], trainer.batch_sharding),
        out_shardings=replicated,
    )
    return _under_rules(trainer, jitted)


def make_eval_params(trainer: Trainer) -> Callable[[dict], dict]:
    """`eval_params(state) -> params` to evaluate: the params, or with a stale CO2 average the
    outer params after consuming the pending all-reduce (`co2.flush`), so an evaluation sees
    every finished local step rather than lagging one round behind."""
    c = trainer.cfg.optim.co2
    if not (c.enabled and c.stale):
        return lambda state: state["params"]
    jitted = jax.jit(
        lambda params, co2: co2_lib.flush(c, params, co2),
        out_shardings=trainer.state_shardings["params"],
    )
    return lambda state: jitted(state["params"], state["co2"])


def _under_rules(trainer: Trainer, fn: Callable, rules=DEFAULT_RULES) -> Callable:
    """Trace `fn` with the logical-axis rules active so activations get constrained."""

    def wrapped(*args: Any):
        with use_rules(trainer.mesh, rules), use_impl(trainer.cfg.parallel.sequence_impl):
            return fn(*args)

    wrapped.lower = lambda *a: _lower(trainer, fn, *a, rules=rules)  # type: ignore[attr-defined]
    return wrapped


def _lower(trainer: Trainer, fn, *args, rules=DEFAULT_RULES):
    with use_rules(trainer.mesh, rules), use_impl(trainer.cfg.parallel.sequence_impl):
        return fn.lower(*args)
