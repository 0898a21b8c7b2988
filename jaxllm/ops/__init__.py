"""Pure functions on arrays; each has a `*_reference` beside its fast paths."""

from jaxllm.ops.attention import attention, attention_reference
from jaxllm.ops.cog_attention import cog_attention, cog_attention_reference
from jaxllm.ops.gated_linear_attention import (
    gated_linear_attention,
    gated_linear_attention_reference,
    gated_linear_attention_step,
)
from jaxllm.ops.lightning_attention import (
    lightning_attention,
    lightning_attention_recurrent,
    lightning_attention_reference,
    lightning_attention_step,
)
from jaxllm.ops.lightning_attention_packed import (
    lightning_attention_packed,
    lightning_attention_packed_reference,
)

__all__ = [
    "attention",
    "attention_reference",
    "cog_attention",
    "cog_attention_reference",
    "gated_linear_attention",
    "gated_linear_attention_reference",
    "gated_linear_attention_step",
    "lightning_attention",
    "lightning_attention_packed",
    "lightning_attention_packed_reference",
    "lightning_attention_recurrent",
    "lightning_attention_reference",
    "lightning_attention_step",
]
