"""Convert between jaxllm runs and Hugging Face folders.

    python -m jaxllm.convert export RUN_DIR OUT_DIR [--dtype bfloat16] [--max-shard-gb 4]
    python -m jaxllm.convert inspect HF_DIR [--check-weights]

`export` writes the newest checkpoint of a training run as a Hugging Face folder (config.json,
safetensors shards, and the run's tokenizer files when it used one), loadable with
`transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR)`. `inspect` prints the jaxllm
`model:` section a Hugging Face folder maps to (a preset's starting point) and, with
`--check-weights`, reads every tensor to prove the folder imports. To train from a Hugging Face
folder no conversion is needed: `python -m jaxllm.train PRESET checkpoint.init_from=hf:PATH`.
Exit codes: 0 success, 2 user error.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import yaml

from jaxllm.config import ConfigError
from jaxllm.interop import hf
from jaxllm.interop.safetensors import SafetensorsError
from jaxllm.training.checkpoint import load_params_for_sampling

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
)


def export(run_dir: Path, out: Path, *, dtype: str | None, max_shard_bytes: int) -> Path:
    """The newest checkpoint of `run_dir` as a Hugging Face folder `out`."""
    if not (run_dir / "config.yaml").exists():
        raise hf.HFError(f"{run_dir} is not a run folder (no config.yaml)")
    cfg, _, params, step = load_params_for_sampling(run_dir)
    hf.save_params(params, cfg.model, out, dtype=dtype, max_shard_bytes=max_shard_bytes)
    if cfg.data.tokenizer != "bytes" and cfg.data.tokenizer_path:
        src = Path(cfg.data.tokenizer_path)
        folder = src if src.is_dir() else src.parent
        for name in _TOKENIZER_FILES:
            if (folder / name).exists():
                shutil.copy(folder / name, out / name)
    print(f"wrote {out} ({hf.family_of(cfg.model)}) from {run_dir} at step {step}")
    return out


def inspect(path: Path, *, check_weights: bool) -> str:
    """The `model:` YAML section of the Hugging Face folder `path`."""
    cfg = hf.model_config_from_hf(hf.read_hf_config(path))
    if check_weights:
        hf.load_params(path, cfg)
    text = yaml.safe_dump({"model": cfg.model_dump(mode="json")}, sort_keys=False)
    print(text, end="")
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m jaxllm.convert", description=__doc__.split("\n")[0]
    )
    sub = ap.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="a run's newest checkpoint → Hugging Face folder")
    ex.add_argument("run_dir", type=Path)
    ex.add_argument("out_dir", type=Path)
    ex.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), default=None,
        help="dtype of the written tensors (default: the run's param_dtype)",
    )  # fmt: skip
    ex.add_argument("--max-shard-gb", type=float, default=4.0, help="size of one safetensors file")
    ins = sub.add_parser("inspect", help="the jaxllm model config of a Hugging Face folder")
    ins.add_argument("hf_dir", type=Path)
    ins.add_argument("--check-weights", action="store_true", help="also read every tensor")
    args = ap.parse_args(argv)

    try:
        if args.command == "export":
            export(args.run_dir, args.out_dir, dtype=args.dtype,
                   max_shard_bytes=int(args.max_shard_gb * 2**30))  # fmt: skip
        else:
            inspect(args.hf_dir, check_weights=args.check_weights)
    except (ConfigError, SafetensorsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
