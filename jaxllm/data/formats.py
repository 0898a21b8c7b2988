"""File formats beyond text and JSONL: Parquet (a text column) and pre-tokenized ArrayRecord.

`data.source=parquet`: every row of every Parquet file that `data.path` names is one document,
its text in column `data.field` (needs `pyarrow`). A document's key is `<file>:<row>`.

`data.source=arrayrecord`: a folder written by `python -m jaxllm.data prepare` — documents
already tokenized, so a run skips tokenization entirely. The folder holds `meta.json` and
`docs-NNNNN.array_record` shards; each record is one document:

    key length (uint32, little-endian) | key (UTF-8) | tokens (meta["dtype"], little-endian)

The key is the source document's own key, so the train / validation split (a hash of the key)
and hence every batch are the same as when training from the source directly. `meta.json`
names the tokenizer (with a fingerprint of its file); reading with another tokenizer stops
with an error instead of feeding ids the model's embedding does not mean.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from jaxllm.data.documents import BadDocuments, DataError, Document, resolve_files
from jaxllm.data.tokenizers import build_tokenizer

FORMAT = "jaxllm-tokens-v1"


# ----------------------------------------------------------------------------- parquet


def parquet_documents(path: str, column: str, bad: BadDocuments | None = None) -> list[Document]:
    """`row[column]` of every row of each Parquet file that `path` names, in file order."""
    bad = bad or BadDocuments()
    try:
        import pyarrow.parquet as pq  # optional (the `hf` extra): only Parquet sources need it
    except ImportError:
        raise DataError("data.source=parquet needs the 'pyarrow' package") from None
    documents = []
    for key, file in resolve_files(path):
        try:
            table = pq.ParquetFile(file)
        except Exception as e:  # pyarrow raises its own ArrowInvalid / OSError types
            raise DataError(f"data.path: {file} is not a Parquet file ({e})") from None
        if column not in table.schema_arrow.names:
            names = ", ".join(table.schema_arrow.names)
            raise DataError(f"data.path: {file} has no column {column!r} (data.field); has {names}")
        row = 0
        for batch in table.iter_batches(columns=[column]):
            for value in batch.column(0).to_pylist():
                where = f"data.path: {file} row {row}"
                if value is not None and not isinstance(value, str):
                    bad("not_a_string", f"{where}: {column!r} is a {type(value).__name__}")
                elif not value:
                    # A null or empty cell holds no document.
                    bad("empty", f"{where}: {column!r} is empty")
                else:
                    documents.append(Document(f"{key}:{row}", value))
                row += 1
    return documents


# ------------------------------------------------------------------------- arrayrecord


def tokenizer_fingerprint(name: str, path: str | None) -> str:
    """`bytes`, or `<name>:<sha1 of the tokenizer file>`: what fixes the id of every token."""
    if name == "bytes":
        return "bytes"
    file = Path(path or "")
    if file.is_dir():
        file = file / ("tokenizer.json" if name == "hf" else "tokenizer.model")
    try:
        return f"{name}:{hashlib.sha1(file.read_bytes()).hexdigest()}"
    except OSError as e:
        raise DataError(f"data.tokenizer_path: cannot read {file} ({e.strerror})") from None


def _encode_record(key: str, tokens: np.ndarray, dtype: np.dtype) -> bytes:
    k = key.encode("utf-8")
    return struct.pack("<I", len(k)) + k + np.asarray(tokens, dtype.newbyteorder("<")).tobytes()


def _decode_record(record: bytes, dtype: np.dtype) -> tuple[str, np.ndarray]:
    (n,) = struct.unpack_from("<I", record)
    key = record[4 : 4 + n].decode("utf-8")
    return key, np.frombuffer(record, dtype.newbyteorder("<"), offset=4 + n).astype(np.int32)


def write_prepared(
    out: str | Path,
    documents: Sequence[Document],
    tokens: Sequence[np.ndarray],
    *,
    tokenizer: str,
    fingerprint: str,
    vocab_size: int,
    docs_per_shard: int = 100_000,
) -> dict:
    """Write tokenized documents as ArrayRecord shards plus meta.json; returns the meta."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(np.uint16 if vocab_size <= 2**16 else np.int32)
    shards = []
    for start in range(0, max(len(documents), 1), docs_per_shard):
        name = f"docs-{len(shards):05d}.array_record"
        writer = ArrayRecordWriter(str(out / name), "group_size:1")
        for doc, ids in zip(documents[start : start + docs_per_shard], tokens[start:]):
            writer.write(_encode_record(doc.key, ids, dtype))
        writer.close()
        shards.append(name)
    meta = {
        "format": FORMAT,
        "tokenizer": tokenizer,
        "fingerprint": fingerprint,
        "vocab_size": vocab_size,
        "dtype": dtype.name,
        "documents": len(documents),
        "tokens": int(sum(len(t) for t in tokens)),
        "shards": shards,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def arrayrecord_documents(path: str, *, fingerprint: str) -> list[Document]:
    """The pre-tokenized documents of a `prepare` folder (`Document.tokens` set, text empty)."""
    folder = Path(path)
    meta_file = folder / "meta.json"
    if not meta_file.exists():
        raise DataError(
            f"data.path: {folder} has no meta.json (write it with `python -m jaxllm.data prepare`)"
        )
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT:
        raise DataError(f"data.path: {meta_file} is of format {meta.get('format')!r}, not {FORMAT}")
    if meta["fingerprint"] != fingerprint:
        raise DataError(
            f"data.path: {folder} was tokenized with {meta['fingerprint']}, but this run's "
            f"tokenizer is {fingerprint}; prepare it again or set data.tokenizer to match"
        )
    dtype = np.dtype(meta["dtype"])
    documents = []
    for name in meta["shards"]:
        file = folder / name
        if not file.exists():
            raise DataError(f"data.path: shard {file} listed in meta.json is missing")
        reader = ArrayRecordReader(str(file))
        for record in reader.read_all():
            key, ids = _decode_record(record, dtype)
            documents.append(Document(key, "", tokens=ids))
        reader.close()
    if len(documents) != meta["documents"]:
        raise DataError(
            f"data.path: {folder} holds {len(documents)} documents, meta.json says "
            f"{meta['documents']}"
        )
    return documents


# ------------------------------------------------------------------------- tokenizing


def _encode_chunk(args: tuple[tuple[str, str | None], list[str]]) -> list[np.ndarray]:
    spec, texts = args
    tokenizer = _worker_tokenizer(spec)
    return [tokenizer.encode(t) for t in texts]


_CACHED: dict = {}


def _worker_tokenizer(spec: tuple[str, str | None]):
    # Each worker process builds the tokenizer once, not once per chunk.
    if spec not in _CACHED:
        _CACHED[spec] = build_tokenizer(*spec)
    return _CACHED[spec]


def tokenize_all(
    tokenizer,
    texts: Sequence[str],
    *,
    workers: int = 0,
    spec: tuple[str, str | None] = ("bytes", None),
    chunk: int = 256,
) -> list[np.ndarray]:
    """`tokenizer.encode` of every text, in order; with `workers` > 0 in that many spawned
    processes, each building its own copy from `spec` = (data.tokenizer, data.tokenizer_path)."""
    if workers <= 0 or len(texts) < 2 * chunk:
        return [tokenizer.encode(t) for t in texts]
    pieces = [(spec, list(texts[i : i + chunk])) for i in range(0, len(texts), chunk)]
    # spawn, not fork: the parent may already run JAX's threads.
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        return [ids for part in pool.map(_encode_chunk, pieces) for ids in part]
