"""Host offload: MEMO's token split recomputes only the un-offloaded tokens; the optimizer
state in pinned host memory (train.optimizer_offload) trains the same and leaves the device."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm import compile as aot
from jaxllm import config, models
from jaxllm.training.loop import train
from jaxllm.training.remat import block_remat
from tests.helpers import tiny


def test_token_split_recomputes_only_the_rest():
    """With α the backward replays the projections of the last (1-α)·T tokens only, so the
    step's FLOPs fall with α (replaying whole projections and slicing would not)."""
    cfg = tiny("model.n_layers=1", "model.d_ff=96")
    graphdef, params = nnx.split(models.build(cfg.model, 0), nnx.Param)
    tokens = jnp.zeros((2, 40), jnp.int32)

    def flops(policy, fraction):
        def loss(p):
            return jnp.mean(nnx.merge(graphdef, p)(tokens, remat=block_remat(policy, fraction)))

        return jax.jit(jax.grad(loss)).lower(params).compile().cost_analysis()["flops"]

    by_alpha = [flops("offload", a) for a in (0.0, 0.25, 0.5, 1.0)]
    assert all(a > b for a, b in itertools.pairwise(by_alpha)), by_alpha
    # α = 1 saves every skeletal activation: no more than a step without checkpointing
    # (plus the attention replay its backward needs anyway)
    assert by_alpha[-1] < flops("full", 0.0)


def test_optimizer_offload_trains_identically(tmp_path):
    common = ["train.steps=3", "logging.every=1", "train.eval_every=0", "checkpoint.every=0"]
    a = train(tiny(*common, f"train.run_dir={tmp_path / 'a'}"))
    b = train(tiny(*common, "train.optimizer_offload=true", f"train.run_dir={tmp_path / 'b'}"))
    la = [r["loss"] for r in a["records"] if "loss" in r]
    lb = [r["loss"] for r in b["records"] if "loss" in r]
    assert len(la) == 3
    np.testing.assert_array_equal(la, lb)


def test_optimizer_offload_rejects_co2():
    from jaxllm.parallel.core.mesh import make_mesh
    from jaxllm.training.state import Trainer

    cfg = tiny(
        "train.optimizer_offload=true",
        "optim.co2.enabled=true",
        "optim.co2.local_steps=2",
        "train.steps=4",
    )
    with pytest.raises(config.ConfigError, match="optimizer_offload"):
        Trainer.create(cfg, make_mesh(cfg.parallel.mesh.resolve(len(jax.devices()))))


SMALL = ["model.n_layers=2", "model.d_model=256", "model.n_heads=4", "model.d_ff=512",
         "data.batch_size=8", "data.seq_len=256", "parallel.mesh.fsdp=4"]  # fmt: skip
tpu = pytest.mark.skipif(not aot.tpu_available(), reason="needs libtpu (pip install .[tpu])")


@pytest.mark.tpu_aot
@tpu
def test_tpu_optimizer_state_leaves_the_device():
    topo = aot.parse_topology("v5p:2x2x1")
    base = aot.compile_for(config.load("default", SMALL), topo)
    off = aot.compile_for(config.load("default", [*SMALL, "train.optimizer_offload=true"]), topo)
    # the device arguments shrink by exactly what now lives on the host: Adam's two float32
    # moments, twice the float32 parameters (~2/3 of the state; the batch is small here)
    assert base.host_argument_bytes == 0
    assert base.argument_bytes - off.argument_bytes == off.host_argument_bytes
    assert off.host_argument_bytes > 0.6 * base.argument_bytes


@pytest.mark.tpu_aot
@tpu
def test_tpu_offload_policy_uses_host_memory():
    topo = aot.parse_topology("v5p:2x2x1")
    full = aot.compile_for(config.load("default", [*SMALL, "train.remat=full"]), topo)
    off = aot.compile_for(config.load("default", [*SMALL, "train.remat=offload"]), topo)
    assert full.host_temp_bytes == 0
    # per chip: 2 layers x (layer input + attention output), [2, 256, 256] bf16 each
    assert off.host_temp_bytes >= 2 * 2 * (2 * 256 * 256 * 2)


@pytest.mark.tpu_aot
@tpu
def test_tpu_scanned_offload_frees_the_layer_inputs():
    """Under `model.scan_layers` the offloaded activations live in pinned host memory for the
    whole step: the device keeps less than full remat, which keeps the stacked layer inputs
    (issue 10's claim; benchmarks/memory.py measures it on tnl-7b)."""
    topo = aot.parse_topology("v5p:2x2x1")
    layers, t = 4, 4096
    # impl=xla: with splash (auto on TPU) XLA peels the layer loop and reports 12 stacked
    # [T, D] host buffers instead of 8, the same two tensors offloaded
    small = [*SMALL, f"model.n_layers={layers}", "data.batch_size=4", f"data.seq_len={t}",
             f"model.max_seq_len={t}", "model.scan_layers=true",
             "model.mixers.softmax.impl=xla"]  # fmt: skip
    full = aot.compile_for(config.load("default", [*small, "train.remat=full"]), topo)
    off = aot.compile_for(config.load("default", [*small, "train.remat=offload"]), topo)
    per_layer = t * 256 * 4  # one sequence per chip, [T, D] float32 (the default dtype)
    # layer input + attention output of every layer, stacked by the scan on the host
    assert off.host_temp_bytes == layers * 2 * per_layer
    # and the device no longer holds the stacked layer inputs full remat keeps
    assert full.temp_bytes - off.temp_bytes > 0.9 * layers * per_layer
