"""Pure functions on arrays; each has a `*_reference` beside its fast paths."""

from jaxllm.ops.attention import attention, attention_reference

__all__ = ["attention", "attention_reference"]
