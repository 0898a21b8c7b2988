"""What the train step logs: `z_loss` only when the z-loss is part of the objective."""

import jax
import numpy as np
import pytest

from jaxllm.parallel.core.mesh import make_mesh
from jaxllm.training.state import Trainer
from jaxllm.training.step import make_train_step
from tests.helpers import tiny


@pytest.mark.parametrize("weight", [0.0, 1e-3])
def test_z_loss_logged_only_with_a_weight(weight):
    cfg = tiny("model.n_layers=1", "train.steps=1", f"train.z_loss={weight}")
    trainer = Trainer.create(
        cfg, make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    )
    b, t = cfg.data.batch_size, cfg.data.seq_len
    tokens = np.arange(b * (t + 1), dtype=np.int32).reshape(b, t + 1) % 200
    batch = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": np.ones((b, t), np.int32),
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
        "loss_mask": np.ones((b, t), np.float32),
    }
    _, metrics = make_train_step(trainer)(
        trainer.init_state(0), jax.device_put(batch, trainer.batch_sharding)
    )
    if weight > 0:
        assert float(metrics["z_loss"]) > 0  # mean log(Z)² of the untrained model
    else:
        assert "z_loss" not in metrics
    assert "loss" in metrics
