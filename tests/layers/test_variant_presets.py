"""Each `*-tiny` attention-variant preset trains: a few steps on the embedded corpus (shrunk
further here so the suite stays fast), and the loss falls."""

import pytest

from jaxllm import config
from jaxllm.training.loop import train

SHRINK = [
    "model.d_model=32", "model.n_heads=4", "model.d_ff=64", "model.vocab_size=260",
    "model.max_seq_len=64", "data.seq_len=32", "data.batch_size=8", "optim.lr=1e-2",
    "optim.warmup_steps=2", "train.steps=16", "logging.every=4", "train.eval_every=100",
    "train.eval_batches=1", "train.sample_lines=0", "checkpoint.every=100",
    "logging.tensorboard=false", "logging.plot=false", "logging.progress=lines",
]  # fmt: skip
EXTRA = {
    "cog-tiny": ["model.mixers.cog.block=8"],
    "clla-tiny": ["model.mixers.clla.latent_dim=16"],
    "infini-tiny": ["model.mixers.infini.segment_len=8"],
}


@pytest.mark.parametrize(
    "preset",
    ["cla-tiny", pytest.param("cog-tiny", marks=pytest.mark.slow),
     pytest.param("clla-tiny", marks=pytest.mark.slow),
     pytest.param("dape-tiny", marks=pytest.mark.slow),
     pytest.param("infini-tiny", marks=pytest.mark.slow)],
)  # fmt: skip
def test_preset_trains(preset, tmp_path):
    cfg = config.load(preset, [*SHRINK, *EXTRA.get(preset, []), f"train.run_dir={tmp_path}"])
    assert cfg.model.mixer == config.load(preset).model.mixer
    losses = [r["loss"] for r in train(cfg)["records"] if "loss" in r]
    assert len(losses) == 4
    assert losses[-1] < losses[0] - 0.5, losses


def test_hunyuan_large_attention_shape():
    m = config.load("hunyuan-large-attention").model
    assert (m.n_heads, m.kv_heads, m.qk_head_dim, m.n_layers) == (80, 8, 80, 64)
    cla = m.mixers["cla"]
    assert m.mixer == "cla" and cla["share_factor"] == 2 and cla["qk_norm"]
    # KV elements per token: 2 · 64/2 groups · 8 heads · 80 = 40,960 ≈ 5% of MHA's 819,200.
    kv = 2 * m.n_layers // cla["share_factor"] * m.kv_heads * m.qk_head_dim
    assert kv == 40960 and kv / (2 * m.n_layers * m.n_heads * m.qk_head_dim) == 0.05
