"""Parquet and pre-tokenized ArrayRecord sources, `python -m jaxllm.data prepare`, and
tokenizing in worker processes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxllm.data import DataError, Pipeline, build_tokenizer, formats
from jaxllm.data import __main__ as data_cli
from tests.helpers import tiny


def _corpus(folder, n=30):
    folder.mkdir()
    for i in range(n):
        (folder / f"doc{i:02d}.txt").write_text(f"document {i} ünïcode " + "lorem ipsum " * (i % 7))
    return folder


def _batches(cfg, n=3):
    data = Pipeline(cfg.data, seed=0)
    it = data.train_iterator()
    return [next(it) for _ in range(n)], data.val_batches(2)


def test_prepared_arrayrecord_gives_the_same_batches_as_the_source(tmp_path, capsys):
    docs = _corpus(tmp_path / "docs")
    common = ["data.val_fraction=0.2", "data.seq_len=16", "data.batch_size=4"]
    out = tmp_path / "prepared"
    rc = data_cli.main(
        ["prepare", "data.source=text", f"data.path={docs}", *common, "--out", str(out),
         "--docs-per-shard", "7"]
    )  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    meta = json.loads((out / "meta.json").read_text())
    assert meta["documents"] == 30 and len(meta["shards"]) == 5 and meta["dtype"] == "uint16"
    source = _batches(tiny("data.source=text", f"data.path={docs}", *common))
    prepared = _batches(tiny("data.source=arrayrecord", f"data.path={out}", *common))
    for a, b in zip(source[0] + source[1], prepared[0] + prepared[1], strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_prepared_data_refuses_another_tokenizer(tmp_path):
    docs = _corpus(tmp_path / "docs", n=4)
    tok = build_tokenizer("bytes")
    documents = [formats.Document(p.name, p.read_text()) for p in sorted(docs.iterdir())]
    formats.write_prepared(
        tmp_path / "p", documents, [tok.encode(d.text) for d in documents],
        tokenizer="sentencepiece", fingerprint="sentencepiece:abc", vocab_size=340,
    )  # fmt: skip
    with pytest.raises(DataError, match="tokenized with sentencepiece:abc"):
        formats.arrayrecord_documents(str(tmp_path / "p"), fingerprint="bytes")
    with pytest.raises(DataError, match=r"no meta\.json"):
        formats.arrayrecord_documents(str(docs), fingerprint="bytes")


def test_records_round_trip_keys_and_wide_ids(tmp_path):
    documents = [formats.Document("a/ключ.txt", ""), formats.Document("b:3", "")]
    ids = [np.array([0, 70000, 5], np.int32), np.array([], np.int32)]
    formats.write_prepared(
        tmp_path, documents, ids, tokenizer="hf", fingerprint="hf:x", vocab_size=100_000
    )
    back = formats.arrayrecord_documents(str(tmp_path), fingerprint="hf:x")
    assert [d.key for d in back] == ["a/ключ.txt", "b:3"]
    for got, want in zip(back, ids):
        np.testing.assert_array_equal(got.tokens, want)


def test_prepare_rejects_an_already_tokenized_source(tmp_path, capsys):
    rc = data_cli.main(
        ["prepare", "data.source=arrayrecord", f"data.path={tmp_path}", "--out", str(tmp_path)]
    )
    assert rc == 2 and "already tokenized" in capsys.readouterr().err


def test_worker_processes_tokenize_like_the_main_process():
    tok = build_tokenizer("bytes")
    texts = [f"text {i} " * (i % 5) for i in range(40)]
    here = formats.tokenize_all(tok, texts)
    there = formats.tokenize_all(tok, texts, workers=2, chunk=8)
    assert len(there) == len(here)
    for a, b in zip(here, there):
        np.testing.assert_array_equal(a, b)


def test_parquet_column_documents(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"text": ["first", None, "third é"], "n": [1, 2, 3]})
    pq.write_table(table, tmp_path / "part.parquet", row_group_size=2)
    docs = formats.parquet_documents(str(tmp_path / "part.parquet"), "text")
    assert [(d.key, d.text) for d in docs] == [
        ("part.parquet:0", "first"), ("part.parquet:1", ""), ("part.parquet:2", "third é"),
    ]  # fmt: skip
    with pytest.raises(DataError, match="no column 'body'"):
        formats.parquet_documents(str(tmp_path / "part.parquet"), "body")
    with pytest.raises(DataError, match="'n' is a int"):
        formats.parquet_documents(str(tmp_path / "part.parquet"), "n")
