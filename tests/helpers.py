"""Small configs and comparisons shared by tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

from jaxllm import config, models
from jaxllm.sampling import Sampler
from jaxllm.training.state import Model


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


def cuda_lowering():
    """A context in which `lower(lowering_platforms=("cuda",))` reaches the Triton lowering on
    a host without a GPU: jax ≥ 0.12 asks the abstract mesh for the target GPU (an H100 here);
    jax 0.10 looks for none."""
    gpu = AbstractDevice("NVIDIA H100", None, "gpu")
    mesh = AbstractMesh((1,), ("gpu",), axis_types=(AxisType.Auto,), abstract_device=gpu)
    return jax.sharding.use_abstract_mesh(mesh)


def assert_close(name, ref, got, ratio, atol=1e-6):
    """Pass when max|Δ| ≤ atol or the RMS of ref − got is at most `ratio` of ref's RMS."""
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
    assert ref.shape == got.shape, f"{name}: shape {got.shape} != {ref.shape}"
    assert np.isfinite(got).all(), f"{name}: non-finite values"
    max_err = np.abs(ref - got).max(initial=0.0)
    if max_err <= atol:
        return
    rms_ratio = np.sqrt(np.mean((ref - got) ** 2)) / np.sqrt(np.mean(ref**2))
    assert rms_ratio <= ratio, f"{name}: max|Δ| {max_err:.3g}, RMS ratio {rms_ratio:.3g} > {ratio}"


def assert_greedy_generation(cfg, prompt, max_new_tokens):
    """Greedy sampling from cfg's model (the sampler's cache path): each new token is the
    argmax of the full causal forward over prompt + the tokens before it (teacher forcing:
    one forward over the whole sequence, not one per prefix)."""
    model = models.build(cfg.model, nnx.Rngs(params=0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    sampler = Sampler(Model.create(cfg), params, max_len=24)
    new = sampler.generate(prompt, max_new_tokens=max_new_tokens, temperature=0)
    logits = model(jnp.asarray(np.concatenate([prompt, new], axis=1)))
    P = prompt.shape[1]
    np.testing.assert_array_equal(new, np.asarray(jnp.argmax(logits[:, P - 1 : -1], axis=-1)))
