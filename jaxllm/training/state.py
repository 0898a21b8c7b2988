"""The train state as plain pytrees, its shardings, and sharded initialisation.

The model is split once (`nnx.split`): the graph definition stays static and the parameters
travel as a nested dict of arrays, so the optimizer state, the checkpoint and the shardings
are all plain pytrees. `Model.merge(params)` rebuilds the NNX module inside traced code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxllm import models
from jaxllm.config import Config, ConfigError
from jaxllm.models.scan import LAYERS_AXIS
from jaxllm.optim import build_optimizer
from jaxllm.optim import co2 as co2_lib
from jaxllm.parallel.core.rules import sharding_for
from jaxllm.parallel.fp8_allreduce import MU_INIT
from jaxllm.precision import PrecisionSpec, record_delayed_keys
from jaxllm.precision.fp8_optim import fp8_lm

TrainState = dict[str, Any]  # {"step": int32[], "params": {...}, "opt_state": optax state}
# With optim.co2: "opt_state" has a leading replica axis and "co2" holds the outer state.
# With the FP8 all-reduce: "fp8_comm" = {"mu": float32[]}, its automatic scaling factor.


@dataclass
class Model:
    """The static half of a split NNX model; `merge` takes the dynamic half as a pure dict."""

    graphdef: Any
    treedef: Any  # of the nnx.State holding every parameter
    axes: dict  # logical axis names per parameter, same structure as the params dict
    abstract_params: dict

    @classmethod
    def create(cls, cfg: Config) -> Model:
        abstract = nnx.eval_shape(lambda: models.build(cfg.model, nnx.Rngs(params=0)))
        graphdef, state, rest = nnx.split(abstract, nnx.Param, ...)
        if jax.tree.leaves(rest):
            raise AssertionError("the model holds state other than parameters")
        is_var = lambda x: isinstance(x, nnx.Variable)
        axes = nnx.to_pure_dict(
            jax.tree.map(lambda v: v.get_metadata().get("axes"), state, is_leaf=is_var)
        )
        abstract_params = nnx.to_pure_dict(state)
        treedef = jax.tree.structure(state)
        return cls(graphdef, treedef, _keep_tuples(axes, abstract_params), abstract_params)

    def merge(self, params: dict) -> nnx.Module:
        # nnx.State and the pure dict flatten in the same (sorted-key) order.
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, jax.tree.leaves(params)))


def _keep_tuples(axes: Any, like: dict) -> dict:
    """`to_pure_dict` leaves tuples of names intact; map them onto the params' structure."""
    return jax.tree.map(lambda _, a: a, like, axes, is_leaf=lambda x: isinstance(x, tuple))


