"""`model.scan_layers` in train steps compiled ahead of time for TPU v5e 2x2 from this CPU host
(marker `tpu_aot`, needs libtpu): the optimized HLO keeps the layers as one while loop whose
body is a single layer (or period of layers), instead of n unrolled copies."""

import re

import pytest

from jaxllm import compile as aot
from jaxllm import config

pytestmark = [
    pytest.mark.tpu_aot,
    pytest.mark.skipif(not aot.tpu_available(), reason="needs libtpu (pip install .[tpu])"),
]

MOSAIC = "tpu_custom_call"
# The shape these tests were written for (the `default` preset's kv heads and vocabulary before
# it was resized for the first run): the program-size comparison below is within 2% there.
SMALL = ["model.d_model=128", "model.n_heads=4", "model.n_kv_heads=4", "model.d_ff=256",
         "model.vocab_size=384", "data.batch_size=8", "data.seq_len=128"]  # fmt: skip


def _hlo(preset: str, overrides: list[str]) -> str:
    cfg = config.load(preset, ["model.scan_layers=true", *overrides])
    lowered, _ = aot.lower_train_step(cfg, aot.parse_topology("v5e:2x2"))
    return lowered.compile().as_text()


def _instructions(hlo: str) -> int:
    return sum(" = " in line and line.startswith("  ") for line in hlo.splitlines())


def test_scanned_layers_compile_to_one_loop_whatever_the_depth():
    """`default` with 4 and 8 layers, full remat: a forward and a backward loop over the layers
    (trip count = depth), and the same program size at both depths (an unrolled step grows
    by a layer's forward, recompute and backward per layer)."""
    sizes = {}
    for n in (4, 8):
        hlo = _hlo("default", [*SMALL, f"model.n_layers={n}", "train.remat=full"])
        trips = [trip for _, trip in aot.HloModuleText.parse(hlo).loops()]
        assert trips == [n, n], trips
        sizes[n] = _instructions(hlo)
    assert abs(sizes[8] - sizes[4]) <= 0.02 * sizes[4], sizes


def test_scanned_hybrid_loops_over_its_period():
    """hybrid-tiny at 24 layers (7 lightning + 1 softmax, three times): one loop of three trips
    over the 8-layer period; the Mosaic kernels appear once per layer of the period (forward
    and two backward sweeps of the 7 lightning layers, and of the softmax layer's splash, its
    head dim 32 run padded to 64: 3 x 8), not once per layer (3 x 24)."""
    hlo = _hlo("hybrid-tiny", ["model.n_layers=24", "data.batch_size=8", "data.seq_len=128"])
    trips = [trip for _, trip in aot.HloModuleText.parse(hlo).loops()]
    assert trips == [3, 3], trips
    assert hlo.count(MOSAIC) == 3 * 8
    assert len(re.findall(r"%splash_mha\w*(?:\.\d+)? = ", hlo)) == 3
