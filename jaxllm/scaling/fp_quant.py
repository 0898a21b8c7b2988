"""The floating-point quantization training law ("Capybara").

Sun et al., "Scaling Laws for Floating-Point Quantization Training", ICML 2025 (arXiv
2501.02423, v3). Loss of a model with ``N`` parameters trained on ``D`` tokens when the GEMM
inputs W, W_bwd and X_bwd (the paper's P2, P4, P6) are quantized to ExMy (1 sign bit, IEEE-like
with subnormals, Inf/NaN codes reused) with one high-precision scale per ``B`` elements:

    L = n/N^α + d/D^β + ε + (D^β/N^α) · log2(B) / (γ (E+0.5)^δ (M+0.5)^ν)        (Eq. 26)

The first three terms are the BF16 (Chinchilla) loss; the last grows with D, so with low
precision there is a critical data size past which more data hurts (Eq. 21). Constants are the
paper's Table 2, fitted on 358 runs (N 41M–679M, D 10B–100B tokens, Dolma, LLaMA-style models).
"""

import dataclasses
import math

import numpy as np

__all__ = [
    "CAPYBARA",
    "LOG2_BLOCK_CHANNEL",
    "FPQuantLaw",
    "PrecisionOptimum",
    "critical_data_size",
    "fp_quant_bf16_loss",
    "fp_quant_loss",
    "optimal_exmy",
    "optimal_exmy_continuous",
    "optimal_precision",
    "optimal_precision_fixed_data",
    "optimal_precision_fixed_params",
]


@dataclasses.dataclass(frozen=True)
class FPQuantLaw:
    """The constants of Eq. 26."""

    n: float
    alpha: float
    d: float
    beta: float
    eps: float
    gamma: float
    delta: float
    nu: float

    @property
    def gamma_rho(self) -> float:
        """Eq. 34: ``γ δ^δ ν^ν / (δ+ν)^(δ+ν)``, the γ of the law at the optimal E/M split."""
        s = self.delta + self.nu
        return self.gamma * self.delta**self.delta * self.nu**self.nu / s**s

    @property
    def gamma_d(self) -> float:
        """Eq. 46: ``(δ+ν-α) / (n α γ_ρ)``."""
        return (self.delta + self.nu - self.alpha) / (self.n * self.alpha * self.gamma_rho)

    @property
    def gamma_n(self) -> float:
        """Eq. 51: ``(β+δ+ν) / (d β γ_ρ)``."""
        return (self.beta + self.delta + self.nu) / (self.d * self.beta * self.gamma_rho)


# Table 2 of arXiv 2501.02423 v3 (digest lowprec_optim.md §1, [V]).
CAPYBARA = FPQuantLaw(
    n=69.2343,
    alpha=0.2368,
    d=68973.0621,
    beta=0.5162,
    eps=1.9061,
    gamma=11334.5197,
    delta=3.1926,
    nu=2.9543,
)

# §3.6 (digest §1, [V]): channel-wise scaling behaves as a block of log2 B ≈ 13.1567 in Eq. 15.
# The tensor-wise equivalent follows a power law in N and D whose constants the paper gives only
# as a figure.
LOG2_BLOCK_CHANNEL = 13.1567