@dataclass
class Trainer:
    """Everything static about a run's state: the model split, the optimizer, the shardings."""

    cfg: Config
    mesh: Mesh
    model: Model
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    state_shardings: Any
    batch_sharding: NamedSharding
    replicas: int = 1  # CO2: data-parallel replicas with their own local parameters
    steps_per_call: int = 1  # CO2: one call of the train step runs a round of τ steps
    round_sharding: NamedSharding | None = None  # CO2: of the train step's [τ, B, T] batches
    fp8_allreduce: bool = False  # gradients reduced over `data` in FP8 (`uses_fp8_allreduce`)

    @property
    def train_batch_sharding(self) -> NamedSharding:
        return self.round_sharding or self.batch_sharding

    @classmethod
    def create(cls, cfg: Config, mesh: Mesh) -> Trainer:
        model = Model.create(cfg)
        stacked = jax.tree.map(
            lambda a: a[:1] == (LAYERS_AXIS,), model.axes, is_leaf=lambda x: isinstance(x, tuple)
        )
        tx, schedule = build_optimizer(cfg.optim, cfg.train.steps, stacked)
        fp8_allreduce = uses_fp8_allreduce(cfg, mesh)
        if cfg.precision.fp8 != "none":
            # FP8-LM O1 / O2: FP8 gradients (and, O2, FP8 / 16-bit optimizer moments); the FP8
            # all-reduce, when it runs, already hands over FP8 gradients
            tx = fp8_lm(tx, cfg.precision.fp8_level, grads_in_fp8=fp8_allreduce)
        param_shardings = jax.tree.map(
            lambda a, x: sharding_for(a, x.shape, mesh),
            model.axes,
            model.abstract_params,
            is_leaf=lambda x: isinstance(x, tuple),
        )
        abstract_opt = jax.eval_shape(tx.init, model.abstract_params)
        opt_shardings = _mirror_shardings(
            abstract_opt, model.abstract_params, param_shardings, mesh
        )
        if cfg.train.optimizer_offload:
            if cfg.optim.co2.enabled:
                raise ConfigError("train.optimizer_offload does not combine with optim.co2")
            # Angel-PTM: the state lives in pinned host memory between steps; the train step
            # streams it to the device for the update (jaxllm.training.step)
            opt_shardings = jax.tree.map(lambda s: s.with_memory_kind("pinned_host"), opt_shardings)
        replicated = NamedSharding(mesh, PartitionSpec())
        state_shardings = {
            "step": replicated,
            "params": param_shardings,
            "opt_state": opt_shardings,
        }
        if cfg.precision.fp8 == "delayed":
            fp8_state = jax.eval_shape(lambda: delayed_fp8_state(cfg, model))
            state_shardings["fp8_state"] = jax.tree.map(lambda _: replicated, fp8_state)
        if fp8_allreduce:
            state_shardings["fp8_comm"] = {"mu": replicated}
        batch_sharding = sharding_for(
            ("batch", "length"), (cfg.data.batch_size, cfg.data.seq_len), mesh
        )
        if not cfg.optim.co2.enabled:
            return cls(cfg, mesh, model, tx, schedule, state_shardings, batch_sharding,
                       fp8_allreduce=fp8_allreduce)  # fmt: skip
        # CO2: per-replica inner state and previous replicas, sharded over `data` (optim/co2.py).
        tau, replicas = cfg.optim.co2.local_steps, mesh.shape[co2_lib.REPLICA_AXIS]
        state_shardings["opt_state"] = co2_lib.per_replica_shardings(opt_shardings, mesh)
        state_shardings["co2"] = {
            "momentum": param_shardings,
            "prev_start": co2_lib.per_replica_shardings(param_shardings, mesh),
            "prev_local": co2_lib.per_replica_shardings(param_shardings, mesh),
        }
        round_sharding = NamedSharding(mesh, PartitionSpec(None, *batch_sharding.spec))
        return cls(
            cfg, mesh, model, tx, schedule, state_shardings, batch_sharding, replicas, tau,
            round_sharding,
        )  # fmt: skip

    def _fresh(self, params: dict) -> TrainState:
        state = {"step": jnp.zeros((), jnp.int32), "params": params}
        if self.cfg.precision.fp8 == "delayed":
            state["fp8_state"] = delayed_fp8_state(self.cfg, self.model)
        if self.fp8_allreduce:
            state["fp8_comm"] = {"mu": jnp.asarray(MU_INIT, jnp.float32)}
        if not self.cfg.optim.co2.enabled:
            return {**state, "opt_state": self.tx.init(params)}
        r = self.replicas
        local = jax.tree.map(lambda p: jnp.broadcast_to(p, (r, *p.shape)), params)
        opt_state = jax.vmap(self.tx.init)(local)
        return {**state, "opt_state": opt_state, "co2": co2_lib.init_co2_state(params, r)}

    def abstract_state(self) -> TrainState:
        def init():
            params = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), self.model.abstract_params)
            return self._fresh(params)

        shapes = jax.eval_shape(init)
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            shapes,
            self.state_shardings,
        )

    def init_state(self, seed: int) -> TrainState:
        """A fresh state, created directly in its shardings (no unsharded copy on one device)."""
        cfg_model = self.cfg.model

        def init():
            model = models.build(cfg_model, nnx.Rngs(params=seed))
            params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
            return self._fresh(params)

        return jax.jit(init, out_shardings=self.state_shardings)()

    def init_state_from(self, params: dict) -> TrainState:
        """A fresh state (step 0, new optimizer state) around given parameters, e.g. imported
        ones already placed in `state_shardings["params"]`."""
        return jax.jit(self._fresh, out_shardings=self.state_shardings)(params)


def uses_fp8_allreduce(cfg: Config, mesh: Mesh) -> bool:
    """Whether the train step reduces the gradients over `data` with FP8-LM's all-reduce
    (`jaxllm.parallel.fp8_allreduce`): FP8 training (levels O1 and O2) on more than one
    data-parallel replica, whatever the other axes: the model's own `shard_map`s (expert and
    sequence parallelism, the Pallas FP8 GEMM and lightning kernels) nest inside the step's
    per-replica one, over the axes other than `data` (`jaxllm.parallel.core.rules.map_mesh`). Not
    with CO2: there is no gradient all-reduce to replace, its replicas take τ local steps on
    their own parameters and exchange those (`jaxllm.optim.co2`), with GSPMD."""
    p = cfg.precision
    return p.fp8 != "none" and mesh.shape.get("data", 1) > 1 and not cfg.optim.co2.enabled


def delayed_fp8_state(cfg: Config, model: Model) -> dict:
    """Fresh delayed-scaling FP8 state (zero amax histories, unit scales) for every dense
    projection of the model, found by tracing its forward pass once, outside the mesh rules:
    the keys and shapes are those of every layout (under expert parallelism the experts take
    the single-device keys, see `jaxllm.layers.moe`), so the state is the same on any mesh."""

    def forward():
        params = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), model.abstract_params)
        model.merge(params)(jnp.zeros((1, min(cfg.data.seq_len, 8)), jnp.int32))

    return record_delayed_keys(PrecisionSpec.from_config(cfg.precision), forward)


def _mirror_shardings(abstract_opt: Any, abstract_params: dict, param_shardings: dict, mesh: Mesh):
    """Optimizer-state leaves that mirror a parameter (Adam's moments) take its sharding;
    everything else (step counts, scalars) is replicated."""
    by_shape_path: dict[tuple, NamedSharding] = {}
    for (path, leaf), sh in zip(
        jax.tree_util.tree_flatten_with_path(abstract_params)[0], jax.tree.leaves(param_shardings)
    ):
        by_shape_path[(_key(path), leaf.shape)] = sh
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(path, leaf):
        keys = _key(path)
        # The param path is a suffix of the optimizer-state path (state.mu.<param path>).
        for n in range(len(keys)):
            sh = by_shape_path.get((keys[n:], leaf.shape))
            if sh is not None:
                return sh
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_opt)


def _key(path) -> tuple:
    return tuple(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)
