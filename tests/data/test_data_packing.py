"""Packed batches: document-safe segments, exact rows, epoch coverage, rank sharding, exact resume, eval windows."""

import json

import numpy as np
import pytest
import torch

from hybrid_lm.data import PackedBatches, iter_eval_batches

EOS = 1_000_000  # above every position, so a non-eos token's value is its position in the stream


def synthetic_stream(n=5000, n_docs=60, seed=0):
    """tokens[i] == i except at document ends (eos): a row's start offset can be read off its tokens."""
    tokens = np.arange(n, dtype=np.int64)
    ends = np.sort(np.random.default_rng(seed).choice(np.arange(1, n), size=n_docs, replace=False))
    tokens[ends] = EOS
    tokens[-1] = EOS
    return tokens


def row_start(row: np.ndarray) -> int:
    j = int(np.flatnonzero(row != EOS)[0])
    return int(row[j]) - j


def check_batch(batch, tokens, seq_len, n_rows, eos=EOS):
    ids = batch["input_ids"]
    assert ids.shape == (1, n_rows * seq_len) and ids.dtype == torch.int64
    assert batch["labels"].equal(ids) and batch["num_tokens"] == n_rows * seq_len
    flat = ids[0].numpy()
    cu = batch["cu_seqlens"].numpy()
    assert batch["cu_seqlens"].dtype.itemsize == 4 and cu[0] == 0 and cu[-1] == n_rows * seq_len
    assert np.all(np.diff(cu) > 0)
    assert set(range(0, n_rows * seq_len, seq_len)) <= set(cu.tolist())  # every row start is a boundary
    for a, b in zip(cu[:-1], cu[1:]):
        seg = flat[a:b]
        assert not np.any(seg[:-1] == eos), "an eos may only end a segment"
        # segments are maximal: one ends only at an eos or at the end of its row
        assert seg[-1] == eos or b % seq_len == 0
    rows = flat.reshape(n_rows, seq_len)
    starts = []
    for row in rows:
        start = row_start(row)
        assert np.array_equal(row, tokens[start:start + seq_len]), "rows are consecutive tokens of the stream"
        starts.append(start)
    return starts


def test_batches_and_epoch_coverage():
    tokens, seq_len, bsz = synthetic_stream(), 64, 4
    batches = PackedBatches(tokens, seq_len, bsz, EOS, seed=3)
    n_rows = batches.rows_per_epoch
    steps = n_rows // bsz
    starts = [s for _ in range(steps) for s in check_batch(next(batches), tokens, seq_len, bsz)]
    offset = starts[0] % seq_len
    # one epoch: distinct rows on one grid, all rows but the dropped remainder (< bsz) of the epoch
    assert len(set(starts)) == len(starts) == steps * bsz > n_rows - bsz
    assert set(starts) <= set(range(offset, len(tokens) - seq_len + 1, seq_len))
    assert batches.epoch == 0
    check_batch(next(batches), tokens, seq_len, bsz)
    assert batches.epoch == 1 and batches.position == bsz


def test_epoch_reshuffles_deterministically():
    tokens = synthetic_stream()

    def epochs(seed, n_batches=300):
        batches, seen = PackedBatches(tokens, 50, 2, EOS, seed=seed), {}
        for _ in range(n_batches):
            batch = next(batches)
            seen.setdefault(batches.epoch, []).append(row_start(batch["input_ids"][0, :50].numpy()))
        return seen

    a = epochs(7)
    assert len(a) >= 3 and a == epochs(7) and a != epochs(8)
    assert a[0] != a[1]  # a new order (and row offset) every epoch


def test_no_shuffle_is_sequential():
    tokens = synthetic_stream()
    batches = PackedBatches(tokens, 100, 3, EOS, shuffle=False)
    starts = [s for _ in range(5) for s in check_batch(next(batches), tokens, 100, 3)]
    assert starts == list(range(0, 1500, 100))


