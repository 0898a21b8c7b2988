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

from jaxllm.parallel.rules import use_rules
from jaxllm.training.state import Trainer, TrainState

Batch = dict[str, jax.Array]  # inputs, targets, segment_ids, positions [B, T] int32; loss_mask f32


def cross_entropy(
    logits_BTV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array, z_loss: float = 0.0
) -> tuple[jax.Array, jax.Array]:
    """(sum of masked token losses, sum of masked log(Z)²), in float32."""
    logits = logits_BTV.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]
    nll = (log_z - target_logit) * mask_BT
    z = jnp.square(log_z) * mask_BT
    return jnp.sum(nll) + z_loss * jnp.sum(z), jnp.sum(z)


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


def _forward_loss(trainer: Trainer, params: dict, mb: Batch):
    """(objective, sums) for one micro-batch, all summed over its tokens.

    objective = NLL + z_loss · log(Z)² + aux; `sums` = {"nll", "z", "aux"} token sums and
    `metrics`, the layers' own (averaged over layers).
    """
    model = trainer.model.merge(params)
    logits = model(mb["inputs"], positions_BT=mb["positions"], segment_ids_BT=mb["segment_ids"])
    total, z = cross_entropy(logits, mb["targets"], mb["loss_mask"], trainer.cfg.train.z_loss)
    aux, layer_metrics = collect_sown(model)
    # Auxiliary losses are per-token means: weight them by this micro-batch's tokens so the
    # final division by the global token count averages them like the main loss.
    aux_sum = aux * jnp.sum(mb["loss_mask"])
    nll = total - trainer.cfg.train.z_loss * z
    return total + aux_sum, ({"nll": nll, "z": z, "aux": aux_sum}, layer_metrics)


def make_train_step(trainer: Trainer) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """`step(state, batch) -> (state, metrics)`, jitted and donating `state`.

    The loss is the mean over every unmasked target token of the global batch, however the
    batch is split into `train.microbatches` (token sums are accumulated, then divided once).
    """
    cfg = trainer.cfg
    n_micro = cfg.train.microbatches
    grad_fn = jax.value_and_grad(lambda p, mb: _forward_loss(trainer, p, mb), has_aux=True)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        params = state["params"]
        n_tokens = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
        if n_micro == 1:
            (_, (sums, layer_metrics)), grads = grad_fn(params, batch)
        else:
            micro = jax.tree.map(lambda x: x.reshape(n_micro, -1, *x.shape[1:]), batch)

            def body(carry, mb):
                g_acc, s_acc = carry
                (_, (s, lm)), g = grad_fn(params, mb)
                g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
                return (g_acc, jax.tree.map(jnp.add, s_acc, s)), lm

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
            sums0 = {k: jnp.zeros((), jnp.float32) for k in ("nll", "z", "aux")}
            (grads, sums), lms = jax.lax.scan(body, (zeros, sums0), micro)
            layer_metrics = jax.tree.map(lambda x: jnp.mean(x, axis=0), lms)
        grads = jax.tree.map(lambda g: g / n_tokens, grads)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = trainer.tx.update(grads, state["opt_state"], params)
        new_state = {
            "step": state["step"] + 1,
            "params": optax.apply_updates(params, updates),
            "opt_state": opt_state,
        }
        metrics = {
            **layer_metrics,
            "loss": sums["nll"] / n_tokens,
            "z_loss": sums["z"] / n_tokens,
            "aux_loss": sums["aux"] / n_tokens,
            "grad_norm": grad_norm,
            "lr": trainer.schedule(state["step"]),
            "tokens": n_tokens,
        }
        return new_state, metrics

    replicated = NamedSharding(trainer.mesh, PartitionSpec())
    jitted = jax.jit(
        step,
        in_shardings=(trainer.state_shardings, trainer.batch_sharding),
        out_shardings=(trainer.state_shardings, replicated),
        donate_argnums=0,
    )
    return _under_rules(trainer, jitted)


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


def _under_rules(trainer: Trainer, fn: Callable) -> Callable:
    """Trace `fn` with the logical-axis rules active so activations get constrained."""

    def wrapped(*args: Any):
        with use_rules(trainer.mesh):
            return fn(*args)

    wrapped.lower = lambda *a: _lower(trainer, fn, *a)  # type: ignore[attr-defined]
    return wrapped


def _lower(trainer: Trainer, fn, *args):
    with use_rules(trainer.mesh):
        return fn.lower(*args)
