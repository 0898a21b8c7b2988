"""Scaling laws with their papers' constants, and a power-law fitter (NumPy only).

- :mod:`~jaxllm.scaling.fp_quant`: FP quantization training ("Capybara", arXiv 2501.02423).
- :mod:`~jaxllm.scaling.surge`: optimal LR against batch size for Adam (arXiv 2405.14578).
- :mod:`~jaxllm.scaling.batch_size`: batch-size laws at fixed compute / data (arXiv 2412.01505).
- :mod:`~jaxllm.scaling.linear_complexity`: TNL/HGRN2/cosFormer2/LLaMA laws (arXiv 2406.16690).
- :mod:`~jaxllm.scaling.fit`: ``y = a·x^b (+ c)`` fitting.

``python -m jaxllm.scaling eval|fit`` evaluates a law or fits a CSV from the command line.
"""

from jaxllm.scaling.batch_size import (
    batch_size_fixed_compute,
    batch_size_fixed_data,
    fixed_compute_allocation,
    lr_for_batch_size,
)
from jaxllm.scaling.fit import PowerLawFit, fit_power_law, golden_section_minimize
from jaxllm.scaling.fp_quant import (
    CAPYBARA,
    LOG2_BLOCK_CHANNEL,
    FPQuantLaw,
    PrecisionOptimum,
    critical_data_size,
    fp_quant_bf16_loss,
    fp_quant_loss,
    optimal_exmy,
    optimal_exmy_continuous,
    optimal_precision,
    optimal_precision_fixed_data,
    optimal_precision_fixed_params,
)
from jaxllm.scaling.linear_complexity import (
    LINEAR_COMPLEXITY_LAWS,
    LinearComplexityLaw,
    flops_to_pflops_days,
    linear_complexity_loss,
    linear_complexity_optimal_params,
    linear_complexity_optimal_tokens,
    linear_complexity_param_count,
)
from jaxllm.scaling.surge import (
    BNoiseFit,
    SurgeFit,
    fit_b_noise,
    fit_surge,
    kaplan_critical_batch_size,
    sgd_optimal_lr,
    steps_and_examples,
    surge_lr_max,
    surge_optimal_lr,
)

__all__ = [
    "CAPYBARA",
    "LINEAR_COMPLEXITY_LAWS",
    "LOG2_BLOCK_CHANNEL",
    "BNoiseFit",
    "FPQuantLaw",
    "LinearComplexityLaw",
    "PowerLawFit",
    "PrecisionOptimum",
    "SurgeFit",
    "batch_size_fixed_compute",
    "batch_size_fixed_data",
    "critical_data_size",
    "fit_b_noise",
    "fit_power_law",
    "fit_surge",
    "fixed_compute_allocation",
    "flops_to_pflops_days",
    "fp_quant_bf16_loss",
    "fp_quant_loss",
    "golden_section_minimize",
    "kaplan_critical_batch_size",
    "linear_complexity_loss",
    "linear_complexity_optimal_params",
    "linear_complexity_optimal_tokens",
    "linear_complexity_param_count",
    "lr_for_batch_size",
    "optimal_exmy",
    "optimal_exmy_continuous",
    "optimal_precision",
    "optimal_precision_fixed_data",
    "optimal_precision_fixed_params",
    "sgd_optimal_lr",
    "steps_and_examples",
    "surge_lr_max",
    "surge_optimal_lr",
]
