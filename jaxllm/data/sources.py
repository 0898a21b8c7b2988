"""Where documents come from, and which of them are held out for validation.

Three sources (`data.source`):

- `corpus` (default): the `.py` files of the running interpreter's standard library
  (`sysconfig.get_paths()["stdlib"]`, without `site-packages` / `dist-packages`). Every Python
  install has it, so the default run needs no download. A few of its files are deliberately not
  UTF-8 (encoding tests); their bad bytes become U+FFFD.
- `text`: `data.path` is a file, a directory (every non-hidden file below it) or a glob; each file
  is one UTF-8 document.
- `jsonl`: the same kinds of path; each non-blank line is a JSON object and `obj[data.field]` is
  one document.

A document's `key` is its path relative to the source's root (plus `:<line>` for jsonl). The
split is a pure function of the key — a stable hash, not Python's salted `hash()` — so a document
is on the same side of the split on every machine and every run, and raising `val_fraction` only
moves documents from train to validation.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path


class DataError(ValueError):
    """A user error in the data section (a missing path, an empty source, a bad line)."""


@dataclasses.dataclass(frozen=True)
class Document:
    key: str
    text: str


_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_GLOB_CHARS = frozenset("*?[")


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
        for path in _walk(root, excluded=_EXCLUDED_DIRS)
        if path.suffix == ".py"
    )
    if not files:
        raise DataError(f"data.source=corpus: no .py files under {root}")
    return [Document(key, path.read_bytes().decode("utf-8", "replace")) for key, path in files]


def text_documents(path: str) -> list[Document]:
    """Each file that `path` names (file, directory or glob) is one UTF-8 document."""
    return [Document(key, _read_utf8(file)) for key, file in resolve_files(path)]


def jsonl_documents(path: str, field: str) -> list[Document]:
    """`obj[field]` of each non-blank line of each file that `path` names."""
    documents = []
    for key, file in resolve_files(path):
        for lineno, line in enumerate(_read_utf8(file).splitlines(), start=1):
            if not line.strip():
                continue
            where = f"data.path: {file}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not a JSON object ({e.msg})") from None
            if not isinstance(obj, dict) or field not in obj:
                raise DataError(f"{where}: no field {field!r} (data.field)")
            if not isinstance(obj[field], str):
                kind = type(obj[field]).__name__
                raise DataError(f"{where}: field {field!r} is a {kind}, not a string")
            documents.append(Document(f"{key}:{lineno}", obj[field]))
    return documents


def read_documents(cfg) -> list[Document]:
    """The documents of `cfg` (a `DataConfig`: `source`, `path`, `field`), in a fixed order."""
    if cfg.source == "corpus":
        return corpus_documents()
    if not cfg.path:
        raise DataError(f"data.path is required with data.source={cfg.source}")
    if cfg.source == "text":
        return text_documents(cfg.path)
    if cfg.source == "jsonl":
        documents = jsonl_documents(cfg.path, cfg.field)
        if not documents:
            raise DataError(f"data.path: {cfg.path} holds no JSON lines")
        return documents
    raise DataError(f"data.source: unknown source {cfg.source!r}; known: corpus, text, jsonl")


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


def resolve_files(path: str) -> list[tuple[str, Path]]:
    """(key, file) for every file `path` names, sorted by key (the path relative to the root).

    A file is its own root's only member (key = its name); a directory is the root of every
    non-hidden file below it; a glob's root is the part of the pattern before its first wildcard.
    """
    expanded = os.path.expanduser(path)
    parts = Path(expanded).parts
    if any(_GLOB_CHARS & set(part) for part in parts):
        fixed = []
        for part in parts:
            if _GLOB_CHARS & set(part):
                break
            fixed.append(part)
        root = Path(*fixed) if fixed else Path()
        files = [Path(m) for m in glob.glob(expanded, recursive=True) if os.path.isfile(m)]
        if not files:
            raise DataError(f"data.path: no files match {path}")
    elif os.path.isdir(expanded):
        root = Path(expanded)
        files = list(_walk(root, excluded=frozenset()))
        if not files:
            raise DataError(f"data.path: directory {path} holds no files")
    elif os.path.isfile(expanded):
        root = Path(expanded).parent
        files = [Path(expanded)]
    else:
        raise DataError(f"data.path: {path} does not exist")
    return sorted((file.relative_to(root).as_posix(), file) for file in files)


def _walk(root: Path, *, excluded: frozenset[str]) -> Iterator[Path]:
    """Every non-hidden regular file below `root`, skipping directories named in `excluded`."""
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in excluded and not d.startswith(".")]
        for name in names:
            file = Path(directory, name)
            if not name.startswith(".") and file.is_file():
                yield file


def _read_utf8(file: Path) -> str:
    try:
        return file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data.path: {file} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise DataError(f"data.path: cannot read {file} ({e.strerror})") from None
