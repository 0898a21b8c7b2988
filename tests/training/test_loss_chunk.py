"""`train.loss_chunk`: the head and the loss over chunks of positions give the loss and the
gradients of whole rows (z-loss, masks and a T that the chunk does not divide included), and
the train step holds no [B, T, V] logits when it is on."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.models.decoder import head_logits
from jaxllm.parallel.core.mesh import make_mesh
from jaxllm.training.state import Trainer
from jaxllm.training.step import _forward_loss, chunked_cross_entropy, cross_entropy, loss_chunk
from tests.helpers import tiny


@pytest.mark.parametrize("chunk", [8, 12])  # 12 leaves a padded last chunk of T = 30
def test_chunked_cross_entropy_equals_whole_rows(chunk):
    b, t, d, v = 2, 30, 16, 50
    kx, kw, kt, km = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(kx, (b, t, d))
    w = jax.random.normal(kw, (d, v)) / 4
    targets = jax.random.randint(kt, (b, t), 0, v)
    mask = (jax.random.uniform(km, (b, t)) > 0.2).astype(jnp.float32)

    def whole(x, w):
        return cross_entropy(head_logits(x, w), targets, mask, 1e-2)

    def chunked(x, w):
        return chunked_cross_entropy(x, w, targets, mask, 1e-2, chunk)

    np.testing.assert_allclose(chunked(x, w), whole(x, w), rtol=1e-6)
    g_whole = jax.grad(lambda x, w: whole(x, w)[0], argnums=(0, 1))(x, w)
    g_chunked = jax.jit(jax.grad(lambda x, w: chunked(x, w)[0], argnums=(0, 1)))(x, w)
    for a, e in zip(g_chunked, g_whole):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tied", [False, True])
def test_forward_loss_with_chunks_equals_whole_rows(tied):
    overrides = ["train.z_loss=1e-3", f"model.tie_embeddings={str(tied).lower()}"]
    mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
    trainers = {c: Trainer.create(tiny(*overrides, f"train.loss_chunk={c}"), mesh) for c in (0, 8)}
    params = trainers[0].init_state(0)["params"]
    b, t = 2, 32
    tokens = jax.random.randint(jax.random.key(1), (b, t + 1), 0, 256)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "segment_ids": jnp.ones((b, t), jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
             "loss_mask": jnp.ones((b, t), jnp.float32)}  # fmt: skip
    out = {}
    for c, trainer in trainers.items():
        assert loss_chunk(trainer, t) == c
        fn = lambda p, trainer=trainer: _forward_loss(trainer, p, batch)[0]
        out[c] = jax.jit(jax.value_and_grad(fn))(params)
        # the [B, T, V] logits appear only without chunks
        text = jax.jit(jax.grad(fn)).lower(params).as_text()
        assert (f"tensor<{b}x{t}x260xf32>" in text) == (c == 0)
    np.testing.assert_allclose(out[8][0], out[0][0], rtol=1e-6)
    for a, e in zip(jax.tree.leaves(out[8][1]), jax.tree.leaves(out[0][1])):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-6)


def test_loss_chunk_is_off_where_it_cannot_apply():
    cfg = tiny("train.loss_chunk=16")
    one = Trainer.create(cfg, make_mesh({"data": 1}, devices=jax.devices()[:1]))
    assert loss_chunk(one, 32) == 16 and loss_chunk(one, 16) == 0  # a chunk covering the row
    sp = Trainer.create(cfg, make_mesh({"data": 1, "sequence": 2}, devices=jax.devices()[:2]))
    assert loss_chunk(sp, 32) == 0  # the mesh splits the sequence
