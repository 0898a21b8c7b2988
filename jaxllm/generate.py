"""Sampling with a KV cache (or a mixer's recurrent state): prefill, then one token at a time.

    python -m jaxllm.generate RUN_DIR --prompt "def " --max-new-tokens 200 --temperature 0.8
    python -m jaxllm.generate --hf HF_FOLDER --prompt "Once upon a time"

Library use: `Sampler(model_split, params).generate(prompt_tokens, ...)`, or
`sample_logits(logits, key, temperature, top_k, top_p)` on its own.
"""

from __future__ import annotations

import argparse
import sys
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


def _load_hf(path: str):
    """(config, trainer-like split, params, "hf") for sampling from a Hugging Face folder."""
    from types import SimpleNamespace

    from jaxllm.config import Config, DataConfig
    from jaxllm.interop import hf
    from jaxllm.training.state import Model

    model_cfg = hf.model_config_from_hf(hf.read_hf_config(path))
    cfg = Config(model=model_cfg, data=DataConfig(seq_len=min(256, model_cfg.max_seq_len)))
    params = hf.load_params(path, model_cfg)
    return cfg, SimpleNamespace(model=Model.create(cfg)), params, "hf"


def _tokenizer(args, cfg):
    """The tokenizer `--tokenizer` names; `auto` is the run's, or the --hf folder's own."""
    from pathlib import Path

    from jaxllm.config import ConfigError
    from jaxllm.data import build_tokenizer

    name, path = args.tokenizer, args.tokenizer_path
    if name == "auto" and not args.hf:
        name, path = cfg.data.tokenizer, path or cfg.data.tokenizer_path
    elif name == "auto":
        folder = Path(args.hf)
        if (folder / "tokenizer.json").exists():
            name, path = "hf", path or str(folder)
        elif (folder / "tokenizer.model").exists():
            name, path = "sentencepiece", path or str(folder)
        else:
            raise ConfigError(f"{folder}: no tokenizer.json or tokenizer.model; pass --tokenizer")
    elif name != "bytes" and not path:
        path = args.hf
    tokenizer = build_tokenizer(name, path)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"the {name} tokenizer has {tokenizer.vocab_size} tokens, the model only "
            f"{cfg.model.vocab_size}"
        )
    return tokenizer


def main(argv: list[str] | None = None) -> int:
    from pathlib import Path

    from jaxllm.config import ConfigError
    from jaxllm.training.loop import load_params_for_sampling

    ap = argparse.ArgumentParser(
        prog="python -m jaxllm.generate", description=__doc__.split("\n")[0]
    )
    ap.add_argument("run_dir", nargs="?", help="a run folder written by `python -m jaxllm.train`")
    ap.add_argument("--hf", metavar="PATH", help="sample from a Hugging Face folder instead")
    ap.add_argument(
        "--tokenizer", choices=("auto", "bytes", "hf", "sentencepiece"), default="auto",
        help="auto: the run's, or with --hf the folder's tokenizer.json / tokenizer.model",
    )  # fmt: skip
    ap.add_argument("--tokenizer-path", default=None, help="file or folder of the tokenizer")
    ap.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        if (args.run_dir is None) == (args.hf is None):
            raise ConfigError("give a run folder or --hf PATH (one of them)")
        if args.hf:
            cfg, trainer, params, step = _load_hf(args.hf)
            run_dir = args.hf
        else:
            run_dir = Path(args.run_dir)
            if not (run_dir / "config.yaml").exists():
                raise ConfigError(f"{run_dir} is not a run folder (no config.yaml)")
            cfg, trainer, params, step = load_params_for_sampling(run_dir)
        tokenizer = _tokenizer(args, cfg)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sampler = Sampler(trainer.model, params, max_len=cfg.model.max_seq_len)
    print(f"# {run_dir} at step {step}", file=sys.stderr)
    kv = kv_cache_bytes(trainer.model.merge(params))
    print(
        f"# KV cache: {kv['per_token']:,.0f} bytes/token (+ {kv['fixed']:,.0f} bytes fixed)",
        file=sys.stderr,
    )
    for i, prompt in enumerate(args.prompt or ["def "]):
        text = sampler.complete(
            tokenizer, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, seed=args.seed + i,
        )  # fmt: skip
        print(prompt + text)
        print("-" * 40)
    return 0


if __name__ == "__main__":
    sys.exit(main())
