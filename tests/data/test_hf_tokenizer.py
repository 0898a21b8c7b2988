"""Tokenizers from files: Hugging Face tokenizer.json and SentencePiece (the `hf` extra).

The fixtures (made by make_tokenizer_fixtures.py) are a 300-token byte-level BPE and a
340-piece SentencePiece model; the tests that use them are skipped without their package.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from jaxllm import config
from jaxllm.data import DataError, Pipeline, build_tokenizer
from tests.helpers import tiny

FIXTURES = Path(__file__).parent / "fixtures"
BPE = FIXTURES / "bpe_tokenizer"
SP = FIXTURES / "tiny_sp.model"
TEXTS = ["Beautiful is better than ugly.", "é 日本 — ünïcode", "", "  spaces  and\nlines\n"]

has_tokenizers = importlib.util.find_spec("tokenizers") is not None
has_sentencepiece = importlib.util.find_spec("sentencepiece") is not None
needs_tokenizers = pytest.mark.skipif(not has_tokenizers, reason="needs tokenizers (hf extra)")
needs_sp = pytest.mark.skipif(not has_sentencepiece, reason="needs sentencepiece (hf extra)")


@needs_tokenizers
def test_hf_tokenizer_round_trips_and_names_its_specials():
    tok = build_tokenizer("hf", str(BPE))
    assert tok.vocab_size == 300
    # tokenizer_config.json names EOS and PAD and no BOS: documents start with EOS.
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 0, 1)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids.dtype == np.int32 and ids.ndim == 1
        assert tok.eos_id not in ids.tolist()
        assert tok.decode(ids) == text
        assert tok.decode([tok.bos_id, *ids.tolist(), tok.eos_id, tok.pad_id]) == text
    # Merges shorten common text: fewer tokens than UTF-8 bytes.
    assert len(tok.encode(TEXTS[0])) < len(TEXTS[0].encode())


@needs_tokenizers
def test_hf_tokenizer_accepts_the_file_itself():
    assert build_tokenizer("hf", str(BPE / "tokenizer.json")).vocab_size == 300


@needs_sp
def test_sentencepiece_round_trips_with_its_own_specials():
    tok = build_tokenizer("sentencepiece", str(SP))
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (340, 1, 2, 3)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids.dtype == np.int32
        # Byte fallback: characters outside the training text still round-trip.
        assert tok.decode([tok.bos_id, *ids.tolist(), tok.eos_id]) == text


@pytest.mark.parametrize("name", ["hf", "sentencepiece"])
def test_missing_file_is_a_data_error(name, tmp_path):
    if not (has_tokenizers if name == "hf" else has_sentencepiece):
        pytest.skip("package absent")
    with pytest.raises(DataError, match="does not exist"):
        build_tokenizer(name, str(tmp_path / "nothing"))


@pytest.mark.skipif(has_tokenizers, reason="checks the message shown without the package")
def test_without_the_package_the_error_says_what_to_install():
    with pytest.raises(DataError, match=r"pip install 'jaxllm\[hf\]'"):
        build_tokenizer("hf", str(BPE))


def test_a_file_tokenizer_needs_a_path():
    with pytest.raises(DataError, match=r"needs data\.tokenizer_path"):
        build_tokenizer("sentencepiece")
    with pytest.raises(config.ConfigError, match="tokenizer_path is required"):
        tiny("data.tokenizer=hf")


@needs_tokenizers
def test_pipeline_packs_with_the_hf_tokenizer(tmp_path):
    for i in range(12):
        (tmp_path / f"{i}.txt").write_text(f"{TEXTS[i % 2]} number {i}")
    cfg = tiny(
        "data.source=text", f"data.path={tmp_path}", "data.tokenizer=hf",
        f"data.tokenizer_path={BPE}", "data.val_fraction=0.3", "data.seq_len=16",
    )  # fmt: skip
    data = Pipeline(cfg.data, seed=0)
    batch = next(data.train_iterator())
    inputs = batch["inputs"]
    assert inputs.max() < 300
    # Inside a window, each new document starts with the BOS (= EOS for this tokenizer).
    seg = batch["segment_ids"]
    new_doc = np.zeros_like(seg, dtype=bool)
    new_doc[:, 1:] = (seg[:, 1:] != seg[:, :-1]) & (seg[:, 1:] > 0)
    assert new_doc.any() and np.all(inputs[new_doc] == data.tokenizer.bos_id)


@needs_sp
def test_the_tokenizer_vocabulary_flows_into_the_model(tmp_path):
    from jaxllm.training.loop import train

    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(12):
        (docs / f"{i}.txt").write_text(f"{TEXTS[i % 2]} number {i}")
    cfg = tiny(
        "data.source=text", f"data.path={docs}", "data.tokenizer=sentencepiece",
        f"data.tokenizer_path={SP}", "data.val_fraction=0.3", "data.seq_len=16",
        "model.vocab_size=260", "train.steps=1", "train.eval_every=0",
        f"train.run_dir={tmp_path / 'run'}",
    )  # fmt: skip
    assert train(cfg)["step"] == 1
    # 340 pieces → the embedding grows to the next multiple of 128.
    assert config.load(str(tmp_path / "run" / "config.yaml")).model.vocab_size == 384
