"""Batch-size laws attributed to arXiv 2412.01505 (constants from secondary sources)."""

import numpy as np
import pytest

from jaxllm.scaling import (
    batch_size_fixed_compute,
    batch_size_fixed_data,
    fixed_compute_allocation,
    lr_for_batch_size,
)
from jaxllm.scaling.batch_size import FIXED_COMPUTE_EXPONENTS


def test_fixed_data_by_hand():
    # B_opt = 3.24e3·D^0.264 at D = 1e10: 1e10^0.264 = 10^2.64 = 436.516, × 3240 = 1.41431e6
    # tokens per step.
    assert batch_size_fixed_data(1e10) == pytest.approx(1.41431e6, rel=1e-5)
    # D = 1e12: 10^(12·0.264) = 10^3.168 = 1472.31, × 3240 = 4.77029e6.
    assert batch_size_fixed_data(1e12) == pytest.approx(4.77029e6, rel=1e-5)
    assert batch_size_fixed_data(1e12, coefficient=1.0, exponent=0.5) == pytest.approx(1e6)


def test_fixed_compute_exponents_are_consistent():
    e = FIXED_COMPUTE_EXPONENTS
    # C ∝ N·D and D = S·B, so the exponents must add up.
    assert e["n_params"] + e["n_tokens"] == pytest.approx(1.0)
    assert e["steps"] + e["batch_size"] == pytest.approx(e["n_tokens"])


def test_fixed_compute_allocation_scales_a_reference():
    ref = {"n_params": 1e9, "n_tokens": 2e10, "steps": 1e4, "batch_size": 2e6}
    same = fixed_compute_allocation(1.2e20, 1.2e20, **ref)
    assert same == pytest.approx(ref)
    bigger = fixed_compute_allocation(1.2e22, 1.2e20, **ref)
    # 100× the compute: B × 100^0.102 = 10^0.204 = 1.59956, so 2e6 → 3.19912e6 tokens;
    # N × 100^0.464 = 10^0.928 = 8.47227, so 1e9 → 8.47227e9.
    assert bigger["batch_size"] == pytest.approx(3.19912e6, rel=1e-5)
    assert bigger["n_params"] == pytest.approx(8.47227e9, rel=1e-5)
    assert bigger["n_params"] * bigger["n_tokens"] == pytest.approx(1e9 * 2e10 * 100)
    # The reference has S·B = D, and the exponents keep it so.
    assert bigger["steps"] * bigger["batch_size"] == pytest.approx(bigger["n_tokens"])
    assert batch_size_fixed_compute(1.2e22, 1.2e20, 2e6) == pytest.approx(bigger["batch_size"])
    with pytest.raises(ValueError, match="unknown"):
        fixed_compute_allocation(1.0, 1.0, lr=1e-3)


def test_lr_for_batch_size():
    assert lr_for_batch_size(4e6, 1e6, 3e-4, gamma=1.0) == pytest.approx(1.2e-3)
    assert lr_for_batch_size(4e6, 1e6, 3e-4, gamma=0.75) == pytest.approx(3e-4 * 4**0.75)
    np.testing.assert_allclose(lr_for_batch_size([1e6, 2e6], 1e6, 1.0, 0.5), [1.0, 2**0.5])
