"""The device mesh, the logical-axis rules and every `shard_map` of jaxllm."""
