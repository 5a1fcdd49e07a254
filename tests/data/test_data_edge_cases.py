"""Edge cases of the data pipeline found in review: cache keys, tokenizer vocabularies, file encodings."""

from hybrid_lm.data import DataConfig
from hybrid_lm.data import prepare as prepare_mod


def test_shakespeare_cache_key_tracks_max_documents():
    # a run capped at a few scenes must not reuse (or leave behind for) the cache of the whole corpus
    full = prepare_mod.cache_key(DataConfig(source="shakespeare"))
    assert prepare_mod.cache_key(DataConfig(source="shakespeare", max_documents=3)) != full
    assert prepare_mod.cache_key(DataConfig(source="shakespeare", max_documents=3)) != \
        prepare_mod.cache_key(DataConfig(source="shakespeare", max_documents=4))
