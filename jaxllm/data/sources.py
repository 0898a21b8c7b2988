"""Where documents come from, and which of them are held out for validation.

Sources (`data.source`):

- `corpus` (default): the `.py` files of the running interpreter's standard library
  (`sysconfig.get_paths()["stdlib"]`, without `site-packages` / `dist-packages`). Every Python
  install has it, so the default run needs no download. A few of its files are deliberately not
  UTF-8 (encoding tests); their bad bytes become U+FFFD.
- `text`: `data.path` is a file, a directory (every non-hidden file below it) or a glob; each file
  is one UTF-8 document.
- `jsonl`: the same kinds of path; each non-blank line is a JSON object and `obj[data.field]` is
  one document.
- `parquet`, `arrayrecord` (pre-tokenized): see `jaxllm.data.formats`.

A document's `key` is its path relative to the source's root (plus `:<line>` for jsonl). The
split is a pure function of the key — a stable hash, not Python's salted `hash()` — so a document
is on the same side of the split on every machine and every run, and raising `val_fraction` only
moves documents from train to validation. The key also picks a document's data domain
(`data.domains`, key regex → id; PanGu-Σ RRE routes tokens by it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import sysconfig
from collections.abc import Sequence
from pathlib import Path

from jaxllm.data.documents import BadDocuments, DataError, Document, resolve_files, walk_files
from jaxllm.data.formats import arrayrecord_documents, parquet_documents, tokenizer_fingerprint

_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


def corpus_root() -> Path:
    """The directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_documents() -> list[Document]:
    """The standard library's `.py` files, in sorted order of relative path."""
    root = corpus_root()
    if not root.is_dir():
        raise DataError(f"data.source=corpus: the standard library {root} is not a directory")
    files = sorted(
        (path.relative_to(root).as_posix(), path)
        for path in walk_files(root, excluded=_EXCLUDED_DIRS)
        if path.suffix == ".py"
    )
    if not files:
        raise DataError(f"data.source=corpus: no .py files under {root}")
    return [Document(key, path.read_bytes().decode("utf-8", "replace")) for key, path in files]


def text_documents(path: str, bad: BadDocuments | None = None) -> list[Document]:
    """Each file that `path` names (file, directory or glob) is one UTF-8 document."""
    bad = bad or BadDocuments()
    documents = []
    for key, file in resolve_files(path):
        try:
            text = _read_utf8(file)
        except _NotUTF8 as e:
            bad("invalid_utf8", str(e))
            continue
        if not text:
            bad("empty", f"data.path: {file} is empty")
            continue
        documents.append(Document(key, text))
    return documents


def jsonl_documents(path: str, field: str, bad: BadDocuments | None = None) -> list[Document]:
    """`obj[field]` of each non-blank line of each file that `path` names."""
    bad = bad or BadDocuments()
    documents = []
    for key, file in resolve_files(path):
        for lineno, raw in enumerate(_read_bytes(file).splitlines(), start=1):
            where = f"data.path: {file}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad("invalid_utf8", f"{where}: not UTF-8 text (byte {e.start})")
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                bad("invalid_json", f"{where}: not a JSON object ({e.msg})")
                continue
            if not isinstance(obj, dict) or field not in obj:
                bad("missing_field", f"{where}: no field {field!r} (data.field)")
                continue
            if not isinstance(obj[field], str):
                kind = type(obj[field]).__name__
                bad("not_a_string", f"{where}: field {field!r} is a {kind}, not a string")
                continue
            if not obj[field]:
                bad("empty", f"{where}: field {field!r} is empty")
                continue
            documents.append(Document(f"{key}:{lineno}", obj[field]))
    return documents


def read_documents(cfg, bad: BadDocuments | None = None) -> list[Document]:
    """The documents of `cfg` (a `DataConfig`: `source`, `path`, `field`), in a fixed order;
    bad ones are handled by `bad` (default: `cfg.on_bad_document`)."""
    if bad is None:
        bad = BadDocuments(getattr(cfg, "on_bad_document", "stop"))
    if cfg.source == "corpus":
        return corpus_documents()
    if not cfg.path:
        raise DataError(f"data.path is required with data.source={cfg.source}")
    if cfg.source == "text":
        documents = text_documents(cfg.path, bad)
        if not documents:
            raise DataError(f"data.path: {cfg.path} holds no usable documents ({bad.counts})")
        return documents
    if cfg.source == "jsonl":
        documents = jsonl_documents(cfg.path, cfg.field, bad)
        if not documents:
            raise DataError(f"data.path: {cfg.path} holds no JSON lines")
        return documents
    if cfg.source in ("parquet", "arrayrecord"):
        if cfg.source == "parquet":
            documents = parquet_documents(cfg.path, cfg.field, bad)
        else:
            fingerprint = tokenizer_fingerprint(cfg.tokenizer, cfg.tokenizer_path)
            documents = arrayrecord_documents(cfg.path, fingerprint=fingerprint)
        if not documents:
            raise DataError(f"data.path: {cfg.path} holds no documents")
        return documents
    raise DataError(
        f"data.source: unknown source {cfg.source!r}; known: corpus, text, jsonl, parquet, "
        "arrayrecord"
    )


def assign_domains(documents: Sequence[Document], domains: dict[str, int]) -> list[Document]:
    """`documents` with `domain` set by `domains` (key regex → id, first `re.search` match;
    unmatched documents are domain 0)."""
    patterns = [(re.compile(p), d) for p, d in domains.items()]

    def domain_of(key: str) -> int:
        return next((d for p, d in patterns if p.search(key)), 0)

    return [dataclasses.replace(doc, domain=domain_of(doc.key)) for doc in documents]


def split_fraction(key: str) -> float:
    """A number in [0, 1) fixed by `key` alone (first 8 bytes of its SHA-1)."""
    digest = hashlib.sha1(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_documents(
    documents: Sequence[Document], val_fraction: float
) -> tuple[list[Document], list[Document]]:
    """(train, validation): a document is validation when its key's fraction < val_fraction."""
    train, val = [], []
    for document in documents:
        (val if split_fraction(document.key) < val_fraction else train).append(document)
    return train, val


class _NotUTF8(DataError):
    pass


def _read_bytes(file: Path) -> bytes:
    try:
        return file.read_bytes()
    except OSError as e:
        raise DataError(f"data.path: cannot read {file} ({e.strerror})") from None


def _read_utf8(file: Path) -> str:
    try:
        return _read_bytes(file).decode("utf-8")
    except UnicodeDecodeError as e:
        raise _NotUTF8(f"data.path: {file} is not UTF-8 text (byte {e.start})") from None
