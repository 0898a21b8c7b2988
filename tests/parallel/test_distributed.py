"""Multi-process training on localhost: 2 processes × 4 CPU devices train and checkpoint; a
1-process × 8-device run restores that checkpoint and continues with the losses an
uninterrupted 1-process run has (same global batches: the data is dealt round-robin)."""

import json
import os
import socket
import subprocess
import sys

import pytest

from jaxllm.parallel.core import distributed

ARGS = [
    "default", "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
    "model.d_ff=64", "model.vocab_size=260", "model.max_seq_len=64", "model.dtype=float32",
    "data.seq_len=32", "data.batch_size=8", "optim.lr=3e-3", "optim.warmup_steps=2",
    "train.eval_batches=2", "train.sample_lines=0", "logging.tensorboard=false",
    "logging.plot=false", "logging.progress=lines", "logging.every=1", "train.eval_every=100",
    "parallel.mesh.fsdp=2", "checkpoint.async_save=false", "train.steps=6",
]  # fmt: skip
# Rounding: the processes' shards of a batch are summed in another order than one process's.
LOSS_TOL = 1e-5


def _run(run_dir, *extra, n_proc=1):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "jaxllm.train", *ARGS, f"train.run_dir={run_dir}", *extra]
    if n_proc == 1:
        procs = [subprocess.Popen([*cmd, "--local-devices", "8"], env=env)]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = [
            subprocess.Popen(
                [
                    *cmd,
                    "--coordinator",
                    f"127.0.0.1:{port}",
                    "--num-processes",
                    str(n_proc),
                    "--process-id",
                    str(i),
                    "--local-devices",
                    str(8 // n_proc),
                ],
                env=env,
            )
            for i in range(n_proc)
        ]
    assert [p.wait(timeout=600) for p in procs] == [0] * n_proc


def _losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


@pytest.mark.slow
def test_two_processes_save_one_process_resumes(tmp_path):
    _run(tmp_path / "multi", "train.stop_at=4", n_proc=2)
    assert sorted(p.name for p in (tmp_path / "multi" / "checkpoints").iterdir()) == ["4"]
    first = _losses(tmp_path / "multi")
    _run(tmp_path / "multi")  # resumes at step 4 with 8 devices in one process
    _run(tmp_path / "single")
    ref, resumed = _losses(tmp_path / "single"), _losses(tmp_path / "multi")
    assert sorted(first) == [1, 2, 3, 4] and sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in ref:
        assert resumed[step] == pytest.approx(ref[step], abs=LOSS_TOL, rel=LOSS_TOL), step


def test_cluster_from_flags_and_env(monkeypatch):
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    c, rest = distributed.pop_flags(["default", "--process-id=2", "x=1"])
    assert (c.coordinator, c.num_processes, c.process_id, c.multi) == ("10.0.0.1:1234", 4, 2, True)
    assert rest == ["default", "x=1"]
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS")
    with pytest.raises(ValueError, match="coordinator"):
        distributed.from_env()
    monkeypatch.setenv("JAX_NUM_PROCESSES", "1")
    assert not distributed.from_env().multi
