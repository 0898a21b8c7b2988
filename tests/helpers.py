"""Small configs shared by tests."""

from __future__ import annotations

from jaxllm import config


def tiny(*overrides: str, name: str = "default") -> config.Config:
    """A model of a few thousand parameters on the embedded corpus, for fast tests."""
    base = [
        "model.d_model=32",
        "model.n_layers=2",
        "model.n_heads=4",
        "model.n_kv_heads=2",
        "model.d_ff=64",
        "model.vocab_size=260",
        "model.max_seq_len=64",
        "model.dtype=float32",
        "data.seq_len=32",
        "data.batch_size=8",
        "optim.lr=3e-3",
        "optim.warmup_steps=2",
        "train.eval_batches=2",
        "train.sample_lines=0",
        "logging.tensorboard=false",
        "logging.plot=false",
        "logging.progress=lines",
    ]
    return config.load(name, [*base, *overrides])
