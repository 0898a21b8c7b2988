"""The surge phenomenon: optimal learning rate against batch size for Adam/sign-style optimizers.

Li et al., "Surge Phenomenon in Optimal Learning Rate and Batch Size Scaling", NeurIPS 2024
(arXiv 2405.14578). Under a sign-of-gradient model of Adam (valid while ``B ≪ πσ²/(2μ²)``):

    lr_opt(B) = lr_max / (½·(sqrt(B_noise/B) + sqrt(B/B_noise)))                 (Eq. 2)

which rises as ``sqrt(B)`` for ``B ≪ B_noise``, peaks at ``B = B_noise`` and then falls, unlike
the SGD rule ``lr_max / (1 + B_noise/B)`` (Eq. 1, McCandlish et al. 2018). ``B_noise`` is also the
balance point of the steps/examples trade-off ``(S/S_min - 1)(E/E_min - 1) = 1`` (Eq. 20), so it is
estimated from the steps ``S`` and examples ``E`` that runs at several batch sizes (each at its
best learning rate) need to reach one target loss: ``1/S = -B_noise/E + 1/S_min`` (Eq. 22), then
``lr_max = mean[(lr_opt/2)(sqrt(B_noise/B) + sqrt(B/B_noise))]`` (Eq. 23). For language models
``B`` counts tokens.
"""

import dataclasses
import math

import numpy as np

from jaxllm.scaling.fit import golden_section_minimize

__all__ = [
    "KAPLAN_ALPHA_B",
    "KAPLAN_B_STAR",
    "BNoiseFit",
    "SurgeFit",
    "fit_b_noise",
    "fit_surge",
    "kaplan_critical_batch_size",
    "sgd_optimal_lr",
    "steps_and_examples",
    "surge_lr_max",
    "surge_optimal_lr",
]

# Kaplan et al. 2020 (arXiv 2001.08361) Eq. 1.4: B_crit(L) = B*/L^(1/α_B), B* ≈ 2e8 tokens,
# α_B ≈ 0.21, L in nats (GPT-2 tokenizer on WebText2); the surge paper (§3.2, digest §2) suggests
# it as a cheap B_noise estimate. The digest marks these two constants as from memory [U]; they
# are Kaplan's published values as widely quoted, not re-read from the paper here.
KAPLAN_B_STAR = 2e8
KAPLAN_ALPHA_B = 0.21


def surge_optimal_lr(batch_size, b_noise, lr_max):
    """Eq. 2: the Adam-style optimal learning rate at ``batch_size``; peaks at ``b_noise``."""
    b = np.asarray(batch_size, np.float64)
    return lr_max / (0.5 * (np.sqrt(b_noise / b) + np.sqrt(b / b_noise)))


def sgd_optimal_lr(batch_size, b_noise, lr_max):
    """Eq. 1 (McCandlish et al.): the SGD optimal learning rate, saturating at ``lr_max``."""
    b = np.asarray(batch_size, np.float64)
    return lr_max / (1.0 + b_noise / b)


def steps_and_examples(batch_size, s_min, e_min):
    """Steps and examples to a target at ``batch_size``: ``S = S_min(1 + B_noise/B)``,
    ``E = E_min(1 + B/B_noise)`` with ``B_noise = E_min/S_min``; they satisfy Eq. 20."""
    b = np.asarray(batch_size, np.float64)
    b_noise = e_min / s_min
    return s_min * (1.0 + b_noise / b), e_min * (1.0 + b / b_noise)


@dataclasses.dataclass(frozen=True)
class BNoiseFit:
    """``B_noise = E_min/S_min``, with the minimum steps and examples to the target."""

    b_noise: float
    s_min: float
    e_min: float


