"""Bad data is stopped on (naming the file and line) or skipped and counted, as configured —
never silently turned into a wrong batch."""

from __future__ import annotations

import pytest

from jaxllm.data import DataError, Pipeline
from tests.helpers import tiny


def _jsonl(tmp_path):
    lines = [
        b'{"text": "a good document"}',
        b'{"text": "bad \xff byte"}',
        b"{not json",
        b'{"body": "no text field"}',
        b'{"text": 3}',
        b'{"text": ""}',
    ] + [b'{"text": "document %d, long enough to count"}' % i for i in range(20)]
    (tmp_path / "d.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return tmp_path / "d.jsonl"


@pytest.mark.parametrize(
    "drop, message",
    [
        (0, r"d\.jsonl:2: not UTF-8 text \(byte 14\)"),
        (1, r"d\.jsonl:2: not a JSON object"),
        (2, r"d\.jsonl:2: no field 'text'"),
        (3, r"d\.jsonl:2: field 'text' is a int"),
    ],
)
def test_stop_names_the_file_and_line(tmp_path, drop, message):
    path = _jsonl(tmp_path)
    lines = path.read_bytes().split(b"\n")
    # Keep only the bad line under test (it becomes line 2) and the good ones.
    bad = [1, 2, 3, 4]
    keep = [line for i, line in enumerate(lines) if i not in bad or i == bad[drop]]
    path.write_bytes(b"\n".join(keep))
    with pytest.raises(DataError, match=message):
        Pipeline(tiny("data.source=jsonl", f"data.path={path}").data, seed=0)


def test_skip_counts_each_reason(tmp_path):
    cfg = tiny("data.source=jsonl", f"data.path={_jsonl(tmp_path)}", "data.on_bad_document=skip")
    stats = Pipeline(cfg.data, seed=0).stats()
    assert stats["train_documents"] + stats["val_documents"] == 21
    assert {k: v for k, v in stats.items() if k.startswith("skipped_")} == {
        "skipped_empty": 1,
        "skipped_invalid_json": 1,
        "skipped_invalid_utf8": 1,
        "skipped_missing_field": 1,
        "skipped_not_a_string": 1,
    }


def test_text_files_empty_skipped_invalid_per_policy(tmp_path):
    for i in range(10):
        (tmp_path / f"{i}.txt").write_text(f"text file {i}")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt is not UTF-8"):
        Pipeline(tiny("data.source=text", f"data.path={tmp_path}").data, seed=0)
    cfg = tiny("data.source=text", f"data.path={tmp_path}", "data.on_bad_document=skip")
    stats = Pipeline(cfg.data, seed=0).stats()
    assert stats["skipped_empty"] == 1 and stats["skipped_invalid_utf8"] == 1
    assert stats["train_documents"] + stats["val_documents"] == 10


def test_long_documents_split_skip_or_stop(tmp_path):
    for i in range(10):
        (tmp_path / f"{i}.txt").write_text("x" * (5 + 40 * (i % 2)))  # 5 or 45 bytes
    common = ["data.source=text", f"data.path={tmp_path}", "data.seq_len=16"]
    split = Pipeline(tiny(*common).data, seed=0).stats()
    assert split["train_documents"] + split["val_documents"] == 10
    skip = Pipeline(tiny(*common, "data.long_documents=skip").data, seed=0).stats()
    assert skip["skipped_long"] == 5
    assert skip["train_documents"] + skip["val_documents"] == 5
    with pytest.raises(DataError, match=r"document \d\.txt has 45 tokens, more than"):
        Pipeline(tiny(*common, "data.long_documents=stop").data, seed=0)
