"""`python -m jaxllm.train` and `python -m jaxllm.generate` as a user runs them."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import tiny

TINY = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
    "model.d_ff=64", "model.vocab_size=260", "model.max_seq_len=128", "model.dtype=float32",
    "data.seq_len=32", "data.batch_size=4", "optim.warmup_steps=2", "train.eval_batches=1",
    "logging.tensorboard=false", "logging.plot=false", "logging.progress=lines",
]  # fmt: skip


def run(args, cwd, timeout=300, **kw):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1"}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=timeout, **kw,
    )  # fmt: skip


def test_help_lists_presets_and_keys(tmp_path):
    out = run(["-m", "jaxllm.train", "--help"], tmp_path)
    assert out.returncode == 0
    for word in ("default", "llama-7b", "train.steps", "parallel.mesh.fsdp", "softmax"):
        assert word in out.stdout


def test_print_config_from_any_directory(tmp_path):
    out = run(["-m", "jaxllm.train", "llama-1b", "train.steps=5", "--print-config"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "n_kv_heads: 4" in out.stdout and "steps: 5" in out.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train.stepz=5"], "unknown key 'train.stepz'"),
        (["no-such-preset"], "unknown preset"),
        (["model.n_heads=3"], "n_heads=3 must divide"),
        (["parallel.mesh.data=2"], "parallel.mesh"),
        (["data.source=text", "data.path=/nonexistent/x.txt"], "/nonexistent/x.txt"),
        (["--bogus"], "unknown option"),
    ],
)
def test_user_errors_exit_2_with_one_line(tmp_path, args, message):
    out = run(["-m", "jaxllm.train", *args, f"train.run_dir={tmp_path / 'r'}"], tmp_path)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.stderr
    assert "Traceback" not in out.stderr


def test_train_then_generate_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    out = run(["-m", "jaxllm.train", *TINY, "train.steps=6", "logging.every=2",
               "train.eval_every=3", "train.sample_lines=1", "train.sample_tokens=20",
               f"train.run_dir={run_dir}"], tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "samples:" in out.stdout
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6]
    assert [r["step"] for r in records if "val_loss" in r] == [3, 6]
    gen = run(["-m", "jaxllm.generate", str(run_dir), "--prompt", "import ",
               "--max-new-tokens", "16", "--top-p", "0.9"], tmp_path)  # fmt: skip
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert gen.stdout.startswith("import ")


def _wait_for(pred, proc, timeout=240):
    t0 = time.time()
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(f"exited early: {proc.stderr.read()[-3000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.2)


def _popen(args, cwd):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1"}
    return subprocess.Popen([sys.executable, "-m", "jaxllm.train", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(x)["step"] for x in path.read_text().splitlines() if '"loss"' in x]


def _checkpoints(run_dir: Path) -> list[int]:
    d = run_dir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def test_sigterm_saves_and_exits_0(tmp_path):
    run_dir = tmp_path / "run"
    proc = _popen([*TINY, "train.steps=100000", "logging.every=1", "checkpoint.every=0",
                   "train.eval_every=0", f"train.run_dir={run_dir}"], tmp_path)  # fmt: skip
    _wait_for(lambda: len(_steps(run_dir)) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "stopping on signal" in out
    ckpts = _checkpoints(run_dir)
    assert ckpts and ckpts[-1] >= 2
    # Resuming continues from there.
    cfg = tiny(f"train.run_dir={run_dir}")
    assert cfg.run_dir == run_dir


@pytest.mark.slow
def test_sigkill_after_checkpoint_resumes_bit_exact(tmp_path):
    """Kill -9 right after a checkpoint lands; the resumed run equals an uninterrupted one."""
    common = [*TINY, "train.steps=60", "logging.every=1", "checkpoint.every=5",
              "train.eval_every=0", "train.sample_lines=0", "checkpoint.keep=20"]  # fmt: skip
    ref = tmp_path / "ref"
    assert run(["-m", "jaxllm.train", *common, f"train.run_dir={ref}"], tmp_path).returncode == 0
    killed = tmp_path / "killed"
    proc = _popen([*common, f"train.run_dir={killed}"], tmp_path)
    _wait_for(lambda: _checkpoints(killed), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    at_kill = _checkpoints(killed)[-1]
    assert at_kill < 60, "the run finished before it could be killed"
    out = run(["-m", "jaxllm.train", *common, f"train.run_dir={killed}"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed at step {at_kill}" in out.stdout
    ref_lines = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    new_lines = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    key = lambda rs: [(r["step"], r.get("loss"), r.get("val_loss")) for r in rs]
    assert key(ref_lines) == key(new_lines)
