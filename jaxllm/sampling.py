"""Autoregressive sampling with a KV cache (or a mixer's recurrent state): prefill, then one
token at a time.

Library use: `Sampler(model_split, params, max_len=...).generate(prompt_tokens, ...)`, or
`sample_logits(logits, key, temperature, top_k, top_p)` on its own. It needs only the model's
`init_cache` and its cached `__call__`, so both the training loop (its end-of-run samples) and
the `python -m jaxllm.generate` command (above the loop) use it.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np


def sample_logits(
    logits_BV: jax.Array,
    key: jax.Array,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> jax.Array:
    """Next tokens [B] from logits [B, V]: temperature 0 is greedy; top-k keeps the k most
    likely tokens; top-p (nucleus) keeps the smallest set whose probability reaches p."""
    logits = logits_BV.astype(jnp.float32)
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep a token while the mass strictly before it is below p (the top token always).
        before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def kv_cache_bytes(model, *, lengths: tuple[int, int] = (64, 128)) -> dict[str, float]:
    """What the model's decoding cache costs at batch 1, from the cache arrays' shapes and dtypes
    (`jax.eval_shape`, nothing allocated): `per_token`, the growth per cached token between two
    cache lengths, and `fixed`, the rest (a recurrent memory, counters)."""

    def nbytes(n: int) -> int:
        tree = jax.eval_shape(lambda: model.init_cache(1, n))
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))

    a, b = lengths
    per_token = (nbytes(b) - nbytes(a)) / (b - a)
    return {"per_token": per_token, "fixed": nbytes(a) - per_token * a}


class Sampler:
    """Autoregressive sampling from split model parameters.

    `model` is a `jaxllm.training.state.Model` (graph definition + parameter layout) and
    `params` its parameter dict; `max_len` bounds prompt + generated tokens (the cache size).
    """

    def __init__(self, model, params, *, max_len: int):
        self.model = model
        self.params = params
        self.max_len = max_len

    @partial(jax.jit, static_argnames=("self", "n_new", "temperature", "top_k", "top_p"))
    def _generate(self, params, prompt_BP, key, n_new, temperature, top_k, top_p):
        model = self.model.merge(params)
        b = prompt_BP.shape[0]
        cache = model.init_cache(b, self.max_len)
        logits, cache = model(prompt_BP, cache=cache)
        sample = partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)

        def body(carry, key_t):
            last_BV, cache = carry
            tok_B = sample(last_BV, key_t)
            # A module of this trace level: layers that sow (MoE load metrics, a scanned
            # decoder's stacked intermediates) may not mutate the one merged outside the loop.
            logits, cache = self.model.merge(params)(tok_B[:, None], cache=cache)
            return (logits[:, -1], cache), tok_B

        keys = jax.random.split(key, n_new)
        _, toks = jax.lax.scan(body, (logits[:, -1], cache), keys)
        return toks.T  # [B, n_new]

    def generate(
        self,
        prompt_BP: np.ndarray,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
    ) -> np.ndarray:
        """prompt [B, P] int (equal lengths) → new tokens [B, max_new_tokens]."""
        prompt_BP = jnp.asarray(prompt_BP, jnp.int32)
        if prompt_BP.shape[1] + max_new_tokens > self.max_len:
            raise ValueError(
                f"prompt ({prompt_BP.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds "
                f"max_len={self.max_len}"
            )
        out = self._generate(
            self.params, prompt_BP, jax.random.key(seed), max_new_tokens, temperature, top_k,
            top_p,
        )  # fmt: skip
        return np.asarray(out)

    def complete(self, tokenizer, prompt: str, *, max_new_tokens: int, **kw) -> str:
        """Text continuation of `prompt` (a BOS is put in front), cut at the first EOS."""
        ids = np.concatenate([[tokenizer.bos_id], tokenizer.encode(prompt)])[None]
        new = self.generate(ids, max_new_tokens=max_new_tokens, **kw)[0].tolist()
        if tokenizer.eos_id in new:
            new = new[: new.index(tokenizer.eos_id)]
        return tokenizer.decode(new)

    def __hash__(self):
        return id(self)

    def __eq__(self, other):
        return self is other
