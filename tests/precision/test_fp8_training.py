"""Tiny models trained with FP8 projections track the bf16 loss curve; the delayed-scaling
state lives in the train state, is updated by the step and survives a checkpoint."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.parallel.core.mesh import make_mesh
from jaxllm.training.checkpoint import Checkpointer
from jaxllm.training.state import Trainer
from jaxllm.training.step import make_train_step
from tests.helpers import tiny

STEPS = 12


def _batches(n, b=8, t=32, vocab=64, seed=0):
    """Rows of an arithmetic progression mod `vocab` (random start and stride): learnable."""
    r = np.random.default_rng(seed)
    for _ in range(n):
        start = r.integers(0, vocab, (b, 1))
        stride = r.integers(1, 4, (b, 1))
        seq = (start + stride * np.arange(t + 1)) % vocab
        yield {
            "inputs": seq[:, :-1].astype(np.int32),
            "targets": seq[:, 1:].astype(np.int32),
            "segment_ids": np.ones((b, t), np.int32),
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
            "loss_mask": np.ones((b, t), np.float32),
        }


def _run(*overrides, steps=STEPS):
    cfg = tiny("model.dtype=bfloat16", "optim.warmup_steps=2", f"train.steps={steps}", *overrides)
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    trainer = Trainer.create(cfg, mesh)
    step = make_train_step(trainer)
    state = trainer.init_state(0)
    losses = []
    for batch in _batches(steps):
        state, m = step(state, jax.device_put(batch, trainer.batch_sharding))
        losses.append(float(m["loss"]))
    return np.array(losses), state, trainer


@pytest.fixture(scope="module")
def bf16_curve():
    return _run()[0]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["current", "delayed", "blockwise"])
def test_fp8_tracks_the_bf16_loss_curve(mode, bf16_curve):
    losses, state, _ = _run(f"precision.fp8={mode}")
    assert bf16_curve[-1] < bf16_curve[0] - 0.5  # the curve being tracked does fall
    # Tolerance 2% of the loss at every step: E4M3/E5M2 rounding perturbs each projection by
    # ~4% RMS relative noise, which moves a 12-step loss by well under 1% (DeepSeek-V3 reports
    # < 0.25% at scale); a wrong scale (off by the format max, a missing dequantization) or
    # E5M2 in the forward moves it far more. The step-0 loss is the forward alone.
    rel = np.abs(losses - bf16_curve) / bf16_curve
    assert rel.max() < 0.02, rel
    assert not np.array_equal(losses, bf16_curve)  # FP8 really ran
    if mode == "delayed":
        fp8 = state["fp8_state"]
        assert len(fp8) == 2 * 7  # q, k, v, o, gate, up, down per layer
        for entry in fp8.values():
            for role in ("x", "w", "dy"):
                assert float(entry[role]["scale"]) != 1.0
                assert float(jnp.max(entry[role]["history"])) > 0


def test_delayed_state_microbatches_and_checkpoint(tmp_path):
    f32 = "model.dtype=float32"
    _, state1, trainer = _run("precision.fp8=delayed", f32, steps=1)
    _, state2, _ = _run("precision.fp8=delayed", "train.microbatches=2", f32, steps=1)
    # micro-batches record the max of their amaxes = the whole batch's amax (float32: the
    # two backward passes agree to rounding)
    for a, b in zip(jax.tree.leaves(state1["fp8_state"]), jax.tree.leaves(state2["fp8_state"])):
        np.testing.assert_allclose(a, b, rtol=1e-5)
    ckpt = Checkpointer(tmp_path / "ckpt", keep=1, async_save=False)
    ckpt.save(3, state1, None, {"step": 3})
    restored, _ = ckpt.restore(3, trainer.abstract_state())
    ckpt.close()
    for a, b in zip(jax.tree.leaves(state1["fp8_state"]), jax.tree.leaves(restored["fp8_state"])):
        np.testing.assert_array_equal(a, b)
