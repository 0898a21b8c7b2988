"""Each attention variant against a plain JAX transcription of its published equations (and,
for DAPE, of the authors' code), forward and gradients, on random inputs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm.layers import registry
from jaxllm.layers.clla import dequantize, fake_quant, pack_int4, quantize, unpack_int4
from jaxllm.layers.norms import rms_norm
from jaxllm.layers.positions import rope
from jaxllm.ops.attention import attention_reference

FWD = dict(rtol=1e-5, atol=1e-5)  # float32, different operation order
GRAD = dict(rtol=1e-4, atol=1e-5)
DIMS = dict(d_model=24, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=32, n_layers=2,
            dtype="float32")  # fmt: skip


def build(name, layer_index=0, **opts):
    entry = registry.mixer(name)
    cfg = entry.config_cls(**DIMS, layer_index=layer_index, **opts)
    return entry.cls(cfg, rngs=nnx.Rngs(params=7))


def x_BTD(t=11, seed=0):
    return jax.random.normal(jax.random.key(seed), (2, t, DIMS["d_model"]))


def pos(t):
    return jnp.broadcast_to(jnp.arange(t), (2, t))


def compare(layer_fn, ref_fn, *xs, rows=slice(None)):
    """Forward and d(Σ out·ct)/d inputs of a layer against its transcription."""
    out, ref = jax.jit(layer_fn)(*xs), jax.jit(ref_fn)(*xs)
    np.testing.assert_allclose(out[:, rows], ref[:, rows], **FWD)
    # Only the compared rows carry a cotangent.
    keep = jnp.zeros(out.shape[1]).at[rows].set(1.0)
    ct = jax.random.normal(jax.random.key(5), out.shape) * keep[None, :, None]
    g = jax.jit(jax.grad(lambda *a: jnp.sum(layer_fn(*a) * ct), argnums=tuple(range(len(xs)))))
    g_ref = jax.jit(jax.grad(lambda *a: jnp.sum(ref_fn(*a) * ct), argnums=tuple(range(len(xs)))))
    for a, b in zip(g(*xs), g_ref(*xs)):
        np.testing.assert_allclose(a, b, **GRAD)


def proj(layer, x):
    q = jnp.einsum("btd,dhk->bthk", x, layer.wq[...])
    k = jnp.einsum("btd,dgk->btgk", x, layer.wk[...])
    v = jnp.einsum("btd,dgk->btgk", x, layer.wv[...])
    return q, jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)


# ------------------------------------------------------------------------------------ DAPE


def alibi_slopes(n):
    """Press et al.'s `get_slopes`, as in the ALiBi and DAPE repositories."""

    def p2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n).is_integer():
        return p2(n)
    c = 2 ** math.floor(math.log2(n))
    return p2(c) + alibi_slopes(2 * c)[0::2][: n - c]


