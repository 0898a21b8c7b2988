"""The surge law (arXiv 2405.14578): Eq. 2 by hand, its limits, and the §3.2 estimators."""

import math

import numpy as np
import pytest

from jaxllm.scaling import (
    fit_b_noise,
    fit_surge,
    kaplan_critical_batch_size,
    sgd_optimal_lr,
    steps_and_examples,
    surge_lr_max,
    surge_optimal_lr,
)


@pytest.mark.parametrize("batch", [100.0, 1000.0, 10000.0])
def test_eq_2_by_hand(batch):
    b_noise, lr_max = 1000.0, 1e-3
    by_hand = lr_max / (0.5 * (math.sqrt(b_noise / batch) + math.sqrt(batch / b_noise)))
    assert surge_optimal_lr(batch, b_noise, lr_max) == pytest.approx(by_hand, rel=1e-14)
    # B = 100 or 10000: ½(√10 + √0.1) = ½(3.16228 + 0.31623) = 1.73925, 1e-3/1.73925 = 5.7496e-4;
    # B = B_noise: ½(1 + 1) = 1, the peak lr_max (digest §2 lists the same three values).
    assert by_hand == pytest.approx(1e-3 if batch == 1000.0 else 5.7496e-4, rel=1e-4)


def test_peak_at_b_noise_and_the_square_root_regime():
    b = np.geomspace(1.0, 1e8, 8001)
    lr = surge_optimal_lr(b, 1e4, 2e-3)
    assert b[np.argmax(lr)] == pytest.approx(1e4, rel=1e-3)
    assert lr.max() == pytest.approx(2e-3, rel=1e-6)
    # Eq. 4: B ≪ B_noise gives lr ≈ 2·lr_max·sqrt(B/B_noise); symmetric in log B about the peak.
    assert surge_optimal_lr(1.0, 1e4, 2e-3) == pytest.approx(2 * 2e-3 * math.sqrt(1e-4), rel=1e-4)
    assert surge_optimal_lr(1e2, 1e4, 1.0) == pytest.approx(surge_optimal_lr(1e6, 1e4, 1.0))


def test_sgd_rule_eq_1_and_its_linear_regime():
    assert sgd_optimal_lr(100.0, 1000.0, 1e-3) == pytest.approx(1e-3 / 11.0)
    # Eq. 3: lr ≈ lr_max·B/B_noise for B ≪ B_noise, and it never falls as B grows.
    assert sgd_optimal_lr(1.0, 1e6, 1.0) == pytest.approx(1e-6, rel=1e-5)
    assert np.all(np.diff(sgd_optimal_lr(np.geomspace(1, 1e6, 50), 1e3, 1.0)) > 0)


def test_steps_and_examples_satisfy_eq_20():
    s, e = steps_and_examples(np.geomspace(8, 8192, 11), s_min=1000.0, e_min=256000.0)
    np.testing.assert_allclose((s / 1000.0 - 1) * (e / 256000.0 - 1), 1.0, rtol=1e-12)


def test_fit_b_noise_recovers_the_trade_off():
    batches = np.geomspace(16, 16384, 9)
    s, e = steps_and_examples(batches, s_min=2000.0, e_min=1.2e6)
    fit = fit_b_noise(s, e)
    assert fit.b_noise == pytest.approx(600.0, rel=1e-9)
    assert fit.s_min == pytest.approx(2000.0, rel=1e-9)
    assert fit.e_min == pytest.approx(1.2e6, rel=1e-9)
    noise = np.exp(np.random.default_rng(0).normal(0, 0.02, size=(2, batches.size)))
    noisy = fit_b_noise(s * noise[0], e * noise[1])
    assert noisy.b_noise == pytest.approx(600.0, rel=0.1)


def test_fit_b_noise_rejects_runs_without_a_trade_off():
    with pytest.raises(ValueError, match="trade-off"):
        fit_b_noise([100, 100, 100], [1e3, 1e4, 1e5])
    with pytest.raises(ValueError):
        fit_b_noise([100], [1e3])


def test_lr_max_eq_23_with_known_b_noise():
    batches = np.array([64.0, 256.0, 1024.0, 4096.0])
    best = surge_optimal_lr(batches, 700.0, 3e-4)
    assert surge_lr_max(batches, best, 700.0) == pytest.approx(3e-4, rel=1e-12)
    fit = fit_surge(batches, best, b_noise=700.0)
    assert (fit.b_noise, fit.lr_max) == (700.0, pytest.approx(3e-4, rel=1e-12))
    np.testing.assert_allclose(fit(batches), best, rtol=1e-12)


def test_fit_surge_finds_the_peak_from_a_noisy_sweep():
    batches = np.geomspace(32, 32768, 13)
    rng = np.random.default_rng(1)
    best = surge_optimal_lr(batches, 1500.0, 6e-4) * np.exp(rng.normal(0, 0.03, batches.size))
    fit = fit_surge(batches, best)
    assert fit.b_noise == pytest.approx(1500.0, rel=0.15)
    assert fit.lr_max == pytest.approx(6e-4, rel=0.05)
    exact = fit_surge(batches, surge_optimal_lr(batches, 1500.0, 6e-4))
    assert exact.b_noise == pytest.approx(1500.0, rel=1e-6)
    assert exact.lr_max == pytest.approx(6e-4, rel=1e-6)


def test_kaplan_critical_batch_size_by_hand():
    # Kaplan et al. Eq. 1.4 with B* = 2e8 tokens, α_B = 0.21: at L = 2 nats,
    # 2^(1/0.21) = 2^4.76190 = 27.1316, 2e8 / 27.1316 = 7.37147e6 tokens.
    assert kaplan_critical_batch_size(2.0) == pytest.approx(7.37147e6, rel=1e-5)
    assert kaplan_critical_batch_size(3.0) < kaplan_critical_batch_size(2.0)
