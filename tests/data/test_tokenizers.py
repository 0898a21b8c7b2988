import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jaxllm.data import ByteTokenizer, DataError, build_tokenizer


@given(st.text())
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.dtype == np.int32
    assert ids.ndim == 1
    assert ids.tolist() == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(ids.tolist()) == text


def test_special_ids_are_above_the_bytes_and_dropped_by_decode():
    tok = build_tokenizer("bytes")
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (259, 256, 257, 258)
    ids = [tok.bos_id, *tok.encode("héllo").tolist(), tok.eos_id, tok.pad_id, tok.pad_id]
    assert tok.decode(ids) == "héllo"
    assert tok.decode(np.array([[tok.bos_id, 104], [105, tok.eos_id]])) == "hi"


def test_decode_replaces_bad_utf8():
    tok = ByteTokenizer()
    # A lone continuation byte and a truncated 2-byte sequence: sampled models produce these.
    assert tok.decode([0x61, 0x80, 0x62, 0xC3]) == "a\ufffdb\ufffd"


def test_unknown_tokenizer_is_a_data_error():
    with pytest.raises(DataError, match=r"data\.tokenizer"):
        build_tokenizer("sentencepiece-nope")
