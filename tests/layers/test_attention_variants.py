"""Properties every softmax-attention variant must have, through `jaxllm.models.build`: decode
equals the full forward, causality by gradient, and what the KV cache costs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm import config, models
from jaxllm.sampling import kv_cache_bytes

TOL = dict(atol=2e-5, rtol=2e-5)  # float32 end to end, as tests/models/test_decoder.py

VARIANTS = {
    "cog": ("model.mixer=cog", "model.mixers.cog.block=4"),
    "cla": ("model.mixer=cla",),
    "cla-qknorm-untied": ("model.mixer=cla", "model.mixers.cla.qk_norm=true"),
    "cla3-qknorm-tied-after": (
        "model.mixer=cla", "model.mixers.cla.share_factor=3", "model.mixers.cla.qk_norm=true",
        "model.mixers.cla.tie_k_norm=true", "model.mixers.cla.qk_norm_position=after_rope",
    ),
    "clla-int4": ("model.mixer=clla", "model.mixers.clla.qk_norm=true"),
    "clla-int8": ("model.mixer=clla", "model.mixers.clla.quant=int8"),
    "dape-alibi": ("model.mixer=dape",),
    "dape-fire-rope": ("model.mixer=dape", "model.mixers.dape.bias=fire",
                       "model.mixers.dape.rope=true"),
    "dape2-kerple": ("model.mixer=dape2", "model.mixers.dape2.bias=kerple"),
    "dape2-none-qknorm": ("model.mixer=dape2", "model.mixers.dape2.bias=none",
                          "model.mixers.dape2.qk_norm=true"),
    "infini-delta": ("model.mixer=infini", "model.mixers.infini.segment_len=4"),
    "infini-linear": ("model.mixer=infini", "model.mixers.infini.segment_len=5",
                      "model.mixers.infini.update=linear"),
}  # fmt: skip


def small(*extra):
    base = [
        "model.d_model=32", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2",
        "model.d_ff=48", "model.vocab_size=64", "model.max_seq_len=32", "model.dtype=float32",
        "data.seq_len=16",
    ]  # fmt: skip
    return config.load("default", [*base, *extra]).model


@nnx.jit
def _full(model, tokens):
    return model(tokens)


@nnx.jit
def _step(model, tokens, cache):
    return model(tokens, cache=cache)


# One configuration per mixer runs in the default suite; the other option combinations are slow.
FAST = {"cog", "cla-qknorm-untied", "cla3-qknorm-tied-after", "clla-int4", "dape2-kerple",
        "infini-delta"}  # fmt: skip
CASES = [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in VARIANTS]


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(1), (2, 13), 0, 64)


@pytest.mark.parametrize("name", CASES)
def test_decode_equals_forward(tokens, name):
    """Prefill 5 tokens, then decode the rest one at a time: the logits of one full pass."""
    model = models.build(small(*VARIANTS[name]), 0)
    full = _full(model, tokens)
    cache = model.init_cache(2, 16)
    pre, cache = _step(model, tokens[:, :5], cache)
    steps = [pre]
    for t in range(5, tokens.shape[1]):
        out, cache = _step(model, tokens[:, t : t + 1], cache)
        steps.append(out)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, **TOL)
    assert all(int(c["end"]) == tokens.shape[1] for c in cache)


@pytest.mark.parametrize(
    "name", ["infini-delta", pytest.param("infini-linear", marks=pytest.mark.slow)]
)
def test_infini_prefill_in_pieces_equals_forward(name):
    """Infini prefills whole segments at a time: prompts of lengths that are not multiples of
    the segment (4 or 5), starting mid-segment, filling it exactly or crossing several, mixed
    with single decode steps, give the logits of one full pass."""
    model = models.build(small(*VARIANTS[name]), 0)
    tokens = jax.random.randint(jax.random.key(2), (2, 23), 0, 64)
    full = _full(model, tokens)
    cache = model.init_cache(2, 32)
    steps, start = [], 0
    for n in (11, 1, 1, 6, 1, 3):
        out, cache = _step(model, tokens[:, start : start + n], cache)
        steps.append(out)
        start += n
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, **TOL)
    assert all(int(c["end"]) == tokens.shape[1] for c in cache)


@pytest.mark.parametrize("name", CASES)
def test_causal_by_gradient(tokens, name):
    """d logits_t / d embedding_s = 0 for every s > t (no future key leaks, DAPE's conv
    included) and ≠ 0 for some s ≤ t."""
    model = models.build(small(*VARIANTS[name]), 0)
    x = jnp.take(model.embed[...], tokens, axis=0)
    t = 6

    @jax.jit
    def grad(x):
        def out_t(x):
            pos = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
            carry = {}
            for blk in model.blocks:
                x, _ = blk(x, positions_BT=pos, carry=carry)
            return jnp.sum(model.final_norm(x)[:, t] @ model.head[...])

        return jax.grad(out_t)(x)

    g = grad(x)
    assert float(jnp.max(jnp.abs(g[:, t + 1 :]))) == 0.0
    assert float(jnp.max(jnp.abs(g[:, : t + 1]))) > 0.0


def test_kv_cache_bytes_per_token():
    """CLA-f caches one K/V per group of f layers; CLLA only int4 codes + fp16 scales of the
    shared latent; Infini a bounded memory (no growth per token)."""
    mha = kv_cache_bytes(models.build(small("model.n_kv_heads=4"), 0))
    gqa = kv_cache_bytes(models.build(small(), 0))
    # 4 layers · (K + V) · kv heads · head_dim 8 · 4 bytes
    assert mha["per_token"] == 4 * 2 * 4 * 8 * 4
    assert gqa["per_token"] == mha["per_token"] / 2
    for f in (2, 4):
        cla = kv_cache_bytes(
            models.build(small(*VARIANTS["cla"], f"model.mixers.cla.share_factor={f}"), 0)
        )
        assert cla["per_token"] == gqa["per_token"] / f
    clla = kv_cache_bytes(models.build(small(*VARIANTS["clla-int4"]), 0))
    # 2 producers · ((64 + 16) / 2 bytes of codes + 80/16 float16 scales)
    assert clla["per_token"] == 2 * (80 / 2 + 5 * 2)
    infini = kv_cache_bytes(models.build(small(*VARIANTS["infini-delta"]), 0))
    assert infini["per_token"] == 0 and infini["fixed"] > 0


def test_cog_placement_keeps_first_and_last_layer_softmax():
    model = models.build(small("model.mixer=cog"), 0)
    assert [blk.mixer.signed for blk in model.blocks] == [False, True, True, False]
    model = models.build(small("model.mixer=cog", "model.mixers.cog.softmax_layers=[]"), 0)
    assert all(blk.mixer.signed for blk in model.blocks)


def test_cla_consumers_own_no_kv_projection():
    model = models.build(small(*VARIANTS["cla3-qknorm-tied-after"]), 0)
    owns = [(hasattr(b.mixer, "wk"), b.mixer.k_norm is not None) for b in model.blocks]
    assert owns == [(True, True), (False, False), (False, False), (True, True)]
    model = models.build(small(*VARIANTS["cla-qknorm-untied"]), 0)
    assert [b.mixer.k_norm is not None for b in model.blocks] == [True] * 4


def test_cla_consumer_without_producer_is_a_clear_error():
    cfg = small("model.layer_pattern=[softmax,cla]")
    with pytest.raises(ValueError, match="reuses K/V of layer 0"):
        models.build(cfg, 0)(jnp.zeros((1, 4), jnp.int32))
