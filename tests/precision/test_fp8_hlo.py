"""The FP8 projections reach XLA as FP8 GEMMs. In the lowered train step (StableHLO, before any
XLA pass) every projection's three dots take float8 operands with float32 results: E4M3 × E4M3
in the forward, E5M2 × E4M3 in dX and dW; and no dot is fed an FP8 value upcast to a wider
float (dequantize-then-dot, which leaves the FP8 GEMM to a rewrite nothing checks). With
`tpu_aot` (libtpu), what XLA:TPU makes of them on v5p: the optimized HLO's convolutions still
take the float8 operands (no convert in HLO; the chip has no FP8 MXU, see `precision/fp8.py`).
With `gpu_aot` (jax's CUDA plugin), what XLA:GPU makes of them for an H200: every projection's
GEMM takes float8 operands after XLA's passes (GEMMs take their untuned Triton form without a
GPU; on the device the autotuner may pick cuBLASLt's FP8 GEMM for the same dot)."""

from __future__ import annotations

import collections
import re

import jax
import pytest

from jaxllm import compile as aot
from jaxllm import config
from jaxllm.parallel.core.mesh import make_mesh
from jaxllm.training.state import Trainer
from jaxllm.training.step import make_train_step
from tests.helpers import tiny

F8 = ("f8E4M3FN", "f8E5M2")
FORWARD, BACKWARD = ("f8E4M3FN", "f8E4M3FN"), ("f8E4M3FN", "f8E5M2")  # operand pairs, sorted
# ops that move or relabel values without changing them: a convert seen through them still
# feeds the dot
_LAYOUT = {"transpose", "reshape", "broadcast_in_dim", "copy", "sharding_constraint"}

_DEF = re.compile(r"^\s*(%[\w#.:]+) = (?:stablehlo|sdy)\.(\w+) (%[\w#.]+)")
_ELEM = r"tensor<(?:[\d?]+x)*(\w+)>"
_CONVERT_FROM = re.compile(rf"stablehlo\.convert %[\w#.]+ : \({_ELEM}\)")
_DOT = re.compile(
    rf"stablehlo\.dot_general (%[\w#.]+), (%[\w#.]+),.* : \({_ELEM}, {_ELEM}\) -> {_ELEM}"
)


def dots(stablehlo: str) -> tuple[collections.Counter, list[str]]:
    """The dot_generals of a module: a count per (sorted operand element types, result type),
    and the lines of those with an operand that is an FP8 value converted to a wider type
    (through layout ops). SSA names are per function, so definitions restart at each one."""
    kinds: collections.Counter = collections.Counter()
    upcast: list[str] = []
    defs: dict[str, tuple[str, str, str]] = {}  # name -> (op, first operand, line)
    for line in stablehlo.splitlines():
        if "func.func" in line:
            defs = {}
        if m := _DEF.match(line):
            defs[m.group(1)] = (m.group(2), m.group(3), line)
        if not (d := _DOT.search(line)):
            continue
        lhs, rhs, tl, tr, out = d.groups()
        kinds[(*sorted((tl, tr)), out)] += 1
        for name in (lhs, rhs):
            while name in defs:
                op, src, def_line = defs[name]
                if op == "convert" and (c := _CONVERT_FROM.search(def_line)) and c[1] in F8:
                    upcast.append(line.strip())
                    break
                if op not in _LAYOUT | {"convert"}:
                    break
                name = src
    return kinds, upcast


