"""The linear mixers' path selector (`jaxllm.layers.linear_paths.linear_mix`): which path runs
for each kind, and that the mixer's impl reaches the op on every path (sequence parallel
included). Traced only (`jax.make_jaxpr` / `eval_shape`) where the path is the property, run
for decode. Tolerance: float32 ratio 1e-5 (tests/helpers.assert_close)."""

import jax
import jax.numpy as jnp
import pytest

from jaxllm.layers.linear_paths import linear_mix
from jaxllm.parallel.core.mesh import make_mesh
from jaxllm.parallel.core.rules import use_rules
from tests.helpers import assert_close

B, T, H, K, V = 2, 8, 2, 4, 3


def _inputs(kind):
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k = (jax.random.normal(keys[i], (B, T, H, K)) for i in range(2))
    v = jax.random.normal(keys[2], (B, T, H, V))
    if kind == "gla":
        decay = jax.nn.log_sigmoid(jax.random.normal(keys[3], (B, T, H, K)))
    else:
        decay = jnp.array([-0.5, -0.1])
    return q, k, v, decay


@pytest.mark.parametrize("kind", ["lightning", "gla"])
def test_sequence_parallel_path_passes_the_impl_to_the_op(kind):
    """Under a `sequence` mesh the selector takes LASP (an all-gather) and the shards' op gets
    the mixer's impl: an unknown one is rejected by the op, a known one traces."""
    q, k, v, decay = _inputs(kind)

    def run(impl):
        return lambda *qkvd: linear_mix(
            kind, *qkvd, segment_ids_BT=None, cache=None, chunk_size=4, impl=impl
        )[0]

    with use_rules(make_mesh({"data": 4, "sequence": 2})):
        assert "all_gather" in str(jax.make_jaxpr(run("reference"))(q, k, v, decay))
        with pytest.raises(ValueError, match="impl must be one of"):
            jax.eval_shape(run("triton"), q, k, v, decay)


@pytest.mark.parametrize("kind", ["lightning", "gla"])
def test_decode_path_continues_the_prefill(kind):
    """A prefill of T−1 tokens then one decoded token (the step, packed ids given or not)
    equal the op over T tokens; the cache's end counts the tokens."""
    q, k, v, decay = _inputs(kind)
    seg = jnp.zeros((B, T), jnp.int32)
    kw = dict(chunk_size=4, impl="xla")
    cache = {"state": jnp.zeros((B, H, K, V), jnp.float32), "end": jnp.zeros((), jnp.int32)}
    want, _ = linear_mix(kind, q, k, v, decay, segment_ids_BT=None, cache=None, **kw)
    head = lambda x: x[:, : T - 1] if x.ndim == 4 else x
    tail = lambda x: x[:, T - 1 :] if x.ndim == 4 else x
    o_a, cache = linear_mix(kind, *map(head, (q, k, v, decay)), segment_ids_BT=None,
                            cache=cache, **kw)  # fmt: skip
    o_b, cache = linear_mix(kind, *map(tail, (q, k, v, decay)), segment_ids_BT=seg[:, -1:],
                            cache=cache, **kw)  # fmt: skip
    assert int(cache["end"]) == T
    assert_close("o", want, jnp.concatenate([o_a, o_b], axis=1), 1e-5)
