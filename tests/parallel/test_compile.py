"""`python -m jaxllm.compile`: topology names, exit codes, and real ahead-of-time compiles of a
small preset from this CPU host: for TPU slices (marker `tpu_aot`, needs libtpu) and NVIDIA GPUs
(marker `gpu_aot`, needs jax's CUDA plugin)."""

import jax
import jax.numpy as jnp
import pytest

from jaxllm import compile as aot
from jaxllm import config
from jaxllm.compile import GiB, Topology, parse_topology

SMALL = ["model.n_layers=2", "model.d_model=128", "model.n_heads=4", "model.d_ff=256",
         "data.batch_size=8", "data.seq_len=128"]  # fmt: skip


@pytest.mark.parametrize(
    "name,jax_name,chips",
    [
        ("v5e-16", "v5e:4x4", 16),
        ("v5e-32", "v5e:4x8", 32),
        ("v6e-256", "v6e:16x16", 256),
        ("v5p-128", "v5p:4x4x4", 64),  # Cloud v5p names count TensorCores, 2 per chip
        ("v5p-1024", "v5p:8x8x8", 512),
        ("v5e:2x2", "v5e:2x2", 4),
        ("v5p:2x2x1", "v5p:2x2x1", 4),
        ("h200", "h200-1", 1),
        ("H100-8", "h100-8", 8),
        ("h200-32", "h200-32", 32),  # 4 hosts of 8
    ],
)
def test_parse_topology(name, jax_name, chips):
    topo = parse_topology(name)
    assert (topo.jax_name, topo.chips) == (jax_name, chips)


@pytest.mark.parametrize(
    "name",
    ["v5e", "v9x-16", "v5e-12", "v5p-7", "v5e:4x4x4", "v5p:2x2", "h200-0", "h200-12", "h300"],
)
def test_bad_topology(name):
    with pytest.raises(aot.TopologyError):
        parse_topology(name)


@pytest.mark.parametrize(
    "argv",
    [
        ["default", "--topology", "v5e-99"],
        ["no-such-preset", "--topology", "v5e-16"],
        ["default", "--topology", "v5e-16", "model.no_such_key=1"],
        ["default"],
        ["default", "--topology", "v5e-16", "--bogus"],
    ],
)
def test_usage_errors_exit_2(argv, capsys):
    assert aot.main(argv) == 2
    assert "error" in capsys.readouterr().err


def test_report_fit_threshold():
    topo = Topology("v5e", (2, 2))
    r = aot.Report(topo, {"data": 4}, 10 * GiB, 10 * GiB, 10 * GiB, 5 * GiB, 0, 1e12)
    assert r.total_bytes == 15 * GiB and r.fits  # donated outputs alias the arguments
    r.temp_bytes = 7 * GiB
    assert not r.fits and "DOES NOT FIT" in r.lines()[-1]


def test_loop_aware_flops_counts_every_iteration():
    """Nested scans (3 outer x 5 inner matmuls): XLA's cost analysis counts each body once,
    loop_aware_flops counts 15 matmuls (+ the tanh and loop counters, < 0.1 %)."""

    def f(x, w):
        def outer(c, _):
            return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), c, w)[0], None

        return jax.lax.scan(outer, x, None, length=3)[0]

    x = jax.ShapeDtypeStruct((64, 128), jnp.float32)
    w = jax.ShapeDtypeStruct((5, 128, 128), jnp.float32)
    compiled = jax.jit(f).lower(x, w).compile()
    matmuls = 3 * 5 * 2 * 64 * 128 * 128
    flops, unknown = aot.loop_aware_flops(compiled.as_text())
    assert unknown == 0
    assert matmuls <= flops <= 1.001 * matmuls
    assert compiled.cost_analysis()["flops"] < matmuls / 10


tpu = pytest.mark.skipif(not aot.tpu_available(), reason="needs libtpu (pip install .[tpu])")


