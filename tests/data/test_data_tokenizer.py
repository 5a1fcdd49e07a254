"""Byte-level BPE: exact round trips, transformers compatibility, eos detection."""

import json

import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from hybrid_lm.data import EOS_TOKEN, load_tokenizer, train_bpe_tokenizer

SAMPLES = [
    "", " leading space", "HAMLET:\nTo be, or not to be: that is the question:\n",
    "tabs\tand  double  spaces\r\n", "Über naïve café, 日本語, emoji 🎭, \x00 control",
    "trailing newline\n\n\n",
]


def test_shakespeare_tokenizer_round_trips(shakespeare):
    tok = Tokenizer.from_file(str(shakespeare.tokenizer_path))
    assert tok.get_vocab_size() == shakespeare.vocab_size == 4096
    assert tok.token_to_id(EOS_TOKEN) == shakespeare.eos_id == 0
    for text in SAMPLES:
        assert tok.decode(tok.encode(text).ids) == text
    # BPE must actually compress the text it was trained on (bytes would give 1.0)
    line = "Now is the winter of our discontent\nMade glorious summer by this sun of York;\n"
    assert len(tok.encode(line).ids) < 0.4 * len(line.encode())


def test_transformers_loads_the_folder(shakespeare):
    folder = shakespeare.tokenizer_path.parent
    raw = Tokenizer.from_file(str(shakespeare.tokenizer_path))
    for hf in (AutoTokenizer.from_pretrained(str(folder)),
               PreTrainedTokenizerFast(tokenizer_file=str(shakespeare.tokenizer_path))):
        for text in SAMPLES[1:]:
            ids = hf.encode(text, add_special_tokens=False)
            assert ids == raw.encode(text).ids
            assert hf.decode(ids) == text
    auto = AutoTokenizer.from_pretrained(str(folder))
    assert auto.eos_token == EOS_TOKEN and auto.eos_token_id == shakespeare.eos_id
    assert auto.pad_token_id == shakespeare.eos_id


def test_train_small_tokenizer(tmp_path):
    texts = ["the cat sat on the mat. " * 20, "a dog and a cat. " * 20]
    path = train_bpe_tokenizer(texts, 300, tmp_path / "tok")
    tok, info = load_tokenizer(tmp_path / "tok")
    assert info.path == path and info.eos_id == 0 and info.bos_id is None
    assert 257 <= info.vocab_size <= 300
    assert tok.decode(tok.encode(texts[0]).ids) == texts[0]
    with pytest.raises(ValueError, match="at least 257"):
        train_bpe_tokenizer(texts, 100, tmp_path / "tiny")


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_tokenizer(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="could not be loaded"):
        load_tokenizer(bad)


def test_eos_from_tokenizer_config(tmp_path):
    train_bpe_tokenizer(["some text </s> here " * 10], 300, tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    tok.add_special_tokens(["</s>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "</s>"}))
    _, info = load_tokenizer(tmp_path)
    assert info.eos_id == tok.token_to_id("</s>") != 0
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<missing>"}))
    with pytest.raises(ValueError, match="no end-of-text token"):
        load_tokenizer(tmp_path)
