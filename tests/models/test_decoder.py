import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm import config, models
from jaxllm.training.state import Model

TOL = dict(atol=2e-5, rtol=2e-5)  # float32 end to end


def small(*extra):
    base = [
        "model.d_model=32",
        "model.n_layers=2",
        "model.n_heads=4",
        "model.n_kv_heads=2",
        "model.d_ff=48",
        "model.vocab_size=64",
        "model.max_seq_len=32",
        "model.dtype=float32",
        "data.seq_len=16",
    ]
    return config.load("default", [*base, *extra]).model  # fmt: skip


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(1), (2, 12), 0, 64)


@pytest.mark.parametrize(
    "extra",
    [(), ("model.tie_embeddings=true",), ("model.mixers.softmax.qk_norm=true",),
     ("model.n_kv_heads=1",), ("model.head_dim=16",)],
)  # fmt: skip
def test_forward_shape_and_dtype(tokens, extra):
    model = models.build(small(*extra), nnx.Rngs(params=0))
    logits = model(tokens)
    assert logits.shape == (2, 12, 64) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize("extra", [(), ("model.mixers.softmax.qk_norm=true", "model.n_kv_heads=1")])
def test_decode_equals_forward(tokens, extra):
    """Prefill 5 tokens, then decode the rest one at a time: same logits as one full pass."""
    model = models.build(small(*extra), 0)
    full = model(tokens)
    cache = model.init_cache(2, 16)
    pre, cache = model(tokens[:, :5], cache=cache)
    steps = [pre]
    for t in range(5, tokens.shape[1]):
        out, cache = model(tokens[:, t : t + 1], cache=cache)
        steps.append(out)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, **TOL)
    assert int(cache[0]["end"]) == tokens.shape[1]


def test_causal_by_gradient(tokens):
    """d logits_t / d embedding_s = 0 for s > t."""
    model = models.build(small(), 0)
    emb = model.embed[...]
    t = 6

    def out_t(x):
        logits = _forward_from_embeddings(model, x)
        return jnp.sum(logits[:, t])

    x = jnp.take(emb, tokens, axis=0)
    g = jax.grad(out_t)(x)
    assert float(jnp.max(jnp.abs(g[:, t + 1 :]))) == 0.0
    assert float(jnp.max(jnp.abs(g[:, : t + 1]))) > 0.0


def _forward_from_embeddings(model, x_BTD):
    pos = jnp.broadcast_to(jnp.arange(x_BTD.shape[1]), x_BTD.shape[:2])
    for blk in model.blocks:
        x_BTD, _ = blk(x_BTD, positions_BT=pos)
    return model.final_norm(x_BTD) @ model.head[...]


def test_packed_segments_do_not_interact(tokens):
    """Two documents packed in one row give the logits each gets alone."""
    model = models.build(small(), 0)
    a, b = tokens[0, :7], tokens[1, :5]
    packed = jnp.concatenate([a, b])[None]
    seg = jnp.array([[1] * 7 + [2] * 5])
    pos = jnp.array([list(range(7)) + list(range(5))])
    out = model(packed, positions_BT=pos, segment_ids_BT=seg)
    np.testing.assert_allclose(out[0, :7], model(a[None])[0], **TOL)
    np.testing.assert_allclose(out[0, 7:], model(b[None])[0], **TOL)


def test_bf16_compute_keeps_float32_params_and_logits(tokens):
    model = models.build(small("model.dtype=bfloat16"), 0)
    assert model.embed[...].dtype == jnp.float32
    logits = model(tokens)
    assert logits.dtype == jnp.float32
    ref = models.build(small(), 0)(tokens)
    # bf16 activations: ~3 significant digits through two layers.
    np.testing.assert_allclose(logits, ref, atol=5e-2)


def test_split_merge_round_trip(tokens):
    cfg = config.load("default", ["model.n_layers=1", "model.d_model=32", "model.n_heads=4",
                                  "model.d_ff=32", "model.vocab_size=64"])  # fmt: skip
    split = Model.create(cfg)
    model = models.build(cfg.model, 3)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    merged = split.merge(params)
    np.testing.assert_array_equal(merged(tokens), model(tokens))
    assert split.axes["embed"] == ("vocab", "embed")
    assert split.axes["blocks"][0]["mixer"]["wq"] == ("embed", "heads", "head_dim")


def test_flops_per_token_counts_matmuls_and_attention():
    cfg = small()
    model = models.build(cfg, 0)
    counts = models.param_count(model)
    f = models.flops_per_token(cfg, counts["total"], counts["embedding"], seq_len=16)
    matmul = counts["total"] - counts["embedding"]
    attn = 2 * 2 * 2 * 16 * 4 * 8 * 0.5  # layers · (QK, PV) · 2 flops · T · H · K · causal half
    assert f == pytest.approx(3 * (2 * matmul + attn))
