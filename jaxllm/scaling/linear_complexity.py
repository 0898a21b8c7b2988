"""Scaling laws of linear-complexity language models, Shen et al., EMNLP 2024 (arXiv 2406.16690).

Each law is ``β_X · C^α_X`` against the training compute ``C`` in PFLOP/s-days (the unit of the
paper's Figure 1 axes; 1 PFLOP/s-day = 8.64e19 FLOPs), fitted on 70M–7B models trained up to
300B tokens (English:Chinese 2:1, tiktoken vocabulary 100,280, context 8192, 4M-token batches,
Adam lr 3e-4 with a constant schedule). ``N`` counts non-embedding parameters. The N and D
exponents were fitted separately and add up to more than 1, so the laws compare architectures
inside the fitted range (about 1e-2 to 1e3 PFLOP/s-days) rather than extrapolate far past it.
"""

import dataclasses

import numpy as np

__all__ = [
    "LINEAR_COMPLEXITY_LAWS",
    "PFLOPS_DAY",
    "LinearComplexityLaw",
    "flops_to_pflops_days",
    "linear_complexity_loss",
    "linear_complexity_optimal_params",
    "linear_complexity_optimal_tokens",
    "linear_complexity_param_count",
]

# The unit is inferred from the paper's figures (digest §9): the text does not state it. The
# test checks that it puts the paper's largest run (7B, 300B tokens) near every frontier.
PFLOPS_DAY = 1e15 * 86400.0


@dataclasses.dataclass(frozen=True)
class LinearComplexityLaw:
    """``L = loss_coef·C^loss_exp``, ``N_opt = n_coef·C^n_exp``, ``D_opt = d_coef·C^d_exp``."""

    loss_coef: float
    loss_exp: float
    n_coef: float
    n_exp: float
    d_coef: float
    d_exp: float


# Table 3 of arXiv 2406.16690 (digest lowprec_optim.md §9, [V]; the LLaMA and TNL rows reappear
# in MiniMax-01's Table 2 as softmax and lightning attention).
LINEAR_COMPLEXITY_LAWS = {
    "llama": LinearComplexityLaw(3.7087, -0.0798, 1.82e8, 0.7118, 2.56e10, 0.5102),
    "tnl": LinearComplexityLaw(3.5391, -0.0768, 2.74e8, 0.6470, 4.43e10, 0.4684),
    "hgrn2": LinearComplexityLaw(3.4788, -0.0753, 2.66e8, 0.6427, 4.80e10, 0.4500),
    "cosformer2": LinearComplexityLaw(3.5877, -0.0756, 2.65e8, 0.6516, 4.23e10, 0.4529),
}


def _law(arch: str) -> LinearComplexityLaw:
    try:
        return LINEAR_COMPLEXITY_LAWS[arch.lower()]
    except KeyError:
        raise ValueError(
            f"unknown architecture {arch!r}; choose from {sorted(LINEAR_COMPLEXITY_LAWS)}"
        ) from None


def flops_to_pflops_days(flops):
    """Converts FLOPs to PFLOP/s-days, the compute unit of these laws."""
    return np.asarray(flops, np.float64) / PFLOPS_DAY


def linear_complexity_loss(compute_pflops_days, arch: str):
    """Training loss at the compute-optimal frontier, ``β_L·C^α_L``."""
    law = _law(arch)
    return law.loss_coef * np.power(np.asarray(compute_pflops_days, np.float64), law.loss_exp)


def linear_complexity_optimal_params(compute_pflops_days, arch: str):
    """Compute-optimal non-embedding parameter count, ``β_N·C^α_N``."""
    law = _law(arch)
    return law.n_coef * np.power(np.asarray(compute_pflops_days, np.float64), law.n_exp)


def linear_complexity_optimal_tokens(compute_pflops_days, arch: str):
    """Compute-optimal training tokens, ``β_D·C^α_D``."""
    law = _law(arch)
    return law.d_coef * np.power(np.asarray(compute_pflops_days, np.float64), law.d_exp)


def linear_complexity_param_count(arch: str, n_layers: int, d_model: int, n_heads: int) -> float:
    """The paper's Table 1 non-embedding count ``N`` (GLU width 8/3·d, subleading terms dropped).

    LLaMA ``12ld²``; TNL ``12ld² + 2ld²/h``; HGRN2 ``12ld² + ld``; cosFormer2
    ``12ld² + 2ld²/h + d²/h``.
    """
    l, d, h = n_layers, d_model, n_heads
    base = 12.0 * l * d * d
    extra = {
        "llama": 0.0,
        "tnl": 2.0 * l * d * d / h,
        "hgrn2": float(l * d),
        "cosformer2": 2.0 * l * d * d / h + d * d / h,
    }
    _law(arch)
    return base + extra[arch.lower()]
