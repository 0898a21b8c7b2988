"""Data: sources (the embedded corpus, text, jsonl), tokenizers and the grain pipeline.

The trainer builds one `Pipeline(cfg.data, seed=..., process_index=..., process_count=...)` and
calls `train_iterator()`, `val_batches(n)` and `stats()`; any bad input raises `DataError`.
"""

from jaxllm.data.documents import DataError, Document
from jaxllm.data.pipeline import Pipeline, assemble_batch, pack_documents
from jaxllm.data.sources import read_documents, split_documents
from jaxllm.data.tokenizers import ByteTokenizer, build_tokenizer

__all__ = [
    "ByteTokenizer",
    "DataError",
    "Document",
    "Pipeline",
    "assemble_batch",
    "build_tokenizer",
    "pack_documents",
    "read_documents",
    "split_documents",
]