def dape_reference(layer, x, conv, right_pad=0):
    """`AliBi_DAPE` / `Alibi_DAPEV2` forward: S = qkᵀ/√d, B = ALiBi, S + B + f([S, B]) with f a
    per-position MLP over heads or Conv2d(1×k, padding k//2) on tril([S, B]), then the causal
    softmax. `right_pad` extra zero key columns (0 = the authors' T×T array)."""
    q, k, v = proj(layer, x)
    t, h = x.shape[1], q.shape[2]
    s = jnp.einsum("bthk,bshk->bhts", q, k) / math.sqrt(q.shape[-1])
    i, j = np.arange(t)[:, None], np.arange(t)[None]
    bias = -np.asarray(alibi_slopes(h))[:, None, None] * np.abs(i - j)[None]
    feats = jnp.concatenate([s, jnp.broadcast_to(bias, s.shape)], axis=1)
    causal = j <= i
    w1, b1, w2, b2 = (p[...] for p in (layer.f1, layer.f1_b, layer.f2, layer.f2_b))
    if conv:
        feats = jnp.pad(jnp.where(causal, feats, 0.0), [(0, 0)] * 3 + [(0, right_pad)])
        taps = w1.shape[0]

        def conv2d(z, w, b):  # torch Conv2d(kernel (1, k), padding (0, k//2)), NCHW / OIHW
            w_OIHW = jnp.transpose(w, (2, 1, 0))[:, :, None, :]
            y = jax.lax.conv_general_dilated(
                z, w_OIHW, (1, 1), ((0, 0), (taps // 2, taps // 2)),
                dimension_numbers=("NCHW", "OIHW", "NCHW"),
                precision=jax.lax.Precision.HIGHEST,
            )  # fmt: skip
            return y + b[None, :, None, None]

        f = conv2d(jax.nn.leaky_relu(conv2d(feats, w1, b1), 0.01), w2, b2)[..., :t]
    else:
        hid = jax.nn.leaky_relu(jnp.einsum("bits,io->bots", feats, w1[0]) + b1[:, None, None], 0.01)
        f = jnp.einsum("bits,io->bots", hid, w2[0]) + b2[:, None, None]
    logits = jnp.where(causal, s + bias + f, -jnp.inf)
    o = jnp.einsum("bhts,bshv->bthv", jax.nn.softmax(logits, axis=-1), v)
    return jnp.einsum("bthk,hkd->btd", o, layer.wo[...])


@pytest.mark.parametrize("name", ["dape", "dape2"])
def test_dape_matches_authors_code(name):
    layer = build(name, bias="alibi", mlp_width=16)
    fn = lambda x: layer(x, positions_BT=pos(x.shape[1]))[0]
    conv = name == "dape2"
    if conv:
        # The authors' T×T conv reads zero padding past the last key; ours computes those two
        # columns (so a row does not depend on the array's length, see dape.py): the rows agree
        # except the last, and every row agrees with the padded form.
        compare(
            fn, lambda x: dape_reference(layer, x, conv, right_pad=0), x_BTD(), rows=slice(0, 10)
        )
        compare(fn, lambda x: dape_reference(layer, x, conv, right_pad=2), x_BTD())
    else:
        compare(fn, lambda x: dape_reference(layer, x, conv), x_BTD())


def test_alibi_slopes_match_press_et_al():
    from jaxllm.layers.dape import alibi_slopes as ours

    for h in (4, 6, 8, 12):
        np.testing.assert_allclose(ours(h), alibi_slopes(h), rtol=1e-6)


# -------------------------------------------------------------------------------- Infini


def infini_reference(layer, x, n, kind):
    """Segment by segment, token by token: causal softmax within the segment, retrieval
    σ(q)M/(σ(q)z + ε) from the memory before the segment, then the linear / delta update;
    A = sig(β)·A_mem + (1 − sig(β))·A_dot. Only q/k get RoPE (the layer's default)."""
    q, k, v = proj(layer, x)
    t = x.shape[1]
    q, k = rope(q, pos(t)), rope(k, pos(t))
    sg = lambda z: jax.nn.elu(z) + 1
    b, _, h, d = q.shape
    m = jnp.zeros((b, h, d, d))
    z = jnp.zeros((b, h, d))
    gate = jax.nn.sigmoid(layer.beta[...])[None, :, None]
    outs = []
    for s0 in range(0, t, n):
        for i in range(s0, min(s0 + n, t)):
            sc = jnp.einsum("bhk,bshk->bhs", q[:, i], k[:, s0 : i + 1]) / math.sqrt(d)
            a_dot = jnp.einsum("bhs,bshv->bhv", jax.nn.softmax(sc, -1), v[:, s0 : i + 1])
            sq = sg(q[:, i])
            a_mem = jnp.einsum("bhk,bhkv->bhv", sq, m) / (
                jnp.einsum("bhk,bhk->bh", sq, z)[..., None] + 1e-6
            )
            outs.append(gate * a_mem + (1 - gate) * a_dot)
        sk, vs = sg(k[:, s0 : s0 + n]), v[:, s0 : s0 + n]
        if kind == "delta":
            vs = vs - jnp.einsum("bshk,bhkv->bshv", sk, m) / (
                jnp.einsum("bshk,bhk->bsh", sk, z)[..., None] + 1e-6
            )
        m = m + jnp.einsum("bshk,bshv->bhkv", sk, vs)
        z = z + jnp.sum(sk, axis=1)
    o = jnp.stack(outs, axis=1)
    return jnp.einsum("bthk,hkd->btd", o, layer.wo[...])


@pytest.mark.parametrize("kind", ["linear", "delta"])
def test_infini_matches_equations(kind):
    layer = build("infini", segment_len=4, update=kind, impl="reference")
    # A non-zero gate, so both terms matter.
    layer.beta[...] = jnp.array([-1.0, 0.0, 0.5, 2.0])
    fn = lambda x: layer(x, positions_BT=pos(x.shape[1]))[0]
    compare(fn, lambda x: infini_reference(layer, x, 4, kind), x_BTD())


# ----------------------------------------------------------------------------------- CLA


def test_cla_consumer_reuses_raw_kv_with_its_own_norm_and_rope():
    opts = dict(qk_norm=True, qk_norm_position="after_rope", impl="reference")
    prod, cons = build("cla", 0, **opts), build("cla", 1, **opts)

    def layers(x0, x1):
        carry = {}
        y0, _ = prod(x0, positions_BT=pos(11), carry=carry)
        y1, _ = cons(x1, positions_BT=pos(11), carry=carry)
        return jnp.concatenate([y0, y1], axis=-1)

    def reference(x0, x1):
        k_raw = jnp.einsum("btd,dgk->btgk", x0, prod.wk[...])
        v = jnp.einsum("btd,dgk->btgk", x0, prod.wv[...])
        ys = []
        for layer, x in ((prod, x0), (cons, x1)):
            # Hunyuan: k = k_layernorm_l(rope(k_proj(x_producer))) for every layer of the group.
            q = rms_norm(rope(jnp.einsum("btd,dhk->bthk", x, layer.wq[...]), pos(11)),
                         layer.q_norm[...], 1e-5)  # fmt: skip
            k = rms_norm(rope(k_raw, pos(11)), layer.k_norm[...], 1e-5)
            o = attention_reference(q, k, v)
            ys.append(jnp.einsum("bthk,hkd->btd", o, layer.wo[...]))
        return jnp.concatenate(ys, axis=-1)

    # Different norm scales per layer, so that untied norms are visible.
    cons.k_norm[...] = 1 + 0.5 * jax.random.normal(jax.random.key(3), (8,))
    compare(layers, reference, x_BTD(seed=1), x_BTD(seed=2))


# ---------------------------------------------------------------------------------- CLLA


def test_quantize_int4_and_int8():
    c = jax.random.normal(jax.random.key(0), (2, 5, 32)) * 3
    for bits, qmax in (("int8", 127), ("int4", 7)):
        codes, scale = quantize(c, bits, 8)
        assert codes.dtype == jnp.int8 and scale.dtype == jnp.float16
        assert int(jnp.max(jnp.abs(codes))) == qmax
        err = jnp.abs(dequantize(codes, scale, 8) - c).reshape(2, 5, 4, 8)
        # Round to nearest: at most half a step (the float16 scale's rounding adds ≤ 2^-11).
        step = scale.astype(jnp.float32)[..., None]
        assert bool(jnp.all(err <= 0.5 * step * (1 + 2**-10) + 1e-6))
    codes = jnp.arange(-8, 8, dtype=jnp.int8).reshape(1, 1, 16)
    packed = pack_int4(codes)
    assert packed.shape == (1, 1, 8) and packed.dtype == jnp.uint8
    np.testing.assert_array_equal(unpack_int4(packed), codes)


def test_fake_quant_is_straight_through():
    c = jax.random.normal(jax.random.key(0), (2, 5, 32))
    w = jax.random.normal(jax.random.key(1), (2, 5, 32))
    g = jax.grad(lambda c: jnp.sum(fake_quant(c, "int4", 8) * w))(c)
    np.testing.assert_array_equal(g, w)
    np.testing.assert_allclose(fake_quant(c, "int4", 8), dequantize(*quantize(c, "int4", 8), 8))


def test_clla_matches_equations():
    opts = dict(latent_dim=16, rope_dim=4, quant="int4", quant_group=4, impl="reference")
    prod, cons = build("clla", 0, **opts), build("clla", 1, **opts)

    def layers(x0, x1):
        carry = {}
        y0, _ = prod(x0, positions_BT=pos(11), carry=carry)
        y1, _ = cons(x1, positions_BT=pos(11), carry=carry)
        return jnp.concatenate([y0, y1], axis=-1)

    def reference(x0, x1):
        lat = x0 @ prod.w_dkv[...]
        c = jnp.concatenate(
            [rms_norm(lat[..., :16], prod.latent_norm[...], 1e-5), lat[..., 16:]], -1
        )
        # int4 with one scale per 4 channels, straight-through: forward = dequantised codes.
        g = c.reshape(2, 11, 5, 4)
        scale = (jnp.maximum(jnp.max(jnp.abs(g), -1, keepdims=True) / 7, 1e-4)).astype(jnp.float16)
        scale = scale.astype(jnp.float32)
        deq = (jnp.clip(jnp.round(g / scale), -7, 7) * scale).reshape(2, 11, 20)
        c = c + jax.lax.stop_gradient(deq - c)
        k_r = rope(c[:, :, None, 16:], pos(11))
        ys = []
        for layer, x in ((prod, x0), (cons, x1)):
            q = jnp.einsum("btd,dhk->bthk", x, layer.wq[...])
            q = jnp.concatenate([q[..., :8], rope(q[..., 8:], pos(11))], -1)
            k = jnp.einsum("bsc,cgk->bsgk", c[..., :16], layer.w_uk[...])
            k = jnp.concatenate([k, jnp.broadcast_to(k_r, (2, 11, 2, 4))], -1)
            v = jnp.einsum("bsc,cgk->bsgk", c[..., :16], layer.w_uv[...])
            o = attention_reference(q, k, v)  # softmax(q·kᵀ/√(8 + 4)) v
            ys.append(jnp.einsum("bthk,hkd->btd", o, layer.wo[...]))
        return jnp.concatenate(ys, axis=-1)

    compare(layers, reference, x_BTD(seed=1), x_BTD(seed=2))


def test_kerple_and_fire_biases_follow_their_formulas():
    from jaxllm.layers.dape import DAPEConfig, PositionalBias

    qpos, kpos = jnp.arange(7)[None], jnp.arange(7)[None]
    i, j = np.arange(7)[:, None], np.arange(7)[None]
    kerple = PositionalBias(DAPEConfig(**DIMS, bias="kerple"), rngs=nnx.Rngs(params=0))
    # Kerple-log (Chi et al. 2205.09921): -p·log(1 + a·|i - j|), p and a clamped at 1e-2 as in
    # the authors' `ParallelKerpleLog`.
    p = np.maximum(np.asarray(kerple.p[...]), 1e-2)[:, None, None]
    a = np.maximum(np.asarray(kerple.a[...]), 1e-2)[:, None, None]
    np.testing.assert_allclose(kerple(qpos, kpos)[0], -p * np.log1p(a * np.abs(i - j)), **FWD)
    fire = PositionalBias(DAPEConfig(**DIMS, bias="fire", fire_init_L=4.0), rngs=nnx.Rngs(params=0))
    c = float(fire.c[...])
    psi = lambda x: np.log(c * x + 1)
    # FIRE (Li et al. 2310.04418): f_θ(ψ(i - j) / ψ(max(L, i))), f_θ a 1→W→H ReLU MLP.
    u = (psi(np.maximum(i - j, 0)) / psi(np.maximum(4.0, i)))[..., None]
    hid = np.maximum(u @ np.asarray(fire.w1[...]) + np.asarray(fire.b1[...]), 0)
    want = np.moveaxis(hid @ np.asarray(fire.w2[...]), -1, 0)
    np.testing.assert_allclose(fire(qpos, kpos)[0], want, **FWD)


def test_infini_packed_documents_do_not_see_each_other():
    """With segment ids, no output of one document depends on another document's tokens —
    through the segment softmax or through the memory."""
    layer = build("infini", segment_len=4)
    layer.beta[...] = jnp.zeros(4)
    # Documents of 6, 7 and 4 tokens: boundaries inside segments and on a segment's edge.
    seg = jnp.broadcast_to(jnp.array([1] * 6 + [2] * 6 + [3] * 5), (2, 17))
    x = x_BTD(t=17)

    def doc_out(x, d):
        y = layer(x, positions_BT=pos(17), segment_ids_BT=seg)[0]
        return jnp.sum(y * (seg == d)[..., None])

    for d in (1, 2, 3):
        g = jax.jit(jax.grad(doc_out), static_argnums=1)(x, d)
        other = (seg != d)[..., None]
        assert float(jnp.max(jnp.abs(jnp.where(other, g, 0.0)))) == 0.0
        assert float(jnp.max(jnp.abs(jnp.where(other, 0.0, g)))) > 0.0
