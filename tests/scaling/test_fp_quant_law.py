"""The Capybara law (arXiv 2501.02423 v3): constants, the paper's reported values, its optima."""

import math

import numpy as np
import pytest

from jaxllm.scaling import (
    CAPYBARA,
    LOG2_BLOCK_CHANNEL,
    critical_data_size,
    fp_quant_bf16_loss,
    fp_quant_loss,
    optimal_exmy,
    optimal_exmy_continuous,
    optimal_precision,
    optimal_precision_fixed_data,
    optimal_precision_fixed_params,
)
from jaxllm.scaling.fp_quant import _loss_at_optimal_split

LAW = CAPYBARA


def test_table2_constants():
    assert (LAW.n, LAW.alpha, LAW.d, LAW.beta) == (69.2343, 0.2368, 68973.0621, 0.5162)
    assert (LAW.eps, LAW.gamma, LAW.delta, LAW.nu) == (1.9061, 11334.5197, 3.1926, 2.9543)


def test_loss_by_hand():
    # Eq. 26 written out with Table 2's numbers.
    n_, d_, e_, m_, b_ = 41e6, 1e10, 1, 1, 32
    by_hand = (
        69.2343 / n_**0.2368
        + 68973.0621 / d_**0.5162
        + 1.9061
        + d_**0.5162 / n_**0.2368 * math.log2(b_) / (11334.5197 * 1.5**3.1926 * 1.5**2.9543)
    )
    assert fp_quant_loss(n_, d_, e_, m_, b_) == pytest.approx(by_hand, rel=1e-12)
    # Term by term: N^α = 41e6^0.2368 = 63.4903, n/N^α = 1.09047; D^β = 1e10^0.5162 = 145211,
    # d/D^β = 0.474985; the quantization term is 145211/63.4903 · log2(32) = 5 over
    # 11334.5197 · 1.5^(3.1926+2.9543) = 11334.5197 · 12.0897, i.e. 0.0834535;
    # L = 1.09047 + 0.474985 + 1.9061 + 0.0834535 = 3.55501 (digest §1 lists 3.5550).
    assert by_hand == pytest.approx(3.55501, abs=1e-5)


@pytest.mark.parametrize(("e", "m", "want"), [(8, 7, 2.5626), (4, 3, 2.5631), (2, 1, 2.5979)])
def test_loss_values_1b_100b_tokens(e, m, want):
    assert fp_quant_loss(1e9, 1e11, e, m, 128) == pytest.approx(want, abs=5e-5)


def test_block_size_one_is_the_bf16_loss_and_channel_is_log2_13_16():
    # §3.6: B = 1 keeps a high-precision copy, so the quantization term vanishes.
    assert fp_quant_loss(1e8, 2e10, 2, 1, 1) == pytest.approx(fp_quant_bf16_loss(1e8, 2e10))
    channel = fp_quant_loss(1e8, 2e10, 2, 1, "channel")
    assert channel == pytest.approx(fp_quant_loss(1e8, 2e10, 2, 1, 2.0**LOG2_BLOCK_CHANNEL))
    with pytest.raises(ValueError, match="tensor-wise"):
        fp_quant_loss(1e8, 2e10, 2, 1, "tensor")
    with pytest.raises(ValueError):
        fp_quant_loss(1e8, 2e10, 2, 1, 0)


# Figure 4: the optimal layout for 1 to 16 bits.
FIGURE_4 = "E0M0 E1M0 E1M1 E2M1 E2M2 E3M2 E3M3 E4M3 E4M4 E5M4 E5M5 E6M5 E6M6 E7M6 E7M7 E8M7".split()


@pytest.mark.parametrize("bits", range(1, 17))
def test_optimal_exmy_reproduces_figure_4(bits):
    e, m = optimal_exmy(bits)
    assert f"E{e}M{m}" == FIGURE_4[bits - 1]


def test_optimal_exmy_minimizes_the_loss_at_any_n_d_b():
    # The split enters only through (E+0.5)^δ(M+0.5)^ν, so brute force agrees everywhere.
    for n_, d_, b_ in [(41e6, 1e10, 32), (7e9, 2e12, 128), (70e9, 1e13, 4096)]:
        for bits in (4, 6, 8, 12):
            splits = [(e, bits - 1 - e) for e in range(bits)]
            best = min(splits, key=lambda em: fp_quant_loss(n_, d_, *em, b_))
            assert optimal_exmy(bits) == best
    assert optimal_exmy(4) == (2, 1) and optimal_exmy(8) == (4, 3) and optimal_exmy(16) == (8, 7)
    with pytest.raises(ValueError):
        optimal_exmy(0)


def test_continuous_split_eq_19():
    e, m = optimal_exmy_continuous(8)
    assert e + m == pytest.approx(7.0)
    assert m == pytest.approx(2.9543 * 8 / (3.1926 + 2.9543) - 0.5)
    # Exponent bits are worth slightly more than mantissa bits (δ > ν).
    assert e > m


