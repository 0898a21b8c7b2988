"""The decoder-only language model: embed → blocks → final norm → head."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm import precision
from jaxllm.config import ModelConfig
from jaxllm.layers import registry
from jaxllm.layers.base import DIM_FIELDS, LAYER_INPUT, cast, param, tag
from jaxllm.layers.norms import RMSNorm
from jaxllm.layers.srms import SRMSNorm
from jaxllm.models.scan import ScanPlan, plan_layers, stack_modules
from jaxllm.parallel.core.rules import avoid_split_gathers, constrain

_ACT = ("batch", "length", "act_embed")
# Entries of the blocks' `carry` that no layer writes: the same for every layer.
CONSTANTS = ("tokens_BT", "domain_BT")


def layer_config(cfg: ModelConfig, entry: registry.Entry, options: dict, index: int):
    """A layer's own small config: the model-wide dims, then the layer's options."""
    dims = {
        "d_model": cfg.d_model,
        "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.kv_heads,
        "head_dim": cfg.qk_head_dim,
        "d_ff": cfg.d_ff,
        "layer_index": index,
        "n_layers": cfg.n_layers,
        "norm_eps": cfg.norm_eps,
        "init_std": cfg.init_std,
        "dtype": cfg.dtype,
        "param_dtype": cfg.param_dtype,
    }
    assert set(dims) == set(DIM_FIELDS)
    return entry.config_cls(**{**dims, **options})


def scan_plan(cfg: ModelConfig) -> ScanPlan | None:
    """Which layers `model.scan_layers` scans (None: off, or no run of layers repeats)."""
    if not cfg.scan_layers:
        return None
    keys = []
    for i, name in enumerate(cfg.mixer_names()):
        mixer, ffn = registry.mixer(name), registry.ffn(cfg.ffn)
        keys.append((
            name,
            layer_config(cfg, mixer, cfg.mixers.get(name, {}), i).scan_key(),
            layer_config(cfg, ffn, cfg.ffns.get(cfg.ffn, {}), i).scan_key(),
        ))  # fmt: skip
    return plan_layers(keys)


def _norm(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    """The block / final norm `model.norm` names: RMSNorm, or TNL's scale-free SRMSNorm."""
    cls = SRMSNorm if cfg.norm == "srms" else RMSNorm
    return cls(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)


def _declares(layer: nnx.Module, flag: str) -> bool:
    return bool(getattr(type(layer), flag, False))


def embed_lookup(table_VD: jax.Array, tokens_BT: jax.Array) -> jax.Array:
    """[B, T, D]: the table's rows of the tokens. Where XLA cannot partition the gather
    (`avoid_split_gathers`: inside the FP8 all-reduce's per-replica map with two split axes
    left) every device takes all of the slice's tokens from its block of the table's D
    ("embed") with the whole vocabulary (a table split over V, "vocab" → tensor, makes the
    partitioner all-reduce the gathered slices, where jax 0.12's XLA aborts); the activation
    constraint after it reshards."""
    if avoid_split_gathers():
        tokens_BT = constrain(tokens_BT, (None, None))
        table_VD = constrain(table_VD, (None, "embed"))
        return constrain(jnp.take(table_VD, tokens_BT, axis=0), (None, None, "embed"))
    return jnp.take(table_VD, tokens_BT, axis=0)


def head_logits(x_BTD: jax.Array, w_DV: jax.Array) -> jax.Array:
    """x [B, T, D] @ w [D, V] → float32 logits [B, T, V], vocab-sharded as activations."""
    logits_BTV = jnp.einsum("BTD,DV->BTV", x_BTD, w_DV, preferred_element_type=jnp.float32)
    return constrain(logits_BTV, ("batch", "length", "act_vocab"))


