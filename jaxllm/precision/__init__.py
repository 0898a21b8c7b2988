"""Low precision: ExMy fake quantization for precision studies and scaled FP8 projections.

`project(x, w, eq)` is the one entry every dense projection goes through (`project_ragged`
for the MoE experts' grouped GEMM); `use_precision` picks its precision while a forward pass
is traced. FP8-LM's data-parallel gradient all-reduce is a parallel strategy:
`jaxllm.parallel.fp8_allreduce`. Imports jax and `jaxllm.parallel.core` only (never jaxllm
layers, models or training).
"""

from jaxllm.precision.context import (
    GEMM_INPUTS,
    PrecisionSpec,
    active_spec,
    current_scaling,
    exmy_einsum,
    project,
    project_ragged,
    record_delayed_keys,
    scanned_state,
    scanned_unit,
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
    "active_spec",
    "current_scaling",
    "exmy_einsum",
    "exmy_max",
    "fp8_einsum_blockwise",
    "fp8_einsum_current",
    "fp8_einsum_delayed",
    "fp8_lm",
    "init_delayed_entry",
    "parse_exmy",
    "project",
    "project_ragged",
    "quantize_exmy",
    "quantize_exmy_reference",
    "record_delayed_keys",
    "round_to_exmy",
    "scanned_state",
    "scanned_unit",
    "train_state_bytes_per_param",
    "update_delayed_state",
    "use_precision",
]