def _lowered_text(*overrides: str) -> tuple[str, Trainer]:
    cfg = tiny(*overrides)
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    trainer = Trainer.create(cfg, mesh)
    shape = (cfg.data.batch_size, cfg.data.seq_len)
    spec = lambda dt: jax.ShapeDtypeStruct(shape, dt, sharding=trainer.batch_sharding)
    batch = {k: spec(jax.numpy.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
    batch["loss_mask"] = spec(jax.numpy.float32)
    return make_train_step(trainer).lower(trainer.abstract_state(), batch).as_text(), trainer


@pytest.fixture(scope="module")
def delayed():
    return _lowered_text("precision.fp8=delayed")


@pytest.fixture(scope="module")
def projections(delayed) -> int:
    """How many projections run in FP8: the entries of the delayed-scaling state."""
    n = len(delayed[1].abstract_state()["fp8_state"])
    assert n == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    return n


def test_dot_census_tells_fp8_from_upcast_operands():
    x8 = "%0 = stablehlo.convert %arg0 : (tensor<4x8xf32>) -> tensor<4x8xf8E4M3FN>"
    up = "%1 = stablehlo.convert %0 : (tensor<4x8xf8E4M3FN>) -> tensor<4x8xbf16>"
    t = "%2 = stablehlo.transpose %1, dims = [1, 0] : (tensor<4x8xbf16>) -> tensor<8x4xbf16>"
    direct = (
        "%3 = stablehlo.dot_general %0, %arg1, contracting_dims = [1] x [0] : "
        "(tensor<4x8xf8E4M3FN>, tensor<8x2xf8E5M2>) -> tensor<4x2xf32>"
    )
    via_upcast = (
        "%4 = stablehlo.dot_general %2, %arg2, contracting_dims = [0] x [0] : "
        "(tensor<8x4xbf16>, tensor<8x2xbf16>) -> tensor<4x2xf32>"
    )
    kinds, upcast = dots("\n".join(["func.func @main(", x8, up, t, direct, via_upcast]))
    assert kinds == {(*BACKWARD, "f32"): 1, ("bf16", "bf16", "f32"): 1}
    assert upcast == [via_upcast]


@pytest.mark.parametrize(
    "overrides",
    [("precision.fp8=current",), ("precision.fp8=current", "model.dtype=bfloat16"), ()],
    ids=["current", "current-bf16", "delayed"],
)
def test_train_step_runs_every_projection_as_fp8_dots(overrides, delayed, projections):
    text = _lowered_text(*overrides)[0] if overrides else delayed[0]
    kinds, upcast = dots(text)
    assert upcast == [], f"{len(upcast)} dots on upcast FP8 values, e.g. {upcast[0]}"
    # one forward GEMM and two backward GEMMs (dX = dY·Wᵀ, dW = Xᵀ·dY) per projection, all
    # accumulated in float32; no other float8 dots (nothing outside the projections is FP8)
    assert kinds[(*FORWARD, "f32")] == projections, kinds
    assert kinds[(*BACKWARD, "f32")] == 2 * projections, kinds
    f8_dots = sum(n for (a, b, _), n in kinds.items() if a in F8 or b in F8)
    assert f8_dots == 3 * projections, kinds


# ------------------------------------------------------------------ TPU, ahead of time

F8_HLO = ("f8e4m3fn", "f8e5m2")
_HLO_DEF = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[")
_HLO_CONV = re.compile(r"\bconvolution\(%([\w.\-]+), %([\w.\-]+)\)")


def _compiled_fp8_step(topology: str, d: int, seq: int) -> tuple[str, dict[str, str]]:
    """A 2-layer FP8 (current scaling) train step compiled for `topology`: the optimized HLO
    and the element type of each of its instructions (names are unique in a module)."""
    small = ["model.n_layers=2", f"model.d_model={d}", "model.n_heads=4", f"model.d_ff={2 * d}",
             "data.batch_size=8", f"data.seq_len={seq}", "precision.fp8=current"]  # fmt: skip
    lowered, _ = aot.lower_train_step(config.load("default", small), aot.parse_topology(topology))
    text = lowered.compile().as_text()
    types = {m[1]: m[2] for line in text.splitlines() if (m := _HLO_DEF.match(line))}
    return text, types


@pytest.mark.tpu_aot
@pytest.mark.skipif(not aot.tpu_available(), reason="needs libtpu (pip install .[tpu])")
def test_train_step_compiles_for_v5p_with_fp8_operands_at_the_mxu_op():
    text, types = _compiled_fp8_step("v5p:2x2x1", 128, 128)
    pairs = collections.Counter()
    for line in text.splitlines():
        if c := _HLO_CONV.search(line):
            pairs[tuple(sorted((types.get(c[1]), types.get(c[2]))))] += 1
    # XLA:TPU keeps the FP8 operands up to the convolution (the MXU op): 2 layers × 7
    # projections, forward E4M3 × E4M3 and both backward GEMMs E5M2 × E4M3
    assert pairs[("f8e4m3fn", "f8e4m3fn")] >= 2 * 7, pairs
    assert pairs[("f8e4m3fn", "f8e5m2")] >= 2 * 2 * 7, pairs


# ------------------------------------------------------------------ H200, ahead of time

_HLO_DOT = re.compile(r"\bdot\(%([\w.\-]+), %([\w.\-]+)\).*op_name=\"([^\"]*)\"")


@pytest.mark.gpu_aot
@pytest.mark.skipif(not aot.cuda_available(), reason="needs jax's CUDA plugin (.[cuda])")
def test_train_step_compiles_for_h200_with_every_projection_gemm_in_fp8():
    text, types = _compiled_fp8_step("h200", 256, 256)
    pairs, wide = collections.Counter(), []
    for line in text.splitlines():
        if d := _HLO_DOT.search(line):
            pair = tuple(sorted((types.get(d[1]), types.get(d[2]))))
            pairs[pair] += 1
            einsum = d[3].split("/")[-2]
            # attention's score and value products (vmapped over heads) and the output
            # head (vocab V) are not FP8 projections
            if not (einsum.startswith("vmap(") or "BTV" in einsum or "DV" in einsum):
                wide += [] if pair[0] in F8_HLO and pair[1] in F8_HLO else [d[3]]
    assert wide == [], f"projection GEMMs not in FP8 after XLA:GPU: {wide}"
    # XLA:GPU merges some sibling dots (q / k / v): at least one of each kind survives
    assert pairs[("f8e4m3fn", "f8e4m3fn")] >= 3, pairs
    assert pairs[("f8e4m3fn", "f8e5m2")] >= 6, pairs
