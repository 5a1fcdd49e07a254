from hybrid_lm.cli import main
from hybrid_lm.zoo import compact_pattern, find_config

import pytest


def test_zoo_command_lists_every_config(capsys):
    assert main(["zoo", "--context", "8192"]) == 0
    out = capsys.readouterr().out
    assert "GFLOP/tok@8192" in out
    for name in ("tiny-hybrid", "dense-125m", "gdn-125m", "gdn-attn-125m", "gdn-dsa-125m", "dsa-125m",
                 "gdn-dsa-350m", "gdn-dsa-1b"):
        assert name in out
    assert "[gated_deltanet, gated_deltanet, gated_deltanet, dsa] x 3" in out


def test_compact_pattern_and_find_config():
    assert compact_pattern(["a", "b", "a", "b"]) == "[a, b] x 2"
    assert compact_pattern(["a", "b", "c"]) == "[a, b, c]"
    assert find_config("tiny-hybrid").name == "tiny-hybrid.yaml"
    with pytest.raises(ValueError, match="tiny-hybrid"):
        find_config("no-such-model")