def test_gamma_rho_and_the_optimal_split_law_eq_20():
    assert LAW.gamma_rho == pytest.approx(160.70, abs=5e-3)
    p = 7.3
    e, m = optimal_exmy_continuous(p)
    direct = fp_quant_loss(3e8, 4e10, e, m, 64)
    assert _loss_at_optimal_split(3e8, 4e10, p, 64, LAW) == pytest.approx(direct, rel=1e-12)


@pytest.mark.parametrize(
    ("e", "m", "tokens", "digits"),
    [(8, 7, 1730e12, 1e12), (4, 3, 27e12, 1e12), (2, 1, 0.4e12, 1e11)],
)
def test_critical_data_size_section_4_3(e, m, tokens, digits):
    # "a 1 billion-parameter model trained utilizing BF16 exhibits a Dcrit value of 1730T ...
    # FP8-E4M3 ... 27T, and with FP4-E2M1 ... 0.4T" (B = 128 reproduces all three).
    d_crit = critical_data_size(1e9, e, m, 128)
    assert round(d_crit / digits) == round(tokens / digits)


def test_critical_data_size_is_the_loss_minimum_over_d():
    d_crit = critical_data_size(2e8, 3, 2, 256)
    grid = d_crit * np.geomspace(0.5, 2.0, 2001)
    losses = fp_quant_loss(2e8, grid, 3, 2, 256)
    assert grid[np.argmin(losses)] == pytest.approx(d_crit, rel=1e-3)


def test_fixed_data_precision_eq_47_is_the_constrained_minimum():
    k, c, d_ = 6 / 16, 1e23, 2e11
    p_star = optimal_precision_fixed_data(d_, 128)
    grid = np.geomspace(2.0, 16.0, 40001)
    losses = [_loss_at_optimal_split(c / (k * p * d_), d_, p, 128, LAW) for p in grid]
    assert grid[int(np.argmin(losses))] == pytest.approx(p_star, rel=1e-3)


def test_fixed_data_precision_range_figure_14():
    # "across a substantially broad range of data sizes from 0.1T to 100T, the optimal
    # precision value consistently falls within the range of 4 to 8 bits" (B = 128).
    p = optimal_precision_fixed_data(np.geomspace(1e11, 1e14, 7), 128)
    assert np.all((p > 4) & (p < 8)) and np.all(np.diff(p) > 0)


def test_fixed_params_precision_eq_52():
    k, c, n_ = 6 / 16, 1e23, 1e10
    p_star = optimal_precision_fixed_params(c, n_, 128, k)
    grid = np.geomspace(2.0, 16.0, 40001)
    losses = [_loss_at_optimal_split(n_, c / (k * p * n_), p, 128, LAW) for p in grid]
    assert grid[int(np.argmin(losses))] == pytest.approx(p_star, rel=1e-3)
    # Eq. 24: P^(δ+ν+2β)·N^(α+2β) is constant along a fixed budget.
    a, b, s = LAW.alpha, LAW.beta, LAW.delta + LAW.nu
    invariants = [
        optimal_precision_fixed_params(c, n, 128, k) ** (s + 2 * b) * n ** (a + 2 * b)
        for n in (1e9, 1e10, 1e11)
    ]
    np.testing.assert_allclose(invariants, invariants[0], rtol=1e-10)


def test_compute_optimal_precision_eq_54_is_the_joint_minimum():
    k, c = 6 / 16, 1e24
    opt = optimal_precision(c, 128, k)
    assert k * opt.precision_bits * opt.n_params * opt.n_tokens == pytest.approx(c, rel=1e-10)
    # Search P and N (D follows from the budget) around the closed form.
    best = (np.inf, None)
    for p in np.geomspace(opt.precision_bits / 1.5, opt.precision_bits * 1.5, 121):
        n_grid = opt.n_params * np.geomspace(0.1, 10.0, 241)
        losses = [_loss_at_optimal_split(n, c / (k * p * n), p, 128, LAW) for n in n_grid]
        i = int(np.argmin(losses))
        best = min(best, (losses[i], p))
    assert best[0] >= opt.loss - 1e-9
    assert best[1] == pytest.approx(opt.precision_bits, rel=0.01)


def test_compute_optimal_precision_range_figure_7():
    # "when the total compute budget is in the range of (1e21, 1e31) FP operations, the optimal
    # cost-performance ratio precision is found to lie between 4 and 8 bits" (B = 128, k = 6/16).
    ps = [optimal_precision(c).precision_bits for c in np.geomspace(1e21, 1e31, 11)]
    assert 4.0 < ps[0] < 4.5 and 7.0 < ps[-1] < 8.0
    assert np.all(np.diff(ps) > 0)
