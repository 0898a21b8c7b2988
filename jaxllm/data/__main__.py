"""Tokenize a corpus once: `python -m jaxllm.data prepare [PRESET] [key=value ...] --out DIR`.

Reads the documents the config's `data` section names (any source but `arrayrecord`), tokenizes
them with its tokenizer (in `--workers` processes) and writes ArrayRecord shards plus meta.json
to DIR. Train from them with `data.source=arrayrecord data.path=DIR` and the same tokenizer:
the batches are the same as from the source, without tokenizing at start-up.
Exit codes: 0 success, 2 user error.
"""

from __future__ import annotations

import argparse
import sys

from jaxllm import config
from jaxllm.data.documents import BadDocuments, DataError
from jaxllm.data.formats import tokenize_all, tokenizer_fingerprint, write_prepared
from jaxllm.data.sources import read_documents
from jaxllm.data.tokenizers import build_tokenizer


def prepare(cfg_data, out: str, *, workers: int, docs_per_shard: int) -> dict:
    """Tokenize the documents of `cfg_data` (a `DataConfig`) into `out`; returns meta.json."""
    if cfg_data.source == "arrayrecord":
        raise DataError("data.source=arrayrecord is already tokenized; name the raw source")
    tokenizer = build_tokenizer(cfg_data.tokenizer, cfg_data.tokenizer_path)
    bad = BadDocuments(cfg_data.on_bad_document)
    documents = read_documents(cfg_data, bad)
    spec = (cfg_data.tokenizer, cfg_data.tokenizer_path)
    tokens = tokenize_all(tokenizer, [d.text for d in documents], workers=workers, spec=spec)
    meta = write_prepared(
        out,
        documents,
        tokens,
        tokenizer=cfg_data.tokenizer,
        fingerprint=tokenizer_fingerprint(*spec),
        vocab_size=tokenizer.vocab_size,
        docs_per_shard=docs_per_shard,
    )
    return {**meta, "skipped": dict(bad.counts)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jaxllm.data", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("prepare", help="tokenize a corpus into ArrayRecord shards")
    pr.add_argument("config", nargs="*", help="[PRESET_OR_PATH] [key.sub=value ...]")
    pr.add_argument("--out", required=True, help="folder to write")
    pr.add_argument("--workers", type=int, default=None, help="default data.tokenize_workers")
    pr.add_argument("--docs-per-shard", type=int, default=100_000)
    args = ap.parse_args(argv)

    items = list(args.config)
    preset = items.pop(0) if items and "=" not in items[0] else "default"
    try:
        cfg = config.load(preset, items)
        workers = cfg.data.tokenize_workers if args.workers is None else args.workers
        meta = prepare(cfg.data, args.out, workers=workers, docs_per_shard=args.docs_per_shard)
    except (config.ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {meta['documents']} documents, {meta['tokens']} tokens ({meta['tokenizer']}) in "
        f"{len(meta['shards'])} shards to {args.out} (skipped: {meta['skipped'] or 'none'})\n"
        f"train with: data.source=arrayrecord data.path={args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
