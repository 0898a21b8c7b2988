import json

import pytest

from jaxllm.config import DataConfig
from jaxllm.data import DataError, Document, read_documents, split_documents
from jaxllm.data.sources import corpus_documents, split_fraction


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _jsonl(path, rows):
    return _write(path, "".join(json.dumps(row) + "\n" for row in rows))


def _docs(**cfg):
    return [(d.key, d.text) for d in read_documents(DataConfig(**cfg))]


def test_text_file_is_one_document(tmp_path):
    _write(tmp_path / "a.txt", "héllo\nworld\n")
    assert _docs(source="text", path=str(tmp_path / "a.txt")) == [("a.txt", "héllo\nworld\n")]


def test_text_directory_is_recursive_sorted_and_skips_hidden(tmp_path):
    _write(tmp_path / "b.txt", "B")
    _write(tmp_path / "sub" / "a.md", "A")
    _write(tmp_path / "a.txt", "a")
    _write(tmp_path / ".hidden", "h")
    _write(tmp_path / ".git" / "config", "g")
    assert _docs(source="text", path=str(tmp_path)) == [
        ("a.txt", "a"),
        ("b.txt", "B"),
        ("sub/a.md", "A"),
    ]


def test_text_glob(tmp_path):
    _write(tmp_path / "x" / "one.txt", "1")
    _write(tmp_path / "x" / "deep" / "two.txt", "2")
    _write(tmp_path / "x" / "skip.md", "no")
    assert _docs(source="text", path=str(tmp_path / "x" / "*.txt")) == [("one.txt", "1")]
    assert _docs(source="text", path=str(tmp_path / "x" / "**" / "*.txt")) == [
        ("deep/two.txt", "2"),
        ("one.txt", "1"),
    ]


def test_jsonl_file_dir_and_glob(tmp_path):
    _jsonl(tmp_path / "d" / "a.jsonl", [{"text": "first", "id": 1}, {"text": "second"}])
    _write(tmp_path / "d" / "b.jsonl", '{"body": "x", "text": "third"}\n\n')
    want = [("a.jsonl:1", "first"), ("a.jsonl:2", "second"), ("b.jsonl:1", "third")]
    assert _docs(source="jsonl", path=str(tmp_path / "d")) == want
    assert _docs(source="jsonl", path=str(tmp_path / "d" / "*.jsonl")) == want
    assert _docs(source="jsonl", path=str(tmp_path / "d" / "b.jsonl"), field="body") == [
        ("b.jsonl:1", "x")
    ]


@pytest.mark.parametrize(
    ("make", "kwargs", "message"),
    [
        (lambda p: None, {"source": "text", "path": "missing"}, "does not exist"),
        (lambda p: (p / "empty").mkdir(), {"source": "text", "path": "empty"}, "holds no files"),
        (lambda p: None, {"source": "text", "path": "*.nothing"}, "no files match"),
        (
            lambda p: (p / "bin.txt").write_bytes(b"ok\xff\xfe"),
            {"source": "text", "path": "bin.txt"},
            "not UTF-8",
        ),
        (
            lambda p: _jsonl(p / "a.jsonl", [{"text": "ok"}, {"content": "no text"}]),
            {"source": "jsonl", "path": "a.jsonl"},
            r"a.jsonl:2: no field 'text'",
        ),
        (
            lambda p: _write(p / "a.jsonl", '{"text": "ok"}\n{"text": \n'),
            {"source": "jsonl", "path": "a.jsonl"},
            "a.jsonl:2: not a JSON object",
        ),
        (
            lambda p: _jsonl(p / "a.jsonl", [{"text": 3}]),
            {"source": "jsonl", "path": "a.jsonl"},
            "is a int, not a string",
        ),
        (
            lambda p: _jsonl(p / "a.jsonl", [[1, 2]]),
            {"source": "jsonl", "path": "a.jsonl"},
            "no field",
        ),
        (
            lambda p: _write(p / "a.jsonl", "\n\n"),
            {"source": "jsonl", "path": "a.jsonl"},
            "holds no JSON lines",
        ),
    ],
)
def test_bad_sources_raise_one_line_data_errors(tmp_path, monkeypatch, make, kwargs, message):
    monkeypatch.chdir(tmp_path)
    make(tmp_path)
    with pytest.raises(DataError, match=message) as info:
        read_documents(DataConfig(**kwargs))
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_split_fraction_is_a_stable_hash():
    # Pinned: the split must not change between Python versions, processes or machines.
    assert split_fraction("abc") == pytest.approx(0.6624945528519905, abs=1e-15)
    assert split_fraction("abc") == split_fraction("abc")
    assert split_fraction("abc") != split_fraction("abd")


def test_split_is_deterministic_disjoint_and_about_val_fraction():
    documents = [Document(f"dir/file_{i}.txt", str(i)) for i in range(4000)]
    train, val = split_documents(documents, 0.1)
    assert split_documents(documents, 0.1) == (train, val)
    assert {d.key for d in train}.isdisjoint({d.key for d in val})
    assert len(train) + len(val) == len(documents)
    # Binomial(4000, 0.1): sd ≈ 19, so ±80 is over 4 sd.
    assert abs(len(val) - 400) < 80
    # Raising val_fraction only moves documents into validation.
    _, more_val = split_documents(documents, 0.2)
    assert {d.key for d in val} < {d.key for d in more_val}
    # The order within each split is the source's order.
    assert [d.key for d in train] == sorted((d.key for d in train), key=lambda k: int(k[9:-4]))


def test_stdlib_corpus_builds_and_splits():
    documents = corpus_documents()
    keys = [d.key for d in documents]
    assert keys == sorted(keys)
    assert len(keys) > 100
    assert all(k.endswith(".py") for k in keys)
    assert not any("site-packages" in k or "dist-packages" in k for k in keys)
    train, val = split_documents(documents, DataConfig().val_fraction)
    assert train and val
    assert {d.key for d in train}.isdisjoint({d.key for d in val})
    assert len(train) + len(val) == len(documents)
