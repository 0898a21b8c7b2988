"""MFU's FLOP count: every token mixer reports its own token-mixing FLOPs, checked by hand."""

import math

import jax
import pytest
from flax import nnx

from jaxllm import config, models
from jaxllm.layers import registry
from jaxllm.layers.cog import CogAttention
from jaxllm.models.decoder import layer_config

T, H, K = 16, 4, 8  # tokens, heads, head dim of `small`
SOFTMAX = 2 * T * H * (K + K) * 0.5  # one layer: QKᵀ and PV at 2 FLOPs a MAC, causal half


def small(*extra):
    base = [
        "model.d_model=32",
        "model.n_layers=2",
        "model.n_heads=4",
        "model.n_kv_heads=2",
        "model.d_ff=48",
        "model.vocab_size=64",
        "model.max_seq_len=32",
        "data.seq_len=16",
    ]
    return config.load("default", [*base, *extra]).model


def mixing(cfg):
    """Forward token-mixing FLOPs per token of the whole model (no weights: n_params = 0)."""
    return models.flops_per_token(cfg, 0, 0, T) / 3


@pytest.mark.parametrize("name", registry.mixers())
def test_every_registered_mixer_reports_its_token_mixing(name):
    entry = registry.mixer(name)
    assert callable(getattr(entry.cls, "token_mixing_flops", None)), name
    cfg = small(f"model.mixer={name}")
    for i in range(cfg.n_layers):
        f = entry.cls.token_mixing_flops(layer_config(cfg, entry, cfg.mixers.get(name, {}), i), T)
        assert math.isfinite(f) and f > 0, (name, i, f)


def test_a_mixer_without_the_hook_is_an_error(monkeypatch):
    monkeypatch.delattr(CogAttention, "token_mixing_flops")
    with pytest.raises(TypeError, match=r"'cog'.*token_mixing_flops"):
        mixing(small("model.mixer=cog"))


@pytest.mark.parametrize("name", ["softmax", "cla", "cog"])
def test_softmax_like_mixers_count_scores_and_pv(name):
    assert mixing(small(f"model.mixer={name}")) == 2 * SOFTMAX == 2048


def test_clla_scores_over_content_and_rope_channels():
    cfg = small("model.mixer=clla", "model.mixers.clla.latent_dim=16",
                "model.mixers.clla.rope_dim=4", "model.mixers.clla.quant_group=4")  # fmt: skip
    # QKᵀ over K + R = 12 channels, PV over K = 8.
    assert mixing(cfg) == 2 * (2 * T * H * (12 + 8) * 0.5) == 2 * 1280


def test_dape_counts_its_mlp_over_the_causal_scores():
    cfg = small("model.mixer=dape2", "model.mixers.dape2.mlp_width=5",
                "model.mixers.dape2.kernel=3", "model.mixers.dape2.bias=alibi")  # fmt: skip
    # Per score: Conv(2H→W, 1×3) and Conv(W→H, 1×3); T/2 scores per token.
    per_score = 2 * 3 * (2 * H * 5 + 5 * H)
    assert per_score == 360
    assert mixing(cfg) == 2 * (SOFTMAX + T / 2 * per_score) == 2 * 3904
    cfg = small("model.mixer=dape", "model.mixers.dape.mlp_width=5",
                "model.mixers.dape.bias=fire", "model.mixers.dape.fire_width=3")  # fmt: skip
    # Linear(2H→W), Linear(W→H), and FIRE's Linear(1→3), Linear(3→H) at every score.
    per_score = 2 * (2 * H * 5 + 5 * H) + 2 * (3 + 3 * H)
    assert mixing(cfg) == 2 * (SOFTMAX + T / 2 * per_score)


@pytest.mark.parametrize("update,memory", [("linear", 576 + 256), ("delta", 576 + 256 + 288)])
def test_infini_counts_local_attention_and_memory(update, memory):
    cfg = small("model.mixer=infini", "model.mixers.infini.segment_len=4",
                f"model.mixers.infini.update={update}")  # fmt: skip
    # Local: 4-token segments. Read σ(Q)M, σ(Q)z on 4 heads: 2·4·(8·8 + 8) = 576. Write
    # σ(K)ᵀV on 2 kv heads: 2·2·8·8 = 256; delta adds σ(K)M, σ(K)z: 2·2·(64 + 8) = 288.
    local = 2 * 4 * H * (K + K) * 0.5
    assert mixing(cfg) == 2 * (local + memory)
    # A segment longer than the sequence is plain causal attention over T.
    cfg = small("model.mixer=infini", "model.mixers.infini.segment_len=64",
                f"model.mixers.infini.update={update}")  # fmt: skip
    assert mixing(cfg) == 2 * (SOFTMAX + memory)


def test_attention_moe_counts_the_active_experts_only():
    cfg = small("model.mixer=attn_moe", "model.n_kv_heads=4", "model.mixers.attn_moe.top_k=1")
    model = nnx.eval_shape(lambda: models.build(cfg, 0))
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    emb = math.prod(model.embed.get_value().shape)
    matmul = n - emb + (emb if cfg.tie_embeddings else 0)
    # Each token: 1 of 4 experts, each over a quarter of the keys; 3 experts' q/o rows (one head
    # each, 32·8 per matrix) and k/v heads (32·8 each) idle.
    attn = SOFTMAX * (1 / 4) ** 2
    idle = 3 * (2 * 32 * 1 * 8 + 2 * 32 * 8)
    f = models.flops_per_token(cfg, n, emb, T)
    assert f == pytest.approx(3 * (2 * (matmul - 2 * idle) + 2 * attn))
