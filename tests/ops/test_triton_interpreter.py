"""The Triton DSA kernels against their PyTorch references on the CPU, through the Triton interpreter.

Each case group runs `triton_interpreter_cases.py` in a subprocess with TRITON_INTERPRET=1, which must be set
before the kernels are defined. Skipped without triton; triton 3.6's interpreter needs numpy < 2 (the dev extra
pins it). The same kernels run compiled in tests/gpu/ on a GPU.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("triton")
if int(np.__version__.split(".")[0]) >= 2:
    pytest.skip("the Triton interpreter (triton 3.6) needs numpy < 2: pip install -e '.[dev]'",
                allow_module_level=True)

CASES = Path(__file__).with_name("triton_interpreter_cases.py")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("group", ["topk", "sparse", "kl", "rotary", "norm"])
def test_triton_kernels_match_references_in_the_interpreter(group):
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, str(CASES), group], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.rstrip().endswith("ok"), run.stdout[-3000:] + run.stderr[-3000:]


@pytest.mark.parametrize("split", [False, True])
def test_sparse_attention_key_blocks_are_powers_of_two(split, monkeypatch):
    """tl.arange needs a power-of-2 key block for every head-dim split (MLA's 288 = 256 + 32 once gave 28 keys)."""
    from hybrid_lm.ops.triton import sparse_attention as sa

    monkeypatch.setattr(sa, "SPLIT_HEAD_DIM", split)
    for D, DV in ((32, 32), (48, 32), (64, 64), (96, 64), (128, 128), (192, 128), (288, 256), (576, 512)):
        for block_k in (16, 32, 64):
            cfg = sa._config(16, D, DV, block_k)
            assert cfg["BLOCK_K"] & (cfg["BLOCK_K"] - 1) == 0 and cfg["BLOCK_K"] >= 16, (D, DV, block_k, cfg)
            assert cfg["BLOCK_D"] + (cfg["BLOCK_DT"] if cfg["HAS_TAIL"] else 0) >= D
