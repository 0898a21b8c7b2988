"""Every preset in configs/ runs from the command line to its end: `python -m jaxllm.train
PRESET train.steps=2` exits 0 after printing its samples, and `python -m jaxllm.generate RUN`
samples from what it saved (both through their `main`, in this process: the same code path as
the console, without paying for a new interpreter and jax import per preset).

Each preset is shrunk to CPU size by overrides that keep what makes it itself: its mixers,
channel mixers, routers, precision, remat, micro-batches, scan and the parallel axes it names
(resized to 8 devices). The default suite runs one preset per family; the rest are `slow`.
"""

from __future__ import annotations

import pytest

from jaxllm import config
from jaxllm.generate import main as generate_main
from jaxllm.train import main as train_main

# One per family: dense softmax with fsdp + micro-batches + scan, MoE dropless over an expert
# axis, CLA with shared + routed capacity experts and recycling, a linear/softmax hybrid, and
# HGRN2's gated linear recurrence.
FAST = {"llama-7b", "mixtral-tiny", "hunyuan-large-tiny", "hybrid-tiny", "hgrn2-tiny"}
# Preset options whose tiny-width values would not fit the shrunk model.
EXTRA = {
    "hgrn2-tiny": ["model.mixers.hgrn2.expand_ratio=8"],
}


def shrink(preset: str) -> list[str]:
    """Overrides that make `preset` a CPU-sized model of the same kind on 8 devices."""
    cfg = config.load(preset)
    m = cfg.model
    mha = (m.n_kv_heads or m.n_heads) == m.n_heads
    pattern = m.layer_pattern is not None
    out = [
        "model.d_model=32", "model.n_heads=4", f"model.n_kv_heads={4 if mha else 2}",
        "model.d_ff=64", "model.vocab_size=260", "model.max_seq_len=64",
        # four layers keep dense-first/last MoE layers, CLA pairs and a scanned middle run
        f"model.n_layers={m.n_layers if pattern else min(m.n_layers, 4)}",
        "data.seq_len=32", f"data.batch_size={8 * cfg.train.microbatches}",
        "data.num_threads=0", "optim.warmup_steps=1", "train.steps=2", "train.eval_every=0",
        "train.eval_batches=1", "train.sample_lines=1", "train.sample_tokens=8",
        "checkpoint.async_save=false", "logging.every=1", "logging.tensorboard=false",
        "logging.plot=false", "logging.progress=lines",
    ]  # fmt: skip
    if m.head_dim is not None:
        out.append("model.head_dim=8")
    moe = m.ffns.get("moe")
    if m.ffn == "moe" and moe is not None:
        widths = moe.get("expert_d_ff")
        if isinstance(widths, list):
            small = ",".join(str(max(w // 8, 4)) for w in widths)
            out.append(f"model.ffns.moe.expert_d_ff=[{small}]")
        elif widths is not None:
            out.append("model.ffns.moe.expert_d_ff=16")
        if moe.get("shared_d_ff") is not None:
            out.append("model.ffns.moe.shared_d_ff=16")
    mesh = cfg.parallel.mesh
    if mesh.expert > 1:
        out.append(f"parallel.mesh.expert={min(mesh.expert, 4)}")
    return [*out, *EXTRA.get(preset, [])]


@pytest.mark.parametrize(
    "preset",
    [p if p in FAST else pytest.param(p, marks=pytest.mark.slow) for p in config.presets()],
)
def test_preset_trains_samples_and_generates(preset, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train_main([preset, *shrink(preset), f"train.run_dir={run_dir}"]) == 0
    out = capsys.readouterr()
    assert "samples:" in out.out, out.err[-2000:]
    assert "Traceback" not in out.err
    assert generate_main([str(run_dir), "--prompt", "def ", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("def ")
