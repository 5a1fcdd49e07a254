"""The recall mix: the trainer reads it unchanged, its held-out split is exactly the text corpus's, and the loss
mask lines up with the rows the trainer draws."""

import numpy as np
import pytest

from hybrid_lm.data import DataConfig, PackedBatches, prepare_data
from hybrid_lm.eval.masked import MaskedBatches
from hybrid_lm.eval.mix import MixConfig, split_documents, write_recall_mix


@pytest.fixture(scope="module")
def mix(tmp_path_factory, data_cfg):
    cfg = MixConfig(recall_fraction=0.4, min_length=48, max_length=96, seed=3)
    return write_recall_mix(data_cfg, tmp_path_factory.mktemp("mix"), cfg)


def _as_source(mix, data_cfg):
    return prepare_data(DataConfig(source=str(mix.source), val_fraction=mix.val_fraction,
                                   cache_dir=data_cfg.cache_dir))


def test_mix_keeps_the_held_out_text_and_every_train_document(mix, data_cfg, prepared):
    mixed = _as_source(mix, data_cfg)
    assert np.array_equal(np.asarray(mixed.val), np.asarray(prepared.val))
    assert mixed.eos_id == prepared.eos_id and mixed.tokenizer_path.is_file()
    docs = {tuple(d) for d in split_documents(mixed.train, mixed.eos_id)}
    text = split_documents(prepared.train, prepared.eos_id)
    assert all(tuple(d) in docs for d in text)
    recall = mix.info["tokens"]["recall"]
    assert 0.3 < recall / (recall + len(prepared.train)) < 0.5


def test_loss_mask_is_one_on_text_and_on_recall_answers_only(mix, data_cfg, prepared):
    mixed = _as_source(mix, data_cfg)
    mask = np.load(mix.mask)
    assert len(mask) == len(mixed.train) + len(mixed.val)
    text = {tuple(d) for d in split_documents(prepared.train, prepared.eos_id)}
    start = 0
    n_recall = 0
    for doc in split_documents(mixed.train, mixed.eos_id):
        m = mask[start:start + len(doc)]
        if tuple(doc) in text:
            assert m.all()
        else:
            n_recall += 1
            assert 0 < m.sum() < len(doc) and m[0] == 0 and m[-1] == 0  # no first token, no eos
        start += len(doc)
    assert n_recall == mix.info["documents"]["recall"]


def test_masked_batches_follow_the_same_rows_and_resume(mix, data_cfg):
    mixed = _as_source(mix, data_cfg)
    mask = np.load(mix.mask)[:len(mixed.train)]
    plain = PackedBatches(mixed.train, 64, 3, mixed.eos_id, seed=1)
    masked = MaskedBatches(PackedBatches(mixed.train, 64, 3, mixed.eos_id, seed=1), mask)
    starts = plain._epoch_order()[:3]
    expected = np.concatenate([mask[s:s + 64] for s in starts])
    a, b = next(plain), next(masked)
    assert np.array_equal(a["input_ids"], b["input_ids"])
    assert np.array_equal(b["labels"][0].numpy() != -100, expected.astype(bool))
    state = masked.state_dict()
    nxt = next(masked)
    resumed = MaskedBatches(PackedBatches(mixed.train, 64, 3, mixed.eos_id, seed=1), mask)
    resumed.load_state_dict(state)
    again = next(resumed)
    assert np.array_equal(nxt["labels"], again["labels"])
    with pytest.raises(ValueError, match="loss mask"):
        MaskedBatches(PackedBatches(mixed.train, 64, 3, mixed.eos_id), mask[:-1])


def test_mix_is_reused_until_its_settings_change(mix, data_cfg):
    folder = mix.source.parent
    before = mix.source.stat().st_mtime_ns
    same = write_recall_mix(data_cfg, folder, MixConfig(recall_fraction=0.4, min_length=48, max_length=96, seed=3))
    assert same.source.stat().st_mtime_ns == before and same.val_fraction == mix.val_fraction
    other = write_recall_mix(data_cfg, folder, MixConfig(recall_fraction=0.4, min_length=48, max_length=96, seed=4))
    assert other.info["settings"]["mix"]["seed"] == 4
    with pytest.raises(ValueError, match="tasks"):
        write_recall_mix(data_cfg, folder, MixConfig(tasks={"sudoku": 1.0}))
