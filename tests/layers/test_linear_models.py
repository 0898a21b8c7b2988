"""Linear-attention models end to end: decoding from the O(1) state equals the parallel forward,
packed documents do not see each other, greedy generation, FLOPs, and the tiny presets train."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm import config, models
from jaxllm.layers import registry
from jaxllm.layers.lightning import linear_attention_flops
from jaxllm.optim import decay_mask
from jaxllm.sampling import kv_cache_bytes
from jaxllm.training.loop import train
from tests.helpers import assert_greedy_generation, tiny

TOL = dict(atol=2e-5, rtol=2e-5)  # float32 end to end
VARIANTS = {
    "tnl": ("model.mixer=lightning", "model.ffn=sglu", "model.norm=srms",
            "model.scale_embedding=true"),
    "tnl-lrpe-fla-gate": ("model.mixer=lightning", "model.mixers.lightning.lrpe=true",
                          "model.mixers.lightning.decay=fla",
                          "model.mixers.lightning.output_gate=low_rank_sigmoid"),
    "cosformer2": ("model.mixer=cosformer2",),
    "hgrn2": ("model.mixer=hgrn2", "model.mixers.hgrn2.expand_ratio=4"),
    "lcsm-static": ("model.mixer=lcsm", "model.mixers.lcsm.oscillation=static"),
    "lcsm-none": ("model.mixer=lcsm", "model.mixers.lcsm.oscillation=none"),
    "lcsm-data": ("model.mixer=lcsm", "model.mixers.lcsm.expand=one_minus_gate"),
    "hybrid": ("model.layer_pattern=[hgrn2,lightning,softmax]", "model.n_layers=3"),
}  # fmt: skip


def small(*extra):
    base = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=4",
            "model.d_ff=48", "model.vocab_size=64", "model.max_seq_len=32",
            "model.dtype=float32", "data.seq_len=16"]  # fmt: skip
    return config.load("default", [*base, *extra]).model


@nnx.jit
def _with_cache(model, tokens, cache):
    return model(tokens, cache=cache)


@nnx.jit
def _forward(model, tokens, positions, segment_ids):
    return model(tokens, positions_BT=positions, segment_ids_BT=segment_ids)


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(1), (2, 12), 0, 64)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decode_equals_forward_and_packing_isolates(tokens, variant):
    """Prefill 5 tokens then decode one at a time from the recurrent state: the logits of one
    full pass. Then two documents packed in one row: the logits each gets alone."""
    model = models.build(small(*VARIANTS[variant]), 0)
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    full = _forward(model, tokens, pos, None)
    cache = model.init_cache(2, 16)
    pre, cache = _with_cache(model, tokens[:, :5], cache)
    steps = [pre]
    for t in range(5, 12):
        out, cache = _with_cache(model, tokens[:, t : t + 1], cache)
        steps.append(out)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, **TOL)
    assert int(cache[0]["end"]) == 12

    # Row 0: documents of 7 and 5 tokens; row 1: the two alone, padded to 12 with its own id.
    seg = jnp.array([[1] * 7 + [2] * 5, [1] * 12])
    pos = jnp.array([list(range(7)) + list(range(5)), list(range(12))])
    row1 = jnp.concatenate([tokens[1, :5], tokens[0, :7]])
    packed = jnp.stack([jnp.concatenate([tokens[0, :7], tokens[1, :5]]), row1])
    out = _forward(model, packed, pos, seg)
    plain_pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    alone = _forward(model, jnp.stack([tokens[0], row1]), plain_pos, None)
    np.testing.assert_allclose(out[0, :7], alone[0, :7], **TOL)
    np.testing.assert_allclose(out[0, 7:], alone[1, :5], **TOL)


def test_linear_mixers_keep_no_per_token_cache():
    model = models.build(small(*VARIANTS["tnl"]), 0)
    cost = kv_cache_bytes(model)
    assert cost["per_token"] == 0
    assert cost["fixed"] == 2 * 4 * 8 * 8 * 4 + 2 * 4  # two [1, H, K, V] f32 states + counters


def test_greedy_generation_equals_argmax_of_full_forward():
    cfg = tiny("model.n_kv_heads=4", name="tnl-tiny")
    prompt = np.array([[256, 100, 101, 102], [256, 40, 41, 42]])
    assert_greedy_generation(cfg, prompt, max_new_tokens=6)


def test_flops_count_the_linear_mixing():
    cfg = small(*VARIANTS["hybrid"])
    counts = models.param_count(models.build(cfg, 0))
    f = models.flops_per_token(cfg, counts["total"], counts["embedding"], seq_len=16)
    matmul = counts["total"] - counts["embedding"]
    softmax = 2 * 2 * 16 * 4 * 8 * 0.5  # (QK, PV) · 2 flops · T · H · K · causal half
    # hgrn2 at head_dim 8: 4 heads of K = V = 8; lightning: 4 heads of 8; chunk = T = 16.
    linear = 2 * linear_attention_flops(4, 8, 8, 16, 16)
    assert linear == 2 * 4 * (16 * 16 + 4 * 64)
    assert f == pytest.approx(3 * (2 * matmul + softmax + linear))


def test_presets_use_the_registered_layers():
    for name in ("tnl-tiny", "hgrn2-tiny", "cosformer2-tiny", "lcsm-tiny", "hybrid-tiny"):
        cfg = config.load(name)
        assert all(registry.mixer(m) for m in cfg.model.mixer_names())
    cfg = config.load("hybrid-tiny").model
    assert cfg.mixer_names() == ["lightning"] * 7 + ["softmax"]
    tnl = config.load("tnl-1b").model
    assert (tnl.n_layers, tnl.d_model, tnl.n_heads, tnl.norm) == (32, 1536, 16, "srms")
    assert config.load("lc-llama-7b").model.mixer == "softmax"


def _run(tmp_path, name, *extra, steps=12):
    cfg = tiny(f"train.steps={steps}", "logging.every=1", "train.eval_every=0",
               "checkpoint.every=0", f"train.run_dir={tmp_path}", "optim.lr=1e-2",
               "model.n_kv_heads=4", *extra, name=name)  # fmt: skip
    rec = [r for r in train(cfg)["records"] if "loss" in r]
    return rec[0]["loss"], rec[-1]["loss"]


# Each run compiles a train step: ~10-15 s of CPU, so these are in the slow suite.
@pytest.mark.slow
@pytest.mark.parametrize(
    "name,extra",
    [
        ("tnl-tiny", ()),
        ("hgrn2-tiny", ("model.mixers.hgrn2.expand_ratio=8",)),
        ("cosformer2-tiny", ()),
        ("lcsm-tiny", ()),
        ("hybrid-tiny", ("model.n_layers=8",)),
    ],
)
def test_tiny_presets_train(tmp_path, name, extra):
    first, last = _run(tmp_path, name, *extra)
    assert last < first - 0.5


def test_gate_frequency_and_scale_parameters_get_no_weight_decay():
    model = models.build(small("model.layer_pattern=[cosformer2,hgrn2,lcsm]", "model.n_layers=3",
                               "model.mixers.lcsm.oscillation=static"), 0)  # fmt: skip
    mask = decay_mask(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    flat = {"/".join(map(str, k)): v for k, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    names = ("theta", "norm_scale", "lower_bound_logit", "decay_rho")
    hits = {k: v for k, v in flat.items() if any(n in k for n in names)}
    assert len(hits) == 6 and not any(hits.values()), hits