def test_ranks_are_disjoint_and_cover_the_epoch():
    tokens, seq_len, bsz, world = synthetic_stream(), 32, 3, 4
    ranks = [PackedBatches(tokens, seq_len, bsz, EOS, seed=1, rank=r, world_size=world) for r in range(world)]
    steps = ranks[0].rows_per_epoch // (bsz * world)
    seen = [[s for _ in range(steps) for s in check_batch(next(r), tokens, seq_len, bsz)] for r in ranks]
    flat = [s for rank in seen for s in rank]
    assert len(set(flat)) == len(flat) == steps * bsz * world
    single = PackedBatches(tokens, seq_len, bsz * world, EOS, seed=1)
    one_rank = [s for _ in range(steps) for s in check_batch(next(single), tokens, seq_len, bsz * world)]
    assert sorted(flat) == sorted(one_rank)  # sharding splits the same global order, it does not change it


@pytest.mark.parametrize("k", [0, 3, 77])
def test_resume_is_exact(k):
    tokens = synthetic_stream()
    original = PackedBatches(tokens, 48, 2, EOS, seed=5, rank=1, world_size=2)
    for _ in range(k):
        next(original)
    state = json.loads(json.dumps(original.state_dict()))
    resumed = PackedBatches(tokens, 48, 2, EOS, seed=5, rank=1, world_size=2)
    resumed.load_state_dict(state)
    for _ in range(60):  # long enough to cross an epoch boundary
        a, b = next(original), next(resumed)
        assert a["input_ids"].equal(b["input_ids"]) and a["cu_seqlens"].equal(b["cu_seqlens"])


def test_resume_rejects_a_different_stream():
    tokens = synthetic_stream()
    state = PackedBatches(tokens, 48, 2, EOS, seed=5).state_dict()
    with pytest.raises(ValueError, match="seq_len=48 but this run has 64"):
        PackedBatches(tokens, 64, 2, EOS, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="num_tokens"):
        PackedBatches(tokens[:-10], 48, 2, EOS, seed=5).load_state_dict(state)


def test_real_data_segments(shakespeare):
    batches = PackedBatches(shakespeare.train, 256, 8, shakespeare.eos_id, seed=0)
    boundaries = 0
    for _ in range(20):
        batch = next(batches)
        flat = batch["input_ids"][0].numpy()
        cu = batch["cu_seqlens"].numpy()
        for a, b in zip(cu[:-1], cu[1:]):
            assert not np.any(flat[a:b - 1] == shakespeare.eos_id)
        boundaries += len(cu) - 1 - 8
    assert boundaries > 0  # some rows really do span two documents


def test_eval_batches():
    tokens = synthetic_stream(n=1000)
    batches = list(iter_eval_batches(tokens, 64, 4, EOS))
    assert [b["input_ids"].shape[1] for b in batches] == [256, 256, 256, 192]  # 15 full rows, tail skipped
    starts = [s for b in batches for s in check_batch(b, tokens, 64, b["input_ids"].shape[1] // 64)]
    assert starts == list(range(0, 15 * 64, 64))
    again = list(iter_eval_batches(tokens, 64, 4, EOS, max_batches=2))
    assert len(again) == 2 and all(x["input_ids"].equal(y["input_ids"]) for x, y in zip(again, batches))
    assert list(iter_eval_batches(tokens[:0], 64, 4, EOS)) == []


def test_errors():
    tokens = synthetic_stream(n=1000)
    with pytest.raises(ValueError, match="too few"):
        PackedBatches(tokens, 100, 5, EOS, world_size=2)
    with pytest.raises(ValueError, match="rank=2"):
        PackedBatches(tokens, 10, 1, EOS, rank=2, world_size=2)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        iter_eval_batches(tokens[:10], 64, 4, EOS)
    with pytest.raises(ValueError, match="1-D"):
        PackedBatches(tokens.reshape(10, 100), 10, 1, EOS)
