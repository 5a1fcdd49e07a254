"""Edge cases of the data pipeline found in review: cache keys, tokenizer vocabularies, file encodings."""

from hybrid_lm.data import DataConfig
from hybrid_lm.data import prepare as prepare_mod


def test_shakespeare_cache_key_tracks_max_documents():
    # a run capped at a few scenes must not reuse (or leave behind for) the cache of the whole corpus
    full = prepare_mod.cache_key(DataConfig(source="shakespeare"))
    assert prepare_mod.cache_key(DataConfig(source="shakespeare", max_documents=3)) != full
    assert prepare_mod.cache_key(DataConfig(source="shakespeare", max_documents=3)) != \
        prepare_mod.cache_key(DataConfig(source="shakespeare", max_documents=4))


def _gappy_tokenizer(folder):
    # ids 0, 1, 7: three tokens, but the model needs 8 embedding rows
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "a": 1, "b": 7}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    return folder


def test_tokenizer_with_id_gaps_covers_its_largest_id(tmp_path):
    from hybrid_lm.data import load_tokenizer, prepare_data
    tok_dir = _gappy_tokenizer(tmp_path / "tok")
    assert load_tokenizer(tok_dir)[1].vocab_size == 8
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n\n".join(["a b a", "b b", "a", "b a b"]), encoding="utf-8")
    prepared = prepare_data(DataConfig(source=str(corpus), tokenizer=str(tok_dir), val_fraction=0.25,
                                       cache_dir=str(tmp_path / "cache")))
    assert prepared.vocab_size == 8
    assert 7 in prepared.train
    assert int(prepared.train.max()) < prepared.vocab_size and int(prepared.val.max()) < prepared.vocab_size
