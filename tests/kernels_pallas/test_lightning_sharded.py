"""jaxllm.ops' lightning attention kernels on a mesh (8 virtual CPU devices): under `use_rules`
the Pallas call runs inside a `shard_map` (`kernel_per_device`), batch rows over data × fsdp,
heads over tensor, and equals the reference — output, final state and every gradient — for
the unpacked op and the packed one. Their TPU compile under a sharded mesh is in
test_lightning_aot.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxllm.ops.lightning_attention import lightning_attention, lightning_attention_reference
from jaxllm.ops.lightning_attention_packed import (
    lightning_attention_packed,
    lightning_attention_packed_reference,
)
from jaxllm.parallel.core.mesh import make_mesh
from jaxllm.parallel.core.rules import use_rules
from tests.helpers import assert_close
from tests.kernels_pallas.test_lightning_kernel import F32_RATIO, _inputs, _log_decay, _segments


def _op(packed, impl, g, seg):
    """fn(q, k, v, s0) → (o, final state) of the op, packed (with seg) or not."""

    def fn(q, k, v, s0):
        kw = dict(initial_state=s0, return_final_state=True)
        if packed:
            if impl == "reference":
                return lightning_attention_packed_reference(q, k, v, g, seg, **kw)
            return lightning_attention_packed(q, k, v, g, seg, impl=impl, **kw)
        if impl == "reference":
            return lightning_attention_reference(q, k, v, g, **kw)
        return lightning_attention(q, k, v, g, impl=impl, **kw)

    return fn


def _vjp(fn, q, k, v, s0, do, dsT):
    (o, sT), vjp = jax.vjp(fn, q, k, v, s0)
    return o, sT, vjp((do, dsT))


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("T", [70, 1])  # a prefill of odd length; one decode token
def test_kernel_on_a_mesh_matches_reference(packed, T):
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, devices=jax.devices()[:8])
    B, H, K, V = 4, 2, 32, 16
    q, k, v, s0, do, dsT = _inputs(B, T, H, K, V, jnp.float32)
    g = _log_decay("tnl", H)
    seg = jnp.asarray(np.stack([_segments(T, [20, 33], 7) if T > 40 else np.ones(T, np.int32)] * B))
    rows_heads = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor"))
    q, k, v, do = (jax.device_put(x, rows_heads) for x in (q, k, v, do))

    want = jax.jit(lambda *a: _vjp(_op(packed, "reference", g, seg), *a))(q, k, v, s0, do, dsT)
    with use_rules(mesh):
        fn = _op(packed, "pallas", g, seg)
        got = jax.jit(lambda *a: _vjp(fn, *a))(q, k, v, s0, do, dsT)
        jaxpr = str(jax.make_jaxpr(fn)(q, k, v, s0))
    assert "shard_map" in jaxpr and "pallas_call" in jaxpr
    names = ("o", "final state", "dq", "dk", "dv", "ds0")
    for name, w, x in zip(names, jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        assert_close(name, w, x, F32_RATIO)


def test_no_shard_map_without_a_mesh_or_inside_one():
    """Outside `use_rules` the kernel is called as it is; inside a shard_map that already made
    the axes manual (sequence parallelism) it is not wrapped a second time."""
    q, k, v, s0, *_ = _inputs(2, 8, 2, 32, 16, jnp.float32)
    fn = _op(False, "pallas", None, None)
    assert "shard_map" not in str(jax.make_jaxpr(fn)(q, k, v, s0))
    mesh = make_mesh({"data": 2}, devices=jax.devices()[:2])
    x, s = P("data"), P("data")
    inner = jax.shard_map(fn, mesh=mesh, in_specs=(x, x, x, s), out_specs=(x, s))
    with use_rules(mesh):
        assert str(jax.make_jaxpr(inner)(q, k, v, s0)).count("shard_map") == 1
