"""The grain pipeline: documents → one packed token stream → shuffled, sharded batches.

Each split's documents are tokenized to `[BOS] text [EOS]` and laid end to end in one flat array
(train documents in a seeded random order), padded with PAD to whole windows. Window `i` is the
`seq_len + 1` tokens from `i * seq_len`; it gives the example

    inputs      = window[:-1]                       int32   [T]
    targets     = window[1:]                        int32   [T]
    segment_ids = 1, 2, ... per document (0 = PAD)  int32   [T]
    positions   = index within the document's part of the window (restarts at 0)   int32 [T]
    loss_mask   = 1 where target and input are of the same document, 0 elsewhere and on PAD
    domain      = the input token's document's domain (0 on PAD)    int32 [T], only when
                  `data.domains` is set (PanGu-Σ RRE routes by it)

so no token is trained to predict the next document's BOS, and attention can be kept within a
document through `segment_ids`. Positions restart at each window so that they stay below
`seq_len` whatever a document's length.

The windows are a grain `MapDataset` of window ids (random access, so the iterator state is one
integer): shuffled by seed (each epoch anew), repeated forever, and dealt to the processes
round-robin — process `p` of `P` gets elements `p, p + P, ...` of the one global order, so the
processes' batches at step `i` together hold exactly the global batch `i` of a single process.
Batches are assembled from the ids with vectorised NumPy.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from jaxllm.data.documents import BadDocuments, DataError, Document
from jaxllm.data.formats import tokenize_all
from jaxllm.data.sources import assign_domains, read_documents, split_documents
from jaxllm.data.tokenizers import ByteTokenizer, build_tokenizer

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class PackedStream:
    """One split's documents end to end.

    tokens_N: [n_windows * seq_len + 1] — `[BOS] doc [EOS]` per document, then PAD to fill the
      last window.
    starts_M: int64 [n_documents + 1] — where each document's BOS is; the last entry is the number
      of real (non-PAD) tokens.
    domains_M: int32 [n_documents] — each document's domain, or None (batches get no `domain`).
    """

    tokens_N: np.ndarray
    starts_M: np.ndarray
    seq_len: int
    domains_M: np.ndarray | None = None

    @property
    def n_documents(self) -> int:
        return len(self.starts_M) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.starts_M[-1])

    @property
    def n_windows(self) -> int:
        return (len(self.tokens_N) - 1) // self.seq_len if len(self.tokens_N) else 0


def pack_documents(
    token_arrays: Sequence[np.ndarray],
    *,
    seq_len: int,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    dtype: np.dtype | type = np.int32,
    domains: Sequence[int] | None = None,
) -> PackedStream:
    """Lay `[BOS] tokens [EOS]` of each array end to end, padded with PAD to whole windows;
    `domains` (one per array) makes the batches carry a per-token `domain`."""
    lengths_M = np.fromiter((len(a) + 2 for a in token_arrays), np.int64, len(token_arrays))
    starts_M = np.zeros(len(token_arrays) + 1, np.int64)
    np.cumsum(lengths_M, out=starts_M[1:])
    n_real = int(starts_M[-1])
    # Window i predicts targets i*T+1 .. i*T+T, so ceil((n_real - 1) / T) windows cover them all.
    n_windows = -(-(n_real - 1) // seq_len) if n_real > 1 else 0
    tokens_N = np.full(n_windows * seq_len + 1 if n_windows else 0, pad_id, dtype)
    tokens_N[starts_M[:-1]] = bos_id
    tokens_N[starts_M[1:] - 1] = eos_id
    for start, array in zip(starts_M[:-1], token_arrays):
        tokens_N[start + 1 : start + 1 + len(array)] = array
    domains_M = None if domains is None else np.asarray(domains, np.int32).reshape(-1)
    return PackedStream(tokens_N, starts_M, seq_len, domains_M)


def assemble_batch(stream: PackedStream, window_ids_B: np.ndarray) -> Batch:
    """The examples of windows `window_ids_B` [B] of `stream`, each array [B, T] (T = seq_len)."""
    T = stream.seq_len
    window_ids_B = np.asarray(window_ids_B, np.int64).reshape(-1)
    offsets_BW = window_ids_B[:, None] * T + np.arange(T + 1)
    tokens_BW = stream.tokens_N[offsets_BW].astype(np.int32)
    # Document of every token; PAD (at or after the last real token) is document -1.
    doc_BW = np.searchsorted(stream.starts_M, offsets_BW, side="right") - 1
    doc_BW[offsets_BW >= stream.n_tokens] = -1
    doc_BT = doc_BW[:, :-1]
    is_pad_BT = doc_BT < 0

    t_T = np.arange(T)
    new_BT = np.ones_like(doc_BT, dtype=bool)
    new_BT[:, 1:] = doc_BT[:, 1:] != doc_BT[:, :-1]
    segment_ids_BT = np.cumsum(new_BT, axis=1, dtype=np.int32)
    segment_start_BT = np.maximum.accumulate(np.where(new_BT, t_T, 0), axis=1)
    positions_BT = (t_T - segment_start_BT).astype(np.int32)
    segment_ids_BT[is_pad_BT] = 0
    positions_BT[is_pad_BT] = 0
    loss_mask_BT = (doc_BW[:, 1:] == doc_BT) & (doc_BW[:, 1:] >= 0)
    batch = {
        "inputs": tokens_BW[:, :-1],
        "targets": tokens_BW[:, 1:],
        "segment_ids": segment_ids_BT,
        "positions": positions_BT,
        "loss_mask": loss_mask_BT.astype(np.float32),
    }
    if stream.domains_M is not None:
        batch["domain"] = np.where(is_pad_BT, 0, stream.domains_M[np.maximum(doc_BT, 0)])
    return batch


class Pipeline:
    """Batches of `cfg` (a `DataConfig`) for one process of `process_count`.

    Every batch array is [batch_size // process_count, seq_len]. Building reads and packs the
    whole source once (the standard-library corpus takes about a second).
    """

    def __init__(self, cfg, *, seed: int, process_index: int = 0, process_count: int = 1):
        if process_count < 1 or not 0 <= process_index < process_count:
            raise DataError(f"data: process {process_index} of {process_count} does not exist")
        if cfg.batch_size % process_count:
            raise DataError(
                f"data.batch_size={cfg.batch_size} must be a multiple of the number of "
                f"processes ({process_count})"
            )
        started = time.perf_counter()
        self.cfg = cfg
        self.seed = seed % 2**32
        self.process_index = process_index
        self.process_count = process_count
        self.batch_per_process = cfg.batch_size // process_count
        self.tokenizer: ByteTokenizer = build_tokenizer(cfg.tokenizer, cfg.tokenizer_path)

        self.bad = BadDocuments(getattr(cfg, "on_bad_document", "stop"))
        documents = read_documents(cfg, self.bad)
        self._domains = getattr(cfg, "domains", None) or {}
        if self._domains:
            documents = assign_domains(documents, self._domains)
        train_docs, val_docs = split_documents(documents, cfg.val_fraction)
        if not train_docs:
            raise DataError(
                f"data: all {len(documents)} documents fell in the validation split "
                f"(data.val_fraction={cfg.val_fraction}); add documents or lower it"
            )
        if cfg.shuffle:
            order = np.random.default_rng([self.seed, 1]).permutation(len(train_docs))
            train_docs = [train_docs[i] for i in order]
        self._train = self._pack(train_docs)
        self._val = self._pack(val_docs)
        self._build_seconds = time.perf_counter() - started
        self._identity: dict[str, Any] | None = None

    def _pack(self, documents: Sequence[Document]) -> PackedStream:
        tok = self.tokenizer
        todo = [d.text for d in documents if d.tokens is None]
        spec = (self.cfg.tokenizer, self.cfg.tokenizer_path)
        encoded = iter(tokenize_all(tok, todo, workers=self.cfg.tokenize_workers, spec=spec))
        arrays = [d.tokens if d.tokens is not None else next(encoded) for d in documents]
        policy = getattr(self.cfg, "long_documents", "split")
        if policy != "split":
            # [BOS] doc [EOS] fits one window of seq_len + 1 tokens when len(doc) < seq_len.
            long = [i for i, a in enumerate(arrays) if len(a) >= self.cfg.seq_len]
            if long and policy == "stop":
                d, n = documents[long[0]], len(arrays[long[0]])
                raise DataError(
                    f"data: document {d.key} has {n} tokens, more than data.seq_len="
                    f"{self.cfg.seq_len} holds (data.long_documents=split|skip); {len(long)} such"
                )
            if long:
                self.bad.counts["long"] = self.bad.counts.get("long", 0) + len(long)
            drop = set(long)
            arrays = [a for i, a in enumerate(arrays) if i not in drop]
            documents = [d for i, d in enumerate(documents) if i not in drop]
        return pack_documents(
            arrays,
            seq_len=self.cfg.seq_len,
            bos_id=tok.bos_id,
            eos_id=tok.eos_id,
            pad_id=tok.pad_id,
            dtype=np.uint16 if tok.vocab_size <= 2**16 else np.int32,
            domains=[d.domain for d in documents] if self._domains else None,
        )

    def _batches(self, stream: PackedStream, *, shuffle: bool) -> grain.MapDataset:
        ds = grain.MapDataset.range(stream.n_windows)
        if shuffle:
            ds = ds.seed(self.seed).shuffle()
        ds = ds.repeat()[self.process_index :: self.process_count]
        ds = ds.batch(self.batch_per_process, drop_remainder=True)
        return ds.map(functools.partial(assemble_batch, stream))

    def train_iterator(self) -> grain.DatasetIterator:
        """An endless iterator of training batches from the start; checkpoint it with
        `grain.checkpoint.CheckpointSave(iterator)`."""
        threads = self.cfg.num_threads
        options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)
        ds = self._batches(self._train, shuffle=self.cfg.shuffle).to_iter_dataset(options)
        return _CheckedIterator(iter(ds), self._pipeline_identity())

    def val_batches(self, n: int) -> list[Batch]:
        """The first `n` batches of the validation split, in file order (cycled if it is short)."""
        if self._val.n_windows == 0:
            raise DataError(
                "data: the validation split is empty "
                f"(data.val_fraction={self.cfg.val_fraction}); add documents or raise it"
            )
        ds = self._batches(self._val, shuffle=False)
        return [ds[i] for i in range(n)]

    def stats(self) -> dict[str, float]:
        """Documents, tokens (with BOS/EOS) and windows of each split, and the build time."""
        return {
            "train_documents": self._train.n_documents,
            "train_tokens": self._train.n_tokens,
            "train_windows": self._train.n_windows,
            "val_documents": self._val.n_documents,
            "val_tokens": self._val.n_tokens,
            "val_windows": self._val.n_windows,
            "build_seconds": round(self._build_seconds, 3),
            **{f"skipped_{reason}": n for reason, n in sorted(self.bad.counts.items())},
        }

    def _pipeline_identity(self) -> dict[str, Any]:
        """What fixes the order of training batches; JSON-native, so it survives a checkpoint."""
        if self._identity is None:
            digest = hashlib.sha1(memoryview(self._train.tokens_N).cast("B")).hexdigest()
            self._identity = {
                "train_stream_sha1": digest,
                "seq_len": self.cfg.seq_len,
                "batch_size": self.cfg.batch_size,
                "shuffle": bool(self.cfg.shuffle),
                "seed": self.seed,
                "process": f"{self.process_index}/{self.process_count}",
            }
            if self._domains:
                self._identity["domains"] = dict(self._domains)
        return self._identity


class _CheckedIterator(grain.DatasetIterator):
    """The training iterator. Its state also says which pipeline made it, so that restoring a
    checkpoint of another pipeline (other data, seq_len, batch, seed) fails loudly instead of
    quietly giving other batches than the interrupted run would have seen."""

    def __init__(self, parent: grain.DatasetIterator, identity: dict[str, Any]):
        super().__init__(parent)
        self._identity = identity

    def __next__(self) -> Batch:
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return {"pipeline": dict(self._identity), "iterator": self._parent.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        saved = state.get("pipeline", {})
        # "process" may differ: the iterator's position is a batch index, and batch i of all
        # processes together is global batch i whatever their number (round-robin dealing)
        changed = sorted(
            k for k in self._identity if k != "process" and saved.get(k) != self._identity[k]
        )
        if changed:
            raise DataError(
                f"data: the checkpoint's data state is of another pipeline ({', '.join(changed)} "
                "differ); resume with the same data, seed and process count, or start a new run"
            )
        self._parent.set_state(state["iterator"])

    def __str__(self) -> str:
        return f"jaxllm.data.Pipeline iterator ({self._identity['process']})"
