"""fit_power_law recovers known laws; golden_section_minimize finds minima."""

import numpy as np
import pytest

from jaxllm.scaling import fit_power_law, golden_section_minimize


def test_recovers_a_pure_power_law():
    x = np.geomspace(1e-2, 1e3, 12)
    fit = fit_power_law(x, 3.7087 * x**-0.0798)
    assert fit.coefficient == pytest.approx(3.7087, rel=1e-10)
    assert fit.exponent == pytest.approx(-0.0798, rel=1e-10)
    assert fit.offset == 0.0 and fit.r2 == pytest.approx(1.0)
    np.testing.assert_allclose(fit(x), 3.7087 * x**-0.0798, rtol=1e-10)


def test_recovers_a_power_law_with_offset_at_large_x():
    # x up to 1e22 (FLOPs): x^b would overflow without the internal rescaling.
    x = np.geomspace(1e18, 1e22, 15)
    y = 1.69 + 406.4 * x**-0.12
    fit = fit_power_law(x, y, offset=True)
    assert fit.exponent == pytest.approx(-0.12, rel=1e-6)
    assert fit.coefficient == pytest.approx(406.4, rel=1e-5)
    assert fit.offset == pytest.approx(1.69, rel=1e-6)


def test_offset_fit_with_noise():
    rng = np.random.default_rng(0)
    x = np.geomspace(1e6, 1e10, 25)
    y = 2.0 + 50.0 * x**-0.25 * (1 + rng.normal(0, 1e-3, x.size))
    fit = fit_power_law(x, y, offset=True)
    assert fit.exponent == pytest.approx(-0.25, rel=0.05)
    assert fit.offset == pytest.approx(2.0, rel=0.01)
    assert fit.r2 > 0.999
    assert "x^" in str(fit)


def test_bad_input():
    with pytest.raises(ValueError, match="positive"):
        fit_power_law([0.0, 1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="positive"):
        fit_power_law([1.0, 2.0], [1.0, -2.0])
    with pytest.raises(ValueError, match="at least"):
        fit_power_law([1.0, 2.0], [1.0, 2.0], offset=True)
    with pytest.raises(ValueError, match="same length"):
        fit_power_law([1.0, 2.0], [1.0])


def test_golden_section():
    assert golden_section_minimize(lambda t: (t - 1.234) ** 2, -5.0, 5.0) == pytest.approx(1.234)
