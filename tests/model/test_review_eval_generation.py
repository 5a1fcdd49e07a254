"""Review checks of `generate` / `sample_next`: bad sampling settings are named, not a torch error."""

import pytest
import torch

from hybrid_lm.model.generation import sample_next


def test_negative_top_p_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match="top_p = -0.1"):
        sample_next(torch.randn(2, 10), True, 1.0, None, -0.1, None)
    assert sample_next(torch.tensor([[0.0, 3.0, 1.0]]), True, 1.0, None, 0.0, None).tolist() == [1]  # 0: greedy
