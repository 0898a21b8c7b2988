"""Low precision: ExMy fake quantization for precision studies and scaled FP8 projections.

`project(x, w, eq)` is the one entry every dense projection goes through; `use_precision`
picks its precision while a forward pass is traced. Imports jax only (never jaxllm layers,
models or training).
"""

from jaxllm.precision.context import (
    GEMM_INPUTS,
    PrecisionSpec,
    exmy_einsum,
    project,
    record_delayed_keys,
    use_precision,
)
from jaxllm.precision.exmy import (
    exmy_max,
    parse_exmy,
    quantize_exmy,
    quantize_exmy_reference,
    round_to_exmy,
)
from jaxllm.precision.fp8 import (
    fp8_einsum_blockwise,
    fp8_einsum_current,
    fp8_einsum_delayed,
    init_delayed_entry,
    update_delayed_state,
)
from jaxllm.precision.fp8_optim import fp8_lm, train_state_bytes_per_param

__all__ = [
    "GEMM_INPUTS",
    "PrecisionSpec",
    "exmy_einsum",
    "exmy_max",
    "fp8_einsum_blockwise",
    "fp8_einsum_current",
    "fp8_einsum_delayed",
    "fp8_lm",
    "init_delayed_entry",
    "parse_exmy",
    "project",
    "quantize_exmy",
    "quantize_exmy_reference",
    "record_delayed_keys",
    "round_to_exmy",
    "train_state_bytes_per_param",
    "update_delayed_state",
    "use_precision",
]
