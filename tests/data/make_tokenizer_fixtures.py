"""Train the two tiny tokenizers in tests/data/fixtures (needs `tokenizers`, `sentencepiece`):

    python tests/data/make_tokenizer_fixtures.py

bpe_tokenizer/: a byte-level BPE `tokenizer.json` of 300 tokens with <|endoftext|> (EOS, no BOS)
and <|pad|> named in tokenizer_config.json. tiny_sp.model: a SentencePiece BPE model of 340 pieces
(unk 0, BOS 1, EOS 2, PAD 3, byte fallback). Both are trained on the Zen of Python.
"""

import codecs
import io
import json
import this
from pathlib import Path

import sentencepiece as spm
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

OUT = Path(__file__).parent / "fixtures"


def main() -> None:
    zen = codecs.decode(this.s, "rot13").splitlines()
    corpus = [line for line in zen if line.strip()] * 3
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    folder = OUT / "bpe_tokenizer"
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    specials = {"eos_token": "<|endoftext|>", "pad_token": "<|pad|>", "bos_token": None}
    (folder / "tokenizer_config.json").write_text(json.dumps(specials))
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=340, model_type="bpe",
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=3, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
    )  # fmt: skip
    (OUT / "tiny_sp.model").write_bytes(model.getvalue())


if __name__ == "__main__":
    main()
