"""Batch-size scaling laws of Shuai et al., "Scaling Law for Language Models Training
Considering Batch Size" (Huawei Noah's Ark, arXiv 2412.01505; 125M–2.6B GPT-style models,
up to 300B tokens).

Two regimes:

- **fixed compute** ``C``: on the loss-optimal frontier ``N ∝ C^0.464``, ``D ∝ C^0.536``; in the
  FLOPs-efficient regime the steps ``S ∝ C^0.434`` and the batch ``B ∝ C^0.102`` (``S·B = D``,
  so the two exponents add to D's). Only exponents are known here, so these laws carry a
  tuned reference point ``(C_ref, value_ref)`` to another budget.
- **fixed data** ``D``: ``B_opt ≈ 3.24e3 · D^0.264`` tokens per batch (about 1.4M at 1e10).

The optimal learning rate grows as ``B^γ`` with ``γ`` between 0.75 and 1 in that paper.

Provenance: the paper's body was not accessible when this was written. The exponents come from a
secondary summary of it (sciencestack.ai), the fixed-data coefficient from third-party training
code that cites it. Every constant is an argument, so corrected values can be passed in.
"""

import numpy as np

__all__ = [
    "FIXED_COMPUTE_EXPONENTS",
    "FIXED_DATA_COEFFICIENT",
    "FIXED_DATA_EXPONENT",
    "batch_size_fixed_compute",
    "batch_size_fixed_data",
    "fixed_compute_allocation",
    "lr_for_batch_size",
]

# Secondary source (reference digest lowprec_optim.md §3, [S]): sciencestack.ai's summary of
# arXiv 2412.01505 gives N_opt ∝ C^0.464, D_opt ∝ C^0.536 (compute frontier) and, in the
# FLOPs-efficient regime, S_opt ∝ C^0.434, B_opt ∝ C^0.102. Unverified against the paper body;
# the pairs are at least consistent (0.464 + 0.536 = 1 for C ∝ N·D, 0.434 + 0.102 = 0.536 for
# D = S·B), which the tests check.
FIXED_COMPUTE_EXPONENTS = {
    "n_params": 0.464,
    "n_tokens": 0.536,
    "steps": 0.434,
    "batch_size": 0.102,
}
# Secondary source (digest §3, [S]): tokens per step = 3.24e3·D^0.264 as two independent
# third-party training codes write it, each citing arXiv 2412.01505 (one as its "Equation 5");
# the paper's own table was not readable here.
FIXED_DATA_COEFFICIENT = 3.24e3
FIXED_DATA_EXPONENT = 0.264


def batch_size_fixed_data(
    n_tokens, coefficient: float = FIXED_DATA_COEFFICIENT, exponent: float = FIXED_DATA_EXPONENT
):
    """Optimal batch size in tokens for a run of ``n_tokens`` tokens: ``coefficient·D^exponent``."""
    return coefficient * np.power(np.asarray(n_tokens, np.float64), exponent)


def fixed_compute_allocation(compute, ref_compute: float, **ref_values: float) -> dict:
    """Carries tuned values at ``ref_compute`` to ``compute`` with the fixed-compute exponents.

    Keyword arguments name the quantities to scale (``n_params``, ``n_tokens``, ``steps``,
    ``batch_size``) and give their values at ``ref_compute``; each scales as
    ``value_ref · (C/C_ref)^exponent``.
    """
    unknown = set(ref_values) - set(FIXED_COMPUTE_EXPONENTS)
    if unknown:
        raise ValueError(
            f"unknown quantities {sorted(unknown)}; choose from {sorted(FIXED_COMPUTE_EXPONENTS)}"
        )
    ratio = np.asarray(compute, np.float64) / ref_compute
    return {k: v * ratio ** FIXED_COMPUTE_EXPONENTS[k] for k, v in ref_values.items()}


def batch_size_fixed_compute(
    compute,
    ref_compute: float,
    ref_batch_size: float,
    exponent: float = FIXED_COMPUTE_EXPONENTS["batch_size"],
):
    """Optimal batch size at ``compute`` from one tuned at ``ref_compute``: ``∝ C^0.102``."""
    return ref_batch_size * np.power(np.asarray(compute, np.float64) / ref_compute, exponent)


def lr_for_batch_size(batch_size, ref_batch_size: float, ref_lr: float, gamma: float):
    """``lr = ref_lr · (B/B_ref)^γ``; the paper finds ``γ`` in [0.75, 1] (Adam, large batches)."""
    return ref_lr * np.power(np.asarray(batch_size, np.float64) / ref_batch_size, gamma)
