"""Every parameter of every linear-family preset gets the same gradient from the mixers' fast
paths: impl="xla" (what the CPU runs) against impl="pallas" (the lightning kernel, or the gated
linear attention kernel for HGRN2 and LCSM's data-dependent memory; interpreted here, what
impl="auto" runs on TPU and GPU), on one small batch of packed rows.

A learned parameter that reaches a kernel without a gradient fails here: LCSM's static decay
used to be frozen on accelerators (the kernel wrapped it in `stop_gradient`) while it learned
on the CPU; HGRN2's forget-gate floor and LCSM's gate weights learn only through the GLA
kernel's gradient of the gates.

Tolerance: float32 end to end, RMS(Δ)/RMS(ref) ≤ 1e-5 per leaf (fla's `assert_close`, the
ops' float32 policy).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm import config, models
from tests.helpers import assert_close

F32_RATIO = 1e-5
SHRINK = [
    "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=2", "model.d_ff=32",
    "model.vocab_size=64", "model.max_seq_len=32", "model.dtype=float32", "data.seq_len=32",
]  # fmt: skip
TWO_LAYERS = ["model.n_layers=2"]
# preset → (extra overrides, the mixers whose impl is switched, the impl compared with xla)
CASES = {
    "tnl-tiny": ([], ["lightning"], "pallas"),
    "cosformer2-tiny": ([], ["cosformer2"], "pallas"),
    "lcsm-static": (["model.mixers.lcsm.oscillation=static", "model.mixers.lcsm.expand=silu"],
                    ["lcsm"], "pallas"),
    # the decoder's lax.scan over layers: the decay is a scanned parameter
    "lcsm-static-scan": (["model.mixers.lcsm.oscillation=static",
                          "model.mixers.lcsm.expand=silu", "model.scan_layers=true"],
                         ["lcsm"], "pallas"),
    "lcsm-tiny": ([], ["lcsm"], "pallas"),
    "hgrn2-tiny": (["model.mixers.hgrn2.expand_ratio=8"], ["hgrn2"], "pallas"),
    "hybrid-tiny": ([], ["lightning"], "pallas"),
}  # fmt: skip
PRESETS = {"lcsm-static": "lcsm-tiny", "lcsm-static-scan": "lcsm-tiny"}
# 12-20 s each (mostly compiling the interpreted kernel): the default suite keeps the learned
# decays (LCSM's static one, HGRN2's gate floor through the GLA kernel's gate gradient); the
# presets whose kernel inputs are all activations are slow.
SLOW = {"tnl-tiny", "cosformer2-tiny", "lcsm-tiny", "hybrid-tiny"}


def _batch(B=2, T=21, vocab=64):
    """Tokens, positions restarting at each document, and packed segment ids (documents of 8
    and 13 tokens, and one of 5, 9 and 7), with a random cotangent on the logits."""
    tokens = jax.random.randint(jax.random.key(0), (B, T), 0, vocab)
    seg = np.array([[1] * 8 + [2] * 13, [1] * 5 + [2] * 9 + [3] * 7])
    pos = np.array([list(range(8)) + list(range(13)), list(range(5)) + list(range(9)) +
                    list(range(7))])  # fmt: skip
    dlogits = jax.random.normal(jax.random.key(1), (B, T, vocab))
    return tokens, jnp.asarray(pos), jnp.asarray(seg), dlogits


def _grads(model_cfg, batch):
    """d Σ(logits · dlogits) / d every nnx.Param, as a state of the same tree."""
    tokens, pos, seg, dlogits = batch
    graphdef, params, rest = nnx.split(models.build(model_cfg, 0), nnx.Param, ...)

    @jax.jit
    def grad(params):
        def loss(params):
            logits = nnx.merge(graphdef, params, rest)(tokens, positions_BT=pos, segment_ids_BT=seg)
            return jnp.sum(logits * dlogits)

        return jax.grad(loss)(params)

    return grad(params)


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in CASES]
)
def test_every_parameter_has_the_same_gradient_on_every_impl(case):
    extra, mixers, other = CASES[case]
    preset = PRESETS.get(case, case)

    def model_cfg(impl):
        impls = [f"model.mixers.{m}.impl={impl}" for m in mixers]
        depth = [] if case == "hybrid-tiny" else TWO_LAYERS  # its pattern is 8 layers long
        return config.load(preset, [*SHRINK, *depth, *extra, *impls]).model

    batch = _batch()
    want = nnx.to_flat_state(_grads(model_cfg("xla"), batch))
    got = dict(nnx.to_flat_state(_grads(model_cfg(other), batch)))
    assert len(want) == len(got)
    for path, ref in want:
        name = "/".join(map(str, path))
        ref = ref.get_value() if hasattr(ref, "get_value") else ref.value
        x = got[path]
        x = x.get_value() if hasattr(x, "get_value") else x.value
        # No leaf may be frozen on either side (a zero gradient would also match a zero).
        assert np.any(np.asarray(ref) != 0), f"{name}: zero gradient with impl=xla"
        assert_close(f"{name} ({other} vs xla)", ref, x, F32_RATIO)
