"""Ahead-of-time compiles for TPU topologies from this CPU host (marker `tpu_aot`, needs
libtpu): Mosaic accepts the FP8 GEMM kernel on v5e, v5p and v6e, and a small preset's train
step with `precision.fp8=current|blockwise precision.fp8_impl=pallas` compiles (on an fsdp ×
tensor mesh, so the kernels sit in shard_maps, split over tokens and weight columns) with the
kernel in it."""

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import topologies

from jaxllm import compile as aot
from jaxllm import config
from kernels_pallas.fp8_matmul import fp8_matmul, tpu

needs_libtpu = pytest.mark.skipif(
    not aot.tpu_available(), reason="needs libtpu (pip install .[tpu])"
)

SMALL = ["model.n_layers=2", "model.d_model=128", "model.n_heads=4", "model.d_ff=256",
         "data.batch_size=8", "data.seq_len=128"]  # fmt: skip


@pytest.mark.tpu_aot
@needs_libtpu
@pytest.mark.parametrize("topology", ["v5e:2x2", "v5p:2x2x1", "v6e:2x2"])
@pytest.mark.parametrize("scales", ["tensor", "block"])
def test_kernel_compiles_for_tpu(topology, scales):
    device = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    m, k, n = 1024, 2048, 1024

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    sa, sb = ((), ()) if scales == "tensor" else ((m, k // 128), (k // 128, n // 128))
    args = (spec((m, k), jnp.float8_e4m3fn), spec((k, n), jnp.float8_e5m2),
            spec(sa, jnp.float32), spec(sb, jnp.float32))  # fmt: skip
    # the generation's default blocks (an AOT trace on the CPU cannot pick them itself)
    bm, bn, bk = tpu.DEFAULT_BLOCKS[topology.split(":")[0]]
    f = jax.jit(lambda *x: fp8_matmul(*x, block_m=bm, block_n=bn, block_k=bk))
    compiled = f.trace(*args).lower().compile()
    assert "tpu_custom_call" in compiled.as_text()


@pytest.mark.tpu_aot
@needs_libtpu
@pytest.mark.parametrize("mode", ["current", "blockwise"])
def test_train_step_with_the_kernel_compiles_for_v5e(mode, monkeypatch):
    lowered_text = []
    make = aot.make_train_step

    def recording_make_train_step(trainer):
        step = make(trainer)

        class Recording:
            def lower(self, *args):
                lowered = step.lower(*args)
                lowered_text.append(lowered.as_text())
                return lowered

        return Recording()

    monkeypatch.setattr(aot, "make_train_step", recording_make_train_step)
    overrides = [
        *SMALL,
        "parallel.mesh.fsdp=2",
        "parallel.mesh.tensor=2",
        f"precision.fp8={mode}",
        "precision.fp8_impl=pallas",
    ]
    cfg = config.load("default", overrides)
    report = aot.compile_for(cfg, aot.parse_topology("v5e:2x2"))
    assert report.fits and report.flops_per_chip > 0
    # 2 layers × (q, k, v, o, gate, up, down) × (forward, dX, dW) Mosaic GEMMs
    assert lowered_text[0].count("tpu_custom_call") >= 2 * 7 * 3