class Block(nnx.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then + ffn(norm(x))."""

    def __init__(self, cfg: ModelConfig, index: int, *, rngs: nnx.Rngs):
        mixer_name = cfg.mixer_names()[index]
        mixer = registry.mixer(mixer_name)
        ffn = registry.ffn(cfg.ffn)
        self.mixer_norm = _norm(cfg, rngs)
        self.mixer = mixer.cls(
            layer_config(cfg, mixer, cfg.mixers.get(mixer_name, {}), index), rngs=rngs
        )
        self.ffn_norm = _norm(cfg, rngs)
        self.ffn = ffn.cls(layer_config(cfg, ffn, cfg.ffns.get(cfg.ffn, {}), index), rngs=rngs)

    def __call__(
        self, x_BTD, *, positions_BT, segment_ids_BT=None, cache=None, carry=None, layer=None
    ):
        """`layer`: this block's index in the stack, an int or (in a layer scan) an int32
        scalar, for the mixers that declare `uses_layer` (their numbers depend on it)."""
        # `carry` is a dict threaded through the blocks of one forward pass; only mixers that
        # declare `uses_carry = True` (cross-layer KV sharing) see it, and they may read what an
        # earlier layer wrote and write for later ones. Other mixers keep their signature.
        extra = {}
        if _declares(self.mixer, "uses_carry"):
            extra["carry"] = {} if carry is None else carry
        if _declares(self.mixer, "uses_layer"):
            extra["layer"] = layer
        x_BTD = tag(x_BTD, LAYER_INPUT)
        h_BTD, cache = self.mixer(
            tag(self.mixer_norm(x_BTD), "mixer_in"),
            positions_BT=positions_BT,
            segment_ids_BT=segment_ids_BT,
            cache=cache,
            **extra,
        )
        x_BTD = tag(constrain(x_BTD + h_BTD.astype(x_BTD.dtype), _ACT), "mixer_out")
        # Channel mixers that declare `uses_tokens` (hash-routed MoE) get the token ids and
        # their data domains.
        ffn_extra = {}
        if _declares(self.ffn, "uses_tokens"):
            ffn_extra = {k: (carry or {}).get(k) for k in CONSTANTS}
        if _declares(self.ffn, "uses_layer"):
            ffn_extra["layer"] = layer
        x_BTD = x_BTD + self.ffn(tag(self.ffn_norm(x_BTD), "ffn_in"), **ffn_extra).astype(
            x_BTD.dtype
        )
        return constrain(x_BTD, _ACT), cache


class Decoder(nnx.Module):
    """tokens [B, T] int → logits [B, T, vocab] float32.

    `positions` [B, T] default 0..T-1 (packed data passes per-document positions),
    `segment_ids` [B, T] keep packed documents from attending to each other; `domain` [B, T]
    (the batch's per-token data domain) goes to hash-routed MoE layers. With `cache`
    (from `init_cache`) the call also returns the updated cache: `(logits, cache)`.

    With `model.scan_layers` the longest repeating run of layers is scanned
    (`jaxllm.models.scan`): `blocks` holds the layers before it, `scan` its P stacked blocks,
    `tail` the layers after it; the cache is the list of those blocks' caches in that order,
    the scanned ones stacked [U, ...].
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = param(
            rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), std=cfg.init_std,
            dtype=cfg.param_dtype,
        )  # fmt: skip
        # Every layer is built on its own, in order, so a scanned model draws the same
        # initial values as the unrolled one.
        blocks = [Block(cfg, i, rngs=rngs) for i in range(cfg.n_layers)]
        self.plan = scan_plan(cfg)
        if self.plan is None:
            self.blocks = nnx.List(blocks)
        else:
            p = self.plan
            self.blocks = nnx.List(blocks[: p.start])
            self.scan = nnx.List(
                [stack_modules(blocks[p.start + q : p.stop : p.period]) for q in range(p.period)]
            )
            self.tail = nnx.List(blocks[p.stop :])
        self.final_norm = _norm(cfg, rngs)
        if not cfg.tie_embeddings:
            self.head = param(
                rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), std=cfg.init_std,
                dtype=cfg.param_dtype,
            )  # fmt: skip

    def init_cache(self, batch: int, max_len: int | None = None) -> list[Any]:
        max_len = max_len or self.cfg.max_seq_len
        caches = [blk.mixer.init_cache(batch, max_len) for blk in self.blocks]
        if self.plan is not None:
            units = self.plan.units
            for blk in self.scan:
                one = blk.mixer.init_cache(batch, max_len)
                caches.append(jax.tree.map(lambda x: jnp.broadcast_to(x, (units, *x.shape)), one))
            caches += [blk.mixer.init_cache(batch, max_len) for blk in self.tail]
        return caches

    def __call__(
        self,
        tokens_BT: jax.Array,
        *,
        positions_BT: jax.Array | None = None,
        segment_ids_BT: jax.Array | None = None,
        domain_BT: jax.Array | None = None,
        cache: list[Any] | None = None,
        remat: Callable[[Callable], Callable] | None = None,
        hidden: bool = False,
    ):
        """remat: wraps the function ``f(module, x_BTD, carry, ...) -> (x_BTD, carry, ...)`` of
        each block (each scanned repeat), e.g. in `nnx.remat` with a checkpoint policy (see
        jaxllm.training.remat); training only (no cache). hidden: return the final norm's
        output [B, T, D] instead of the logits (the head applied by the caller, `head_DV`)."""
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        b, t = tokens_BT.shape
        if positions_BT is None:
            end = 0 if cache is None else cache[0]["end"]
            # A scanned first block's counter is stacked over its repeats (all equal).
            start = end if jnp.ndim(end) == 0 else end[0]
            positions_BT = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
        x_BTD = embed_lookup(cast(self.embed, dt), tokens_BT)
        if cfg.scale_embedding:
            x_BTD = x_BTD * jnp.asarray(cfg.d_model**0.5, dt)
        x_BTD = constrain(x_BTD, _ACT)
        carry: dict[str, Any] = {"tokens_BT": tokens_BT}
        if domain_BT is not None:
            carry["domain_BT"] = domain_BT
        if cache is not None:
            remat = None
        inputs = {"positions_BT": positions_BT, "segment_ids_BT": segment_ids_BT}
        caches = [None] * len(cache or ())
        n = len(self.blocks)
        x_BTD = self._unrolled(self.blocks, 0, x_BTD, carry, cache, caches, inputs, remat)
        if self.plan is not None:
            p = self.plan
            part = None if cache is None else cache[n : n + p.period]
            x_BTD, caches[n : n + p.period] = self._scanned(x_BTD, carry, part, inputs, remat)
            x_BTD = self._unrolled(
                self.tail, p.stop, x_BTD, carry, cache, caches, inputs, remat, first=n + p.period
            )
        x_BTD = self.final_norm(x_BTD)
        if hidden:
            return x_BTD
        logits_BTV = self.logits(x_BTD)
        return logits_BTV if cache is None else (logits_BTV, caches)

    def head_DV(self) -> jax.Array:
        """The output head [D, V] in the compute dtype (the embedding's transpose when tied)."""
        dt = jnp.dtype(self.cfg.dtype)
        return cast(self.embed, dt).T if self.cfg.tie_embeddings else cast(self.head, dt)

    def logits(self, x_BTD: jax.Array) -> jax.Array:
        """Float32 logits [B, T, V] of final-norm outputs [B, T, D]."""
        return head_logits(x_BTD, self.head_DV())

    def _unrolled(self, blocks, layer0, x_BTD, carry, cache, caches, inputs, remat, first=0):
        """Run `blocks` (layers layer0, layer0 + 1, ...) one after the other; their caches are
        cache[first + i], written back into `caches`."""
        for i, blk in enumerate(blocks):
            if remat is not None:

                def run(blk, x_BTD, carry, layer=layer0 + i):
                    carry = dict(carry)
                    x_BTD, _ = blk(x_BTD, **inputs, carry=carry, layer=layer)
                    return x_BTD, carry

                x_BTD, new_carry = remat(run)(blk, x_BTD, carry)
                carry.clear()
                carry.update(new_carry)
                continue
            layer_cache = None if cache is None else cache[first + i]
            x_BTD, layer_cache = blk(
                x_BTD, **inputs, cache=layer_cache, carry=carry, layer=layer0 + i
            )
            if cache is not None:
                caches[first + i] = layer_cache
        return x_BTD

    def _scanned(self, x_BTD, carry, cache, inputs, remat):
        """Run the scanned layers as one `lax.scan` over their repeats (`jaxllm.models.scan`).

        The scan carries x and the entries of `carry` that layers write (consumers of CLA's
        shared K/V, HGRN2's running lower bound); an entry first written inside the scan
        starts as zeros. Each step gets its repeat's parameters, its first layer's index, its
        cache slices and delayed-FP8 state; what the layers sow (aux losses, metrics) comes
        out stacked over the repeats.
        """
        p = self.plan
        graphdef, params = nnx.split(self.scan)
        consts = {k: carry[k] for k in CONSTANTS if k in carry}

        def run(unit, x_BTD, written, layer, unit_cache):
            c = {**consts, **written}
            new_caches = []
            for q, blk in enumerate(unit):
                kv = None if unit_cache is None else unit_cache[q]
                x_BTD, kv = blk(x_BTD, **inputs, cache=kv, carry=c, layer=layer + q)
                new_caches.append(kv)
            return x_BTD, {k: v for k, v in c.items() if k not in consts}, new_caches

        def first_repeat(x_BTD, written, unit_cache):
            unit = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], params))
            return run(unit, x_BTD, written, jnp.int32(p.start), unit_cache)

        # What one repeat writes into the carry: its shapes, traced in plain precision.
        written = {k: v for k, v in carry.items() if k not in consts}
        first_cache = None if cache is None else jax.tree.map(lambda a: a[0], cache)
        with precision.use_precision(precision.PrecisionSpec()):
            _, shapes, _ = jax.eval_shape(first_repeat, x_BTD, written, first_cache)
        zeros = lambda s: jnp.zeros(s.shape, s.dtype)
        written = {**{k: jax.tree.map(zeros, v) for k, v in shapes.items()}, **written}

        step = run if remat is None else remat(run)

        def body(state, xs):
            x_BTD, written = state
            unit_params, layer, unit_cache, fp8_slice = xs
            unit = nnx.merge(graphdef, unit_params)
            with precision.scanned_unit(p.units, fp8_slice):
                x_BTD, written, new_caches = step(unit, x_BTD, written, layer, unit_cache)
            return (x_BTD, written), (new_caches, nnx.state(unit, nnx.Intermediate))

        layers = p.start + p.period * jnp.arange(p.units, dtype=jnp.int32)
        xs = (params, layers, cache, precision.scanned_state())
        (x_BTD, written), (new_caches, sown) = jax.lax.scan(body, (x_BTD, written), xs)
        carry.update(written)
        nnx.update(self.scan, sown)
        return x_BTD, new_caches