def _log2_block(block_size) -> float:
    if isinstance(block_size, str):
        if block_size == "channel":
            return LOG2_BLOCK_CHANNEL
        if block_size == "tensor":
            raise ValueError(
                "tensor-wise scaling has no published constants (arXiv 2501.02423 gives the "
                "equivalent log2 B only as Figure 12); pass a block size or 'channel'"
            )
        raise ValueError(f"block_size must be a positive number or 'channel', got {block_size!r}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return math.log2(block_size)


def fp_quant_bf16_loss(n_params, n_tokens, law: FPQuantLaw = CAPYBARA):
    """The law's unquantized part ``n/N^α + d/D^β + ε`` (the paper's L_BF16)."""
    n_params = np.asarray(n_params, np.float64)
    n_tokens = np.asarray(n_tokens, np.float64)
    return law.n / n_params**law.alpha + law.d / n_tokens**law.beta + law.eps


def fp_quant_loss(
    n_params, n_tokens, exponent_bits, mantissa_bits, block_size, law: FPQuantLaw = CAPYBARA
):
    """Eq. 26: the loss with E exponent and M mantissa bits and one scale per ``block_size``.

    Args:
      n_params: N, the parameter count.
      n_tokens: D, training tokens.
      exponent_bits: E (BF16 is E8M7, FP8 E4M3/E5M2, FP4 E2M1).
      mantissa_bits: M.
      block_size: B, elements sharing one scale along the inner (d_in) dimension, or
        ``"channel"`` for per-channel scaling.
    """
    n_params = np.asarray(n_params, np.float64)
    n_tokens = np.asarray(n_tokens, np.float64)
    e = np.asarray(exponent_bits, np.float64)
    m = np.asarray(mantissa_bits, np.float64)
    quant = (
        n_tokens**law.beta
        / n_params**law.alpha
        * _log2_block(block_size)
        / (law.gamma * (e + 0.5) ** law.delta * (m + 0.5) ** law.nu)
    )
    return fp_quant_bf16_loss(n_params, n_tokens, law) + quant


def optimal_exmy(total_bits: int, law: FPQuantLaw = CAPYBARA) -> tuple[int, int]:
    """The integer (E, M) with ``E + M + 1 = total_bits`` that minimizes Eq. 26.

    The split only enters through ``(E+0.5)^δ (M+0.5)^ν``, so the best split is the same for
    every N, D and B. The paper's Figure 4 lists E1M0, E1M1, E2M1, E2M2, E3M2, E3M3, E4M3,
    E4M4, E5M4, E5M5, E6M5, E6M6, E7M6, E7M7, E8M7 for 2 to 16 bits (1 bit is the sign: E0M0).
    """
    if total_bits < 1 or int(total_bits) != total_bits:
        raise ValueError(f"total_bits must be an integer >= 1 (the sign bit), got {total_bits}")
    bits = int(total_bits) - 1

    def log_weight(e: int) -> float:
        return law.delta * math.log(e + 0.5) + law.nu * math.log(bits - e + 0.5)

    e = max(range(bits + 1), key=log_weight)
    return e, bits - e


def optimal_exmy_continuous(total_bits, law: FPQuantLaw = CAPYBARA) -> tuple[float, float]:
    """Eqs. 19/31: ``E = δP/(δ+ν) - 0.5``, ``M = νP/(δ+ν) - 0.5`` for ``P = total_bits``."""
    p = np.asarray(total_bits, np.float64)
    s = law.delta + law.nu
    return law.delta * p / s - 0.5, law.nu * p / s - 0.5


def critical_data_size(
    n_params, exponent_bits, mantissa_bits, block_size, law: FPQuantLaw = CAPYBARA
):
    """Eq. 21: the D that minimizes Eq. 26 at fixed N; more tokens than this raise the loss.

    ``D_crit = [d γ N^α (E+0.5)^δ (M+0.5)^ν / log2 B]^(1/(2β))``. With B = 128 and N = 1e9 it
    gives the paper's §4.3 values: 1730T tokens for E8M7, 27T for E4M3, 0.4T for E2M1.
    """
    n_params = np.asarray(n_params, np.float64)
    e = np.asarray(exponent_bits, np.float64)
    m = np.asarray(mantissa_bits, np.float64)
    inner = (
        law.d
        * law.gamma
        * n_params**law.alpha
        * (e + 0.5) ** law.delta
        * (m + 0.5) ** law.nu
        / _log2_block(block_size)
    )
    return inner ** (1.0 / (2.0 * law.beta))


@dataclasses.dataclass(frozen=True)
class PrecisionOptimum:
    """A compute-optimal point: precision P = E+M+1 (continuous), N, D and the predicted loss."""

    precision_bits: float
    n_params: float
    n_tokens: float
    loss: float


def _loss_at_optimal_split(n_params, n_tokens, precision_bits, block_size, law) -> float:
    """Eq. 20: Eq. 26 with the continuous optimal E/M split for P bits."""
    quant = (
        n_tokens**law.beta
        / n_params**law.alpha
        * _log2_block(block_size)
        / (law.gamma_rho * precision_bits ** (law.delta + law.nu))
    )
    return float(fp_quant_bf16_loss(n_params, n_tokens, law) + quant)


def optimal_precision_fixed_data(n_tokens, block_size=128, law: FPQuantLaw = CAPYBARA):
    """Eq. 47: at fixed D and compute ``C = kPND``, ``P^(δ+ν) = γ_D D^β log2 B``."""
    n_tokens = np.asarray(n_tokens, np.float64)
    power = law.gamma_d * n_tokens**law.beta * _log2_block(block_size)
    return power ** (1.0 / (law.delta + law.nu))


def optimal_precision_fixed_params(
    compute, n_params, block_size=128, k: float = 6.0 / 16.0, law: FPQuantLaw = CAPYBARA
):
    """Eq. 52: at fixed N, ``P^(δ+ν+2β) = γ_N (C/k)^(2β) N^-(α+2β) log2 B``."""
    compute = np.asarray(compute, np.float64)
    n_params = np.asarray(n_params, np.float64)
    power = (
        law.gamma_n
        * (compute / k) ** (2.0 * law.beta)
        * n_params ** (-(law.alpha + 2.0 * law.beta))
        * _log2_block(block_size)
    )
    return power ** (1.0 / (law.delta + law.nu + 2.0 * law.beta))


def optimal_precision(
    compute: float, block_size=128, k: float = 6.0 / 16.0, law: FPQuantLaw = CAPYBARA
) -> PrecisionOptimum:
    """Eq. 54: the cost-optimal precision, N and D for a compute budget ``C = k·P·N·D``.

    ``P^((δ+ν)(α+β)/β + α) = (γ_D log2 B)^((α+β)/β) · (δ+ν-α)/(δ+ν+β) · dβ/(nα) · (C/k)^α``.
    With ``k = 6/16`` (6ND FLOPs at 16 bits), C in FLOPs. N and D follow from the fixed-D
    condition ``D^β = P^(δ+ν)/(γ_D log2 B)`` and ``N = C/(kPD)``. The paper's Figure 7 (B = 128)
    puts P between 4 and 8 bits for C from 1e21 to 1e31.
    """
    a, b, s = law.alpha, law.beta, law.delta + law.nu
    log2b = _log2_block(block_size)
    rhs = (
        (law.gamma_d * log2b) ** ((a + b) / b)
        * (s - a)
        / (s + b)
        * (law.d * b)
        / (law.n * a)
        * (compute / k) ** a
    )
    p = rhs ** (1.0 / (s * (a + b) / b + a))
    n_tokens = (p**s / (law.gamma_d * log2b)) ** (1.0 / b)
    n_params = compute / (k * p * n_tokens)
    loss = _loss_at_optimal_split(n_params, n_tokens, p, block_size, law)
    return PrecisionOptimum(float(p), float(n_params), float(n_tokens), loss)
