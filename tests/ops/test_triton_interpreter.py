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


@pytest.mark.parametrize("group", ["topk", "sparse", "kl"])
def test_triton_kernels_match_references_in_the_interpreter(group):
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, str(CASES), group], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.rstrip().endswith("ok"), run.stdout[-3000:] + run.stderr[-3000:]