def fit_b_noise(steps, examples) -> BNoiseFit:
    """Eq. 22: least-squares line ``1/S = -B_noise·(1/E) + 1/S_min`` through the runs.

    Args:
      steps: steps each run needed to reach the target loss, shape ``[n]``.
      examples: examples (tokens, for LMs) each run consumed to reach it, shape ``[n]``.
    """
    s = np.asarray(steps, np.float64).ravel()
    e = np.asarray(examples, np.float64).ravel()
    if s.size != e.size or s.size < 2:
        raise ValueError("fit_b_noise needs at least 2 (steps, examples) pairs of equal length")
    if np.any(s <= 0) or np.any(e <= 0):
        raise ValueError("steps and examples must be positive")
    slope, intercept = np.polyfit(1.0 / e, 1.0 / s, 1)
    if slope >= 0 or intercept <= 0:
        raise ValueError(
            "the runs do not show a steps/examples trade-off (fitted slope "
            f"{slope:.3g}, intercept {intercept:.3g}); widen the range of batch sizes"
        )
    s_min = 1.0 / intercept
    b_noise = -slope
    return BNoiseFit(b_noise=b_noise, s_min=s_min, e_min=b_noise * s_min)


def surge_lr_max(batch_sizes, best_lrs, b_noise) -> float:
    """Eq. 23: ``lr_max = mean[(lr_opt/2)(sqrt(B_noise/B) + sqrt(B/B_noise))]``."""
    b = np.asarray(batch_sizes, np.float64)
    lr = np.asarray(best_lrs, np.float64)
    return float(np.mean(lr / 2.0 * (np.sqrt(b_noise / b) + np.sqrt(b / b_noise))))


@dataclasses.dataclass(frozen=True)
class SurgeFit:
    """A fitted Eq. 2 curve; call it with batch sizes to get optimal learning rates."""

    b_noise: float
    lr_max: float

    def __call__(self, batch_size):
        return surge_optimal_lr(batch_size, self.b_noise, self.lr_max)


def fit_surge(batch_sizes, best_lrs, b_noise: float | None = None) -> SurgeFit:
    """Fits Eq. 2 to the best learning rate found at each batch size.

    With ``b_noise`` given (from :func:`fit_b_noise` or :func:`kaplan_critical_batch_size`),
    ``lr_max`` is the paper's Eq. 23 average. Without it, both are fitted by least squares on
    ``log lr``: for a fixed ``B_noise`` the best ``log lr_max`` is a mean, so only ``B_noise``
    is searched, over ``[min B / 100, max B · 100]``. The peak is only located if the sweep
    covers batch sizes on both sides of it.
    """
    b = np.asarray(batch_sizes, np.float64).ravel()
    lr = np.asarray(best_lrs, np.float64).ravel()
    if b.size != lr.size or b.size < 1 or np.any(b <= 0) or np.any(lr <= 0):
        raise ValueError("batch_sizes and best_lrs must be positive and of equal length")
    if b_noise is not None:
        return SurgeFit(float(b_noise), surge_lr_max(b, lr, b_noise))
    if b.size < 2:
        raise ValueError("fitting B_noise needs at least 2 batch sizes")

    def sse(log_bn: float) -> float:
        log_f = np.log(
            0.5 * (np.exp(0.5 * (log_bn - np.log(b))) + np.exp(0.5 * (np.log(b) - log_bn)))
        )
        resid = np.log(lr) + log_f
        return float(np.sum((resid - resid.mean()) ** 2))

    grid = np.linspace(np.log(b.min() / 100.0), np.log(b.max() * 100.0), 2001)
    values = np.array([sse(g) for g in grid])
    i = int(np.argmin(values))
    log_bn = golden_section_minimize(sse, grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)])
    bn = math.exp(log_bn)
    log_f = np.log(0.5 * (np.sqrt(bn / b) + np.sqrt(b / bn)))
    return SurgeFit(bn, float(np.exp(np.mean(np.log(lr) + log_f))))


def kaplan_critical_batch_size(
    loss, b_star: float = KAPLAN_B_STAR, alpha_b: float = KAPLAN_ALPHA_B
):
    """Kaplan et al. Eq. 1.4, ``B_crit = B*/L^(1/α_B)`` in tokens, ``loss`` in nats.

    The surge paper (Eq. 21) uses it as ``B_noise ≈ B_crit``, so that one (batch size, best
    learning rate) pair fixes ``lr_max``. The constants belong to Kaplan's data and tokenizer.
    """
    return b_star / np.power(np.asarray(loss, np.float64), 1.0 / alpha_b)
