"""Tokenizers from files: a Hugging Face `tokenizer.json` and a SentencePiece `.model`.

Both need an optional package (the `hf` extra: `tokenizers`, `sentencepiece`), imported only
when such a tokenizer is asked for. Both give what the pipeline and the sampler use of
`ByteTokenizer`: `encode(text) -> int32 [N]` (no special ids), `decode(ids) -> str` (special ids
dropped), `vocab_size`, `bos_id`, `eos_id`, `pad_id`.

Special tokens: a `tokenizer.json` does not say which of its tokens is BOS or EOS; they come from
`tokenizer_config.json` (or `special_tokens_map.json`) beside it, else from the usual names.
A model without a BOS (Qwen2, GPT-2) starts documents with its EOS; without a PAD, pads with EOS
(padding is masked out of the loss either way).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxllm.data.documents import DataError

_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "[CLS]", "<|startoftext|>")
_EOS_NAMES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "[SEP]", "<|im_end|>")
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>")


def _require(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(
            f"data.tokenizer needs the {module!r} package: pip install 'jaxllm[hf]'"
        ) from None


def _token_text(value) -> str | None:
    """A special-token entry of tokenizer_config.json: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer:
    """A Hugging Face fast tokenizer (`tokenizer.json`), by file or by its folder."""

    name = "hf"

    def __init__(self, path: str | Path):
        tokenizers = _require("tokenizers")
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            raise DataError(f"data.tokenizer_path: {file} does not exist")
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust library raises its own exception types
            raise DataError(f"data.tokenizer_path: {file} is not a tokenizer.json ({e})") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        named = self._named_specials(file.parent)
        bos = self._find(named.get("bos_token"), _BOS_NAMES)
        eos = self._find(named.get("eos_token"), _EOS_NAMES)
        if eos is None:
            raise DataError(
                f"data.tokenizer_path: {file} has no end-of-text token (none named in "
                f"tokenizer_config.json, none of {', '.join(_EOS_NAMES)})"
            )
        pad = self._find(named.get("pad_token"), _PAD_NAMES)
        self.eos_id = eos
        self.bos_id = eos if bos is None else bos
        self.pad_id = eos if pad is None else pad

    @staticmethod
    def _named_specials(folder: Path) -> dict[str, str]:
        out: dict[str, str] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            file = folder / name
            if file.exists():
                try:
                    data = json.loads(file.read_text())
                except json.JSONDecodeError as e:
                    raise DataError(f"{file}: not JSON ({e.msg})") from None
                for key in ("bos_token", "eos_token", "pad_token"):
                    text = _token_text(data.get(key))
                    if text:
                        out[key] = text
        return out

    def _find(self, named: str | None, fallbacks: Sequence[str]) -> int | None:
        for text in ([named] if named else []) + list(fallbacks):
            i = self._tok.token_to_id(text)
            if i is not None:
                return int(i)
        return None

    def encode(self, text: str) -> np.ndarray:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return np.asarray(ids, dtype=np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        ids_N = np.asarray(ids, dtype=np.int64).reshape(-1)
        ids_N = ids_N[(ids_N >= 0) & (ids_N < self.vocab_size)]
        return self._tok.decode(ids_N.tolist(), skip_special_tokens=True)


class SentencePieceTokenizer:
    """A SentencePiece model file (`tokenizer.model`), by file or by its folder."""

    name = "sentencepiece"

    def __init__(self, path: str | Path):
        spm = _require("sentencepiece")
        path = Path(path)
        file = path / "tokenizer.model" if path.is_dir() else path
        if not file.exists():
            raise DataError(f"data.tokenizer_path: {file} does not exist")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(file))
        except (RuntimeError, OSError) as e:
            raise DataError(
                f"data.tokenizer_path: {file} is not a SentencePiece model ({e})"
            ) from None
        self.vocab_size = int(self._sp.get_piece_size())
        bos, eos, pad = self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id()
        if eos < 0:
            raise DataError(f"data.tokenizer_path: {file} has no EOS piece (eos_id = -1)")
        self.eos_id = int(eos)
        self.bos_id = int(bos) if bos >= 0 else self.eos_id
        self.pad_id = int(pad) if pad >= 0 else self.eos_id

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text, out_type=int), dtype=np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        ids_N = np.asarray(ids, dtype=np.int64).reshape(-1)
        special = {self.bos_id, self.eos_id, self.pad_id}
        keep = [int(i) for i in ids_N if 0 <= i < self.vocab_size and int(i) not in special]
        return self._sp.decode(keep)
