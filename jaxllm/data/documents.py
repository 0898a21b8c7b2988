"""What every source shares: the `Document`, the `DataError`, the policy for bad documents, and
the files a `data.path` names (a file, a directory or a glob).
"""

from __future__ import annotations

import dataclasses
import glob
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """A user error in the data section (a missing path, an empty source, a bad line)."""


@dataclasses.dataclass(frozen=True)
class Document:
    key: str
    text: str
    # Token ids when the source is already tokenized (data.source=arrayrecord); else None.
    tokens: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)
    # Data domain (PanGu-Σ RRE routes a token to its domain's experts), from `data.domains`.
    domain: int = 0


_GLOB_CHARS = frozenset("*?[")


class BadDocuments:
    """What happens to a bad document (`data.on_bad_document`): `stop` raises a `DataError`
    naming the file and line, `skip` drops it and counts it by reason (`counts`, shown in the
    pipeline's stats). Empty documents are always dropped and counted: they hold nothing to
    learn, so dropping them never changes a batch's meaning."""

    def __init__(self, policy: str = "stop"):
        self.policy = policy
        self.counts: dict[str, int] = {}

    def __call__(self, reason: str, message: str) -> None:
        if self.policy == "stop" and reason != "empty":
            raise DataError(f"{message} (data.on_bad_document=skip skips such documents)")
        self.counts[reason] = self.counts.get(reason, 0) + 1


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
        files = list(walk_files(root, excluded=frozenset()))
        if not files:
            raise DataError(f"data.path: directory {path} holds no files")
    elif os.path.isfile(expanded):
        root = Path(expanded).parent
        files = [Path(expanded)]
    else:
        raise DataError(f"data.path: {path} does not exist")
    return sorted((file.relative_to(root).as_posix(), file) for file in files)


def walk_files(root: Path, *, excluded: frozenset[str]) -> Iterator[Path]:
    """Every non-hidden regular file below `root`, skipping directories named in `excluded`."""
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in excluded and not d.startswith(".")]
        for name in names:
            file = Path(directory, name)
            if not name.startswith(".") and file.is_file():
                yield file
