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


def _expected_keep(row: np.ndarray, row_mask: np.ndarray, eos_id: int) -> np.ndarray:
    """The mask of one row, less its first segment (up to its first eos) if that holds a masked token."""
    keep = row_mask.astype(bool)
    eos = np.flatnonzero(row == eos_id)
    first = int(eos[0]) + 1 if len(eos) else len(row)
    if not keep[:first].all():
        keep[:first] = False
    return keep


def test_masked_batches_follow_the_same_rows_and_resume(mix, data_cfg):
    mixed = _as_source(mix, data_cfg)
    mask = np.load(mix.mask)[:len(mixed.train)]
    plain = PackedBatches(mixed.train, 64, 3, mixed.eos_id, seed=1)
    masked = MaskedBatches(PackedBatches(mixed.train, 64, 3, mixed.eos_id, seed=1), mask)
    starts = plain._epoch_order()[:3]
    expected = np.concatenate([_expected_keep(np.asarray(mixed.train[s:s + 64]), mask[s:s + 64], mixed.eos_id)
                               for s in starts])
    a, b = next(plain), next(masked)
    assert np.array_equal(a["input_ids"], b["input_ids"])
    assert np.array_equal(b["labels"][0].numpy() != -100, expected)
    state = masked.state_dict()
    nxt = next(masked)
    resumed = MaskedBatches(PackedBatches(mixed.train, 64, 3, mixed.eos_id, seed=1), mask)
    resumed.load_state_dict(state)
    again = next(resumed)
    assert np.array_equal(nxt["labels"], again["labels"])
    with pytest.raises(ValueError, match="loss mask"):
        MaskedBatches(PackedBatches(mixed.train, 64, 3, mixed.eos_id), mask[:-1])


def test_a_recall_document_cut_by_the_row_start_trains_on_nothing():
    """Its keys lie in the row before; a cut text document and whole recall documents keep their labels."""
    eos = 9
    #                 text       | recall: k v k v q a q a eos | text        | recall ...
    tokens = np.array([1, 2, 3, eos, 20, 30, 21, 31, 20, 30, 21, 31, eos, 4, 5, 6, 7, eos, 22, 32, 22, 32, eos,
                       *range(10, 18), eos])
    mask = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 0, 1, 0, 1, 1, 1, 1, 1, 0, 0, 0, 1, 0, *[1] * 9], dtype=np.uint8)
    # rows of 8 from offset 0: [1 2 3 eos 20 30 21 31] [20 30 21 31 eos 4 5 6] [7 eos 22 32 22 32 eos 10] [11 ...]
    batches = MaskedBatches(PackedBatches(tokens, 8, 2, eos, shuffle=False), mask)
    labels = next(batches)["labels"][0].numpy()  # rows 0 and 1
    assert (labels[:4] == [1, 2, 3, eos]).all()  # row 0 starts at a text document: kept
    assert (labels[8:13] == -100).all()  # row 1 starts inside the recall document: its answers 30, 31 dropped
    assert (labels[13:16] == [4, 5, 6]).all()  # the text document after it is kept
    labels = next(batches)["labels"][0].numpy()  # rows 2 and 3
    assert labels[0] == 7 and labels[1] == eos  # a cut text document still trains
    assert labels[5] == 32  # a whole recall document after the first segment keeps its answer


def test_mix_is_reused_until_its_settings_change(mix, data_cfg):
    folder = mix.source.parent
    before = mix.source.stat().st_mtime_ns
    same = write_recall_mix(data_cfg, folder, MixConfig(recall_fraction=0.4, min_length=48, max_length=96, seed=3))
    assert same.source.stat().st_mtime_ns == before and same.val_fraction == mix.val_fraction
    other = write_recall_mix(data_cfg, folder, MixConfig(recall_fraction=0.4, min_length=48, max_length=96, seed=4))
    assert other.info["settings"]["mix"]["seed"] == 4
    with pytest.raises(ValueError, match="tasks"):
        write_recall_mix(data_cfg, folder, MixConfig(tasks={"sudoku": 1.0}))


def test_pool_and_pairs_settings(tmp_path, data_cfg):
    from hybrid_lm.eval.mix import trained_pool_size

    cfg = MixConfig(recall_fraction=0.3, tasks={"mqar": 1.0}, min_length=32, max_length=64, pool_size=16, max_pairs=3)
    mix = write_recall_mix(data_cfg, tmp_path, cfg)
    assert trained_pool_size(mix.source) == 16 and trained_pool_size("shakespeare") is None
    mixed = _as_source(mix, data_cfg)
    mask = np.load(mix.mask)
    text = {tuple(d) for d in split_documents(prepare_data(data_cfg).train, mixed.eos_id)}
    start, keys = 0, set()
    for doc in split_documents(mixed.train, mixed.eos_id):
        answers = np.flatnonzero(mask[start:start + len(doc)])
        if tuple(doc) not in text:
            assert 1 <= len(answers) <= 3  # max_pairs
            keys |= set(doc[answers - 1].tolist())  # each answer follows its key
        start += len(doc)
    assert len(keys) <= 16  # every key from the pool of 16
    # a mix built before pool_size / max_pairs existed recorded neither: at their defaults they are left out
    assert "pool_size" not in MixConfig().settings() and cfg.settings()["pool_size"] == 16
    with pytest.raises(ValueError, match="max_pairs"):
        MixConfig(max_length=512, pool_size=64).validate()  # up to 128 pairs from 64 keys
    with pytest.raises(ValueError, match="pool_size"):
        MixConfig(pool_size=4, max_pairs=1).validate()
