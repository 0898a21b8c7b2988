"""`precision.fp8_impl=pallas`: the projections' three FP8 GEMMs run in the Pallas kernel
(interpret mode on the CPU) on the same FP8 operands and scales as the XLA path, so forward
and gradients agree up to the summation order; a tiny model trains with it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxllm.parallel.core.mesh import make_mesh
from jaxllm.parallel.core.rules import use_rules
from jaxllm.precision import fp8 as fp8_lib
from jaxllm.precision import fp8_gemm
from tests.precision.test_fp8_training import _run


def _entry():
    scales = {"x": 100.0, "w": 900.0, "dy": 3000.0}
    return {r: {"history": jnp.zeros((4,)), "scale": jnp.float32(s)} for r, s in scales.items()}


MODES = {
    "current": lambda eq, x, w, impl: fp8_lib.fp8_einsum_current(eq, x, w, impl),
    "delayed": lambda eq, x, w, impl: fp8_lib.fp8_einsum_delayed(eq, x, w, _entry(), impl),
    "blockwise": lambda eq, x, w, impl: fp8_lib.fp8_einsum_blockwise(eq, x, w, 128, impl),
}


def _forward_and_grads(mode, eq, x, w, dy, impl):
    @jax.jit
    def f(x, w, dy):
        y, pull = jax.vjp(lambda a, b: MODES[mode](eq, a, b, impl), x, w)
        return (y, *pull(dy))

    return f(x, w, dy)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize(
    "eq,x_shape,w_shape",
    [
        ("BTD,DF->BTF", (2, 70, 160), (160, 200)),  # odd token count, K and N not 128-multiples
        ("BTHK,HKD->BTD", (1, 33, 3, 64), (3, 64, 96)),  # two contracted letters
    ],
)
def test_pallas_matches_xla(mode, eq, x_shape, w_shape):
    kx, kw, kd = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, x_shape)
    w = jax.random.normal(kw, w_shape) * 0.1
    dy = jax.random.normal(kd, jnp.einsum(eq, x, w).shape)
    want = _forward_and_grads(mode, eq, x, w, dy, "xla")
    got = _forward_and_grads(mode, eq, x, w, dy, "pallas")
    for g, r in zip(got, want, strict=True):
        assert g.shape == r.shape and g.dtype == r.dtype
        # float32 inputs: the same FP8 values and scales, only the order of the sum differs
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6 * float(jnp.abs(r).max()))


def _shard_maps(jaxpr) -> list:
    """The shard_map equations of a jaxpr, its sub-jaxprs (custom_vjp, pjit) included."""
    found = []
    for e in jaxpr.eqns:
        if e.primitive.name == "shard_map":
            found.append(e)
        for sub in jax.extend.core.jaxprs_in_params(e.params):
            found += _shard_maps(sub)
    return found


@pytest.mark.parametrize("w_spec", [(None, "tensor"), ("tensor", None)], ids=["column", "row"])
@pytest.mark.parametrize("mode", ["current", "blockwise"])
def test_pallas_on_a_mesh_matches_xla(mode, w_spec):
    """On a mesh the kernel runs in a shard_map: tokens split over data × fsdp (dW summed
    over them), the right operand's columns over tensor where they make 128-wide groups per
    shard (here the forward's and dW's 256, not dX's 128), whichever way the weight lies.
    256 tokens: blockwise's dW groups of 128 tokens split over data only."""
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, devices=jax.devices()[:8])
    kx, kw, kd = jax.random.split(jax.random.key(3), 3)
    tokens = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    x = jax.device_put(jax.random.normal(kx, (4, 64, 128)), tokens)
    w = jax.random.normal(kw, (128, 256)) * 0.1
    w = jax.device_put(w, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*w_spec)))
    dy = jax.device_put(jax.random.normal(kd, (4, 64, 256)), tokens)
    with use_rules(mesh):
        got = _forward_and_grads(mode, "BTD,DF->BTF", x, w, dy, "pallas")
        jaxpr = jax.make_jaxpr(lambda a, b: MODES[mode]("BTD,DF->BTF", a, b, "pallas"))(x, w)
    maps = _shard_maps(jaxpr.jaxpr)[0]
    assert maps.params["in_specs"][1] == P(None, "tensor")  # the weight's columns split
    assert maps.params["out_specs"] == (P(("data", "fsdp"), "tensor"),)
    want = _forward_and_grads(mode, "BTD,DF->BTF", x, w, dy, "xla")
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6 * float(jnp.abs(r).max()))


def test_pallas_matches_xla_in_bfloat16():
    kx, kw, kd = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, (2, 40, 128), jnp.bfloat16)
    w = (jax.random.normal(kw, (128, 256)) * 0.1).astype(jnp.bfloat16)
    dy = jax.random.normal(kd, (2, 40, 256), jnp.bfloat16)
    want = _forward_and_grads("current", "BTD,DF->BTF", x, w, dy, "xla")
    got = _forward_and_grads("current", "BTD,DF->BTF", x, w, dy, "pallas")
    for g, r in zip(got, want, strict=True):
        assert g.dtype == jnp.bfloat16
        g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
        np.testing.assert_allclose(g, r, rtol=2**-7, atol=2**-7 * np.abs(r).max())


@pytest.mark.parametrize(
    "eq,planned",
    [
        ("BTD,DHK->BTHK", True),
        ("BTHK,HKD->BTD", True),
        ("ECD,EDF->ECF", False),  # a batch letter (per-expert weights)
        ("BTD,FD->BTF", True),
        ("BTD,DF->BFT", False),  # output not M then N
        ("BTD,D->BT", False),  # no N: a matrix-vector product
    ],
)
def test_which_projections_have_a_2d_plan(eq, planned):
    assert (fp8_gemm.plan(eq) is not None) == planned


def test_unplanned_projection_falls_back_to_xla():
    kx, kw, kd = jax.random.split(jax.random.key(2), 3)
    x, w = jax.random.normal(kx, (2, 16, 32)), jax.random.normal(kw, (2, 32, 48))
    dy = jax.random.normal(kd, (2, 16, 48))
    eq = "ECD,EDF->ECF"
    for mode in MODES:
        want = _forward_and_grads(mode, eq, x, w, dy, "xla")
        got = _forward_and_grads(mode, eq, x, w, dy, "pallas")
        for g, r in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, r)


def test_unknown_impl_is_rejected():
    with pytest.raises(ValueError, match="fp8 impl"):
        fp8_lib.fp8_einsum_current("BTD,DF->BTF", jnp.ones((1, 2, 4)), jnp.ones((4, 8)), "cuda")


@pytest.mark.slow
def test_tiny_model_trains_with_the_pallas_kernel():
    steps = 4
    ref, _, _ = _run("precision.fp8=current", steps=steps)
    losses, _, trainer = _run("precision.fp8=current", "precision.fp8_impl=pallas", steps=steps)
    assert trainer.cfg.precision.fp8_impl == "pallas"
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    # the same FP8 GEMMs up to the summation order, so the same curve up to bf16 noise
    np.testing.assert_allclose(losses, ref, rtol=1e-2)
