"""Linear-complexity laws (arXiv 2406.16690): Table 3, Table 1, and the compute unit."""

import numpy as np
import pytest

from jaxllm.scaling import (
    LINEAR_COMPLEXITY_LAWS,
    flops_to_pflops_days,
    linear_complexity_loss,
    linear_complexity_optimal_params,
    linear_complexity_optimal_tokens,
    linear_complexity_param_count,
)

TABLE_3 = {
    "llama": (3.7087, -0.0798, 1.82e8, 0.7118, 2.56e10, 0.5102),
    "tnl": (3.5391, -0.0768, 2.74e8, 0.6470, 4.43e10, 0.4684),
    "hgrn2": (3.4788, -0.0753, 2.66e8, 0.6427, 4.80e10, 0.4500),
    "cosformer2": (3.5877, -0.0756, 2.65e8, 0.6516, 4.23e10, 0.4529),
}


@pytest.mark.parametrize("arch", sorted(TABLE_3))
def test_table_3_by_hand(arch):
    lc, le, nc, ne, dc, de = TABLE_3[arch]
    law = LINEAR_COMPLEXITY_LAWS[arch]
    assert (law.loss_coef, law.loss_exp, law.n_coef, law.n_exp, law.d_coef, law.d_exp) == (
        lc,
        le,
        nc,
        ne,
        dc,
        de,
    )
    assert linear_complexity_loss(100.0, arch) == pytest.approx(lc * 100.0**le, rel=1e-12)
    assert linear_complexity_optimal_params(100.0, arch) == pytest.approx(nc * 100.0**ne)
    assert linear_complexity_optimal_tokens(100.0, arch) == pytest.approx(dc * 100.0**de)


def test_loss_values_by_hand():
    # LLaMA at C = 100 PFLOP/s-days: 100^-0.0798 = 10^-0.1596 = 0.692468, × 3.7087 = 2.56816.
    assert linear_complexity_loss(100.0, "LLaMA") == pytest.approx(2.56816, abs=1e-5)
    # TNL at C = 1: the coefficients themselves, 3.5391, 2.74e8 parameters and 4.43e10 tokens.
    assert linear_complexity_loss(1.0, "tnl") == pytest.approx(3.5391, rel=1e-12)
    # HGRN2 N_opt at C = 1e3: 10^(3·0.6427) = 10^1.9281 = 84.742, × 2.66e8 = 2.25414e10.
    assert linear_complexity_optimal_params(1e3, "hgrn2") == pytest.approx(2.25414e10, rel=1e-5)


def test_linear_models_reach_lower_loss_in_the_fitted_range():
    # "under the same computation budget, linear complexity models ... obtain lower loss".
    c = np.geomspace(1e-2, 1e3, 16)
    for arch in ("tnl", "hgrn2", "cosformer2"):
        assert np.all(linear_complexity_loss(c, arch) < linear_complexity_loss(c, "llama"))


def test_compute_unit_is_pflops_days():
    assert flops_to_pflops_days(8.64e19) == pytest.approx(1.0)
    # The paper's largest run, 7B on 300B tokens (6ND FLOPs), should sit near its own frontier:
    # with C in PFLOP/s-days N_opt and D_opt come out within 2x of (7B, 300B).
    c = flops_to_pflops_days(6 * 7e9 * 300e9)
    for arch in TABLE_3:
        assert 3.5e9 < linear_complexity_optimal_params(c, arch) < 14e9
        assert 1.5e11 < linear_complexity_optimal_tokens(c, arch) < 6e11


def test_table_1_param_counts_by_hand():
    l, d, h = 32, 4096, 32
    assert linear_complexity_param_count("llama", l, d, h) == 12 * 32 * 4096**2
    assert (
        linear_complexity_param_count("tnl", l, d, h) == 12 * 32 * 4096**2 + 2 * 32 * 4096**2 / 32
    )
    assert linear_complexity_param_count("hgrn2", l, d, h) == 12 * 32 * 4096**2 + 32 * 4096
    assert linear_complexity_param_count("cosformer2", l, d, h) == (
        12 * 32 * 4096**2 + 2 * 32 * 4096**2 / 32 + 4096**2 / 32
    )


def test_unknown_architecture():
    with pytest.raises(ValueError, match="unknown architecture"):
        linear_complexity_loss(1.0, "mamba")
    with pytest.raises(ValueError, match="unknown architecture"):
        linear_complexity_param_count("mamba", 1, 8, 1)
