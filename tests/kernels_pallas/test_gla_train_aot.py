"""Ahead-of-time compiles, from this CPU host, of train steps whose mixers run gated linear
attention (marker `tpu_aot`, needs libtpu): lowered for TPU, impl="auto" picks the GLA Mosaic
kernel with document resets in every layer."""

import base64
import collections
import re

import pytest

from jaxllm import compile as aot
from jaxllm import config

pytestmark = [
    pytest.mark.tpu_aot,
    pytest.mark.skipif(not aot.tpu_available(), reason="needs libtpu (pip install .[tpu])"),
]

MOSAIC = "tpu_custom_call"
# The lightning kernel's Pallas functions have the same names: the GLA kernel is told by the
# source file in the Mosaic body's debug locations.
GLA_SOURCE = b"kernels_pallas/gated_linear_attention/tpu.py"
_BODY = re.compile(r'"body":"([^"]*)"')


def _kernel(call):
    """The Pallas kernel of one Mosaic custom call (its HLO line): fwd, dq or dkv."""
    body = base64.b64decode(_BODY.search(call).group(1))
    assert GLA_SOURCE in body, "a Mosaic call that is not the GLA kernel"
    # The backward bodies mention _fwd_kernel too.
    for name in ("dkv", "dq", "fwd"):
        if f"_{name}_kernel".encode() in body:
            return name
    raise AssertionError("no GLA kernel name in a Mosaic body")


@pytest.mark.parametrize("preset", ["hgrn2-tiny", "lcsm-tiny"])
def test_train_step_uses_the_packed_gla_kernel(preset):
    """The preset's real train step (its batches carry segment_ids: packed documents) compiled
    for a v5e:2x2 data-parallel mesh, with the mixers' impl="auto": every layer lowers to the
    GLA kernel with document resets (forward, dq sweep, dk/dv sweep; the int32 runs among the
    operands), and nothing else is a Mosaic call. lcsm-tiny's memory is data-dependent."""
    cfg = config.load(preset, ["model.n_layers=2"])
    lowered, mesh = aot.lower_train_step(cfg, aot.parse_topology("v5e:2x2"))
    assert mesh.shape["data"] == 4
    calls = [line for line in lowered.compile().as_text().splitlines() if MOSAIC in line]
    n = cfg.model.n_layers
    assert collections.Counter(map(_kernel, calls)) == {"fwd": n, "dq": n, "dkv": n}
    assert all("s32[" in line for line in calls)
