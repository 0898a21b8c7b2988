"""Output shapes for `pallas_call` under `shard_map(check_vma=True)`."""

import jax


def out_shape(shape, dtype, *inputs) -> jax.ShapeDtypeStruct:
    """A `pallas_call` output that varies over every manual mesh axis any input varies over.

    Under `shard_map` with check_vma a `pallas_call` cannot infer this and must be told; outside
    any `shard_map` the set is empty and this is a plain ShapeDtypeStruct.
    """
    varying = frozenset().union(*(jax.typeof(x).manual_axis_type.varying for x in inputs))
    vma = jax.sharding.ManualAxisType(varying=varying)
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=vma)