@pytest.mark.tpu_aot
@tpu
@pytest.mark.parametrize("topology", ["v5e:2x2", "v5p:2x2x1"])
def test_compile_small_preset(topology, capsys):
    assert aot.main(["default", "--topology", topology, "parallel.mesh.fsdp=2", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "'fsdp': 2" in out and "fits" in out and "flops/step" in out and "model" in out


@pytest.mark.tpu_aot
@tpu
def test_loop_aware_flops_counts_the_kernels_declared_flops():
    """XLA counts a Mosaic call as 0 FLOPs: megablox's grouped GEMM in a 3-step scan is
    counted by the FLOPs its CostEstimate declares (2·M·K·N for its static rows), per
    iteration; splash declares none and is reported as uncounted."""
    from jax.experimental import topologies

    from jaxllm.ops.attention_splash import splash_attention
    from jaxllm.precision.grouped_matmul import grouped_matmul

    chip = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices[0]
    one = jax.sharding.SingleDeviceSharding(chip)
    sds = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=one)
    m, k, n, e = 512, 256, 256, 4  # k = n: the scan carries the product

    def gmm(x, w, sizes):
        step = lambda c, _: (grouped_matmul(c, w, sizes, impl="megablox"), None)
        return jax.lax.scan(step, x, None, length=3)[0]

    args = (sds((m, k), jnp.bfloat16), sds((e, k, n), jnp.bfloat16), sds((e,), jnp.int32))
    text = jax.jit(gmm).lower(*args).compile().as_text()
    flops, unknown = aot.loop_aware_flops(text)
    gemms = 3 * 2 * m * k * n
    assert unknown == 0 and aot.kernels_without_flops(text) == 0
    assert gemms <= flops <= 1.01 * gemms, (flops, gemms)

    q = sds((1, 256, 2, 128), jnp.bfloat16)
    text = jax.jit(splash_attention).lower(q, q, q).compile().as_text()
    assert aot.kernels_without_flops(text) == 1


@pytest.mark.tpu_aot
@tpu
def test_compile_that_does_not_fit_exits_3(capsys):
    huge = [*SMALL[:-2], "model.vocab_size=2000000", "data.batch_size=64", "data.seq_len=2048",
            "model.max_seq_len=2048"]  # fmt: skip
    assert aot.main(["default", "--topology", "v5e:2x2", *huge]) == 3
    assert "DOES NOT FIT" in capsys.readouterr().out


# ------------------------------------------------------------------ NVIDIA GPUs, ahead of time

cuda = pytest.mark.skipif(not aot.cuda_available(), reason="needs jax's CUDA plugin (.[cuda])")
TRITON = 'custom_call_target="__gpu$xla.gpu.triton"'


@pytest.mark.gpu_aot
@cuda
@pytest.mark.parametrize(("topology", "mesh"), [("h200", []), ("h100-8", ["parallel.mesh.fsdp=8"])])
def test_compile_small_preset_for_gpus(topology, mesh, capsys):
    """One H200, and eight H100s with FSDP (NCCL collectives in the program)."""
    assert aot.main(["default", "--topology", topology, *mesh, *SMALL]) == 0
    out = capsys.readouterr().out
    assert f"on {parse_topology(topology).jax_name}" in out and "usable" in out and "fits" in out


@pytest.mark.gpu_aot
@cuda
@pytest.mark.parametrize("preset", ["tnl-tiny", "hgrn2-tiny"])
def test_linear_train_step_on_h200_runs_the_triton_kernels(preset):
    """impl="auto" lowered for CUDA: the packed lightning / GLA kernels, compiled by Triton for
    sm_90 (forward and both backward sweeps; the scanned layers share one body)."""
    cfg = config.load(preset, ["data.batch_size=2", "model.scan_layers=true"])
    lowered, _ = aot.lower_train_step(cfg, parse_topology("h200"))
    hlo = lowered.compile().as_text()
    assert hlo.count(TRITON) >= 3, hlo.count(TRITON)
