"""Tokenizers: text ⇄ int32 token ids.

`ByteTokenizer` is the default: the 256 byte values of the UTF-8 encoding, plus three special
ids (BOS, EOS, PAD) above them. It needs no vocabulary file, never meets an unknown token, and
fits a model whose embedding has at least `vocab_size` rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxllm.data.documents import DataError
from jaxllm.data.hf_tokenizer import HFTokenizer, SentencePieceTokenizer


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255; BOS=256, EOS=257, PAD=258 (vocab_size 259)."""

    name = "bytes"
    vocab_size = 259
    bos_id = 256
    eos_id = 257
    pad_id = 258

    def encode(self, text: str) -> np.ndarray:
        """The UTF-8 bytes of `text` as an int32 array [len(utf-8 bytes)], no special ids."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of the byte ids in `ids`; special ids are dropped, bad UTF-8 becomes U+FFFD."""
        ids_N = np.asarray(ids, dtype=np.int64).reshape(-1)
        data = ids_N[(ids_N >= 0) & (ids_N < 256)].astype(np.uint8).tobytes()
        return data.decode("utf-8", errors="replace")


_TOKENIZERS = ("bytes", "hf", "sentencepiece")


def build_tokenizer(name: str, path: str | None = None) -> ByteTokenizer:
    """The tokenizer called `name` (`data.tokenizer`); `hf` (a tokenizer.json) and
    `sentencepiece` (a .model file) read `path` (`data.tokenizer_path`, a file or its folder)."""
    if name not in _TOKENIZERS:
        raise DataError(
            f"data.tokenizer: unknown tokenizer {name!r}; known: {', '.join(sorted(_TOKENIZERS))}"
        )
    if name == "bytes":
        return ByteTokenizer()
    if not path:
        raise DataError(f"data.tokenizer={name} needs data.tokenizer_path")
    cls = HFTokenizer if name == "hf" else SentencePieceTokenizer
    return cls(path)
