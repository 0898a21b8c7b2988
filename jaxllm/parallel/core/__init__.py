"""The ground floor of `jaxllm.parallel`: the mesh, its axis names, the logical-axis rules, the
one per-device `shard_map` wrapper, TPU topologies and multi-host start-up. Imports only jax,
numpy and the standard library, so every other package (ops, precision, layers, training,
config) may import it; the strategies above it (`jaxllm.parallel.sequence`, `.expert`,
`.fp8_allreduce`) import the ops they distribute."""
