"""Checkpoints through orbax: train state, data-iterator state and run metadata together.

Saves are asynchronous; orbax writes each step into a temporary folder and renames it when
complete, so `latest_step()` never returns a half-written checkpoint. `load_params_for_sampling`
reads a finished run's newest parameters back (for `jaxllm.generate` and `jaxllm.convert`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from jaxllm import choices
from jaxllm import config as config_lib
from jaxllm.config import ConfigError
from jaxllm.parallel.core.mesh import make_mesh
from jaxllm.training.state import Trainer


class Checkpointer:
    def __init__(self, directory: Path, *, keep: int, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                enable_async_checkpointing=async_save,
                create=True,
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iter: Any | None, meta: dict) -> None:
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(
        self, step: int, abstract_state: Any, data_iter: Any | None = None
    ) -> tuple[Any, dict]:
        """Restore onto the shardings of `abstract_state`; `data_iter` is advanced in place."""
        items = {
            "state": ocp.args.StandardRestore(abstract_state),
            "meta": ocp.args.JsonRestore(),
        }
        data_dir = self.directory / str(step) / "data"
        own = data_dir / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if data_iter is not None and own.exists():
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        if data_iter is not None and not own.exists():
            # Saved by another number of processes: every process's iterator state holds the
            # same global batch index (jaxllm.data.pipeline deals round-robin), so any one fits.
            saved = sorted(data_dir.glob("process_*-of-*.json"))
            if not saved:
                raise FileNotFoundError(f"no data-iterator state in {data_dir}")
            data_iter.set_state(json.loads(saved[0].read_text()))
        return out["state"], out["meta"]

    def restore_params(self, step: int, abstract_state: Any) -> Any:
        """Only the train state (no data iterator), e.g. for sampling from a run."""
        out = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        )
        return out["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def load_params_for_sampling(run_dir: Path):
    """(config, trainer, params, step) of a run's newest checkpoint, on one local device."""
    cfg = config_lib.load(str(run_dir / "config.yaml"), ())
    choices.check(cfg)
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.local_devices()[:1])
    trainer = Trainer.create(cfg, mesh)
    # Reading only: a run trained with train.resume=never keeps its checkpoints here.
    ckpt = Checkpointer(run_dir / "checkpoints", keep=cfg.checkpoint.keep)
    step = ckpt.latest_step()
    if step is None:
        raise ConfigError(f"{run_dir}: no checkpoint to sample from")
    state = ckpt.restore_params(step, trainer.abstract_state())
    ckpt.close()
    return cfg, trainer, state["params"], step
