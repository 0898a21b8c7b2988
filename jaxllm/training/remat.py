"""Activation checkpointing of each block: named policies over `checkpoint_name` tags.

Blocks tag their activations (`jaxllm.layers.base.tag`): ``layer_in`` (block input),
``mixer_in`` (normed input), ``q``/``k``/``v``, ``attn_out`` (attention before the output
projection), ``mixer_out`` (residual after the mixer), ``ffn_in``, ``mlp_hidden``. What the
backward pass keeps of each block, per `train.remat`:

- ``none``: everything (no checkpointing).
- ``full``: nothing but the block's input; the backward recomputes the whole block.
- ``minimal``: q, k, v and the attention output — the backward skips the attention and QKV
  recomputation, the most expensive part, and recomputes norms and the MLP.
- ``save_dots``: every matmul output without batch dims (the projections), i.e.
  `jax.checkpoint_policies.dots_with_no_batch_dims_saveable`.
- ``offload``: MEMO (Zhao et al., SIGMOD 2025): the layer input and the attention output are
  moved to pinned host memory and brought back for the backward; of every other skeletal
  activation the first ⌊α·T⌋ tokens (α = `train.offload_fraction`) are offloaded too and
  only the rest is recomputed (token-wise projections run on the two parts apart,
  `jaxllm.layers.base.dense`). XLA's host-offload passes schedule the copies. On the CPU
  backend the "host" is the device itself, so the policy compiles and runs but moves nothing.
  In an unrolled decoder XLA:TPU postpones each device-to-host copy to just before its
  read-back in the backward, so the device copy stays alive through the forward and the
  policy saves no HBM; under `model.scan_layers` each copy stays in its layer's iteration
  and the stacked activations live in pinned host memory (benchmarks/README.md, memory.py).

`prevent_cse` stays on, scanned or not. The JAX docs call it unnecessary inside a `scan`, but
measured on the scanned tnl-7b step (v5p:2x2x1, 4 x 32K tokens) turning it off saves nothing:
full remat 33.68 vs 33.66 GiB of temporaries per chip (same FLOPs), offload 26.23 vs 25.69.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx

from jaxllm.layers.base import ATTN_OUT, LAYER_INPUT, SKELETAL, host_offload

POLICIES = ("none", "full", "minimal", "save_dots", "offload")


def checkpoint_policy(name: str, offload_fraction: float = 0.0):
    """The `jax.checkpoint` policy of a `train.remat` value (None = save nothing)."""
    cp = jax.checkpoint_policies
    if name == "full":
        return None
    if name == "minimal":
        return cp.save_only_these_names("q", "k", "v", ATTN_OUT)
    if name == "save_dots":
        return cp.dots_with_no_batch_dims_saveable
    if name == "offload":
        offloaded = [LAYER_INPUT, ATTN_OUT]
        if offload_fraction > 0:
            offloaded += [n + "_off" for n in SKELETAL]
        return cp.save_and_offload_only_these_names(
            names_which_can_be_saved=[],
            names_which_can_be_offloaded=offloaded,
            offload_src="device",
            offload_dst="pinned_host",
        )
    raise ValueError(f"train.remat={name!r}: use one of {', '.join(POLICIES)}")


def block_remat(name: str, offload_fraction: float = 0.0) -> Callable[[Callable], Callable] | None:
    """The `remat=` argument of `Decoder.__call__` for a `train.remat` value (None = off)."""
    if name == "none":
        return None
    policy = checkpoint_policy(name, offload_fraction)

    def wrap(fn: Callable) -> Callable:
        if name != "offload":
            return nnx.remat(fn, policy=policy, prevent_cse=True)

        def offloaded(*args):
            with host_offload(offload_fraction):
                return fn(*args)

        return nnx.remat(offloaded, policy=policy, prevent_cse=True)

    return wrap
