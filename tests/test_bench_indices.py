"""benchmarks/common.py's index rows for the sparse-attention benchmarks: every row holds distinct causal keys in
position order (-1 after the keys of a short row), and with `local` its last slots are the query's most recent keys."""

import pytest


@pytest.fixture(scope="module")
def common(load_benchmark):
    return load_benchmark("common")


@pytest.mark.parametrize("local", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("K", [64, 7])
def test_rows_are_distinct_causal_ascending_and_end_in_the_local_window(common, K, local):
    idx = common.random_causal_indices(300, K, device="cpu", seed=3, local=local)
    assert idx.shape == (1, 300, K)
    for t, row in enumerate(idx[0]):
        n = t + 1
        keys = row[row >= 0]
        assert len(keys) == min(n, K) and (row[len(keys):] == -1).all(), t
        assert (keys < n).all() and (keys[1:] > keys[:-1]).all(), (t, keys)  # causal, distinct, ascending
        if n > K:
            window = round(local * K)
            assert keys[K - window:].tolist() == list(range(n - window, n)), t
            if window < K:  # the sampled part spreads over the keys before the window
                assert keys[0] < (n - window) / (K - window) + 1


def test_a_fraction_outside_0_1_is_refused(common):
    with pytest.raises(ValueError, match="fraction of topk"):
        common.random_causal_indices(10, 4, device="cpu", local=1.5)
