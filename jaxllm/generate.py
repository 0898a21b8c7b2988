"""Sampling with a KV cache (or a mixer's recurrent state): prefill, then one token at a time.

    python -m jaxllm.generate RUN_DIR --prompt "def " --max-new-tokens 200 --temperature 0.8
    python -m jaxllm.generate --hf HF_FOLDER --prompt "Once upon a time"

This is the command: it loads a run's newest checkpoint or a Hugging Face folder. The sampler
itself (`Sampler`, `sample_logits`, `kv_cache_bytes`) is `jaxllm.sampling`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

from jaxllm.config import Config, ConfigError, DataConfig
from jaxllm.data import build_tokenizer
from jaxllm.interop import hf
from jaxllm.sampling import Sampler, kv_cache_bytes
from jaxllm.training.checkpoint import load_params_for_sampling
from jaxllm.training.state import Model


def _load_hf(path: str):
    """(config, trainer-like split, params, "hf") for sampling from a Hugging Face folder."""
    model_cfg = hf.model_config_from_hf(hf.read_hf_config(path))
    cfg = Config(model=model_cfg, data=DataConfig(seq_len=min(256, model_cfg.max_seq_len)))
    params = hf.load_params(path, model_cfg)
    return cfg, SimpleNamespace(model=Model.create(cfg)), params, "hf"


def _tokenizer(args, cfg):
    """The tokenizer `--tokenizer` names; `auto` is the run's, or the --hf folder's own."""
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
