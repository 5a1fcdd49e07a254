"""Every Triton DSA kernel compiles for an H100 (sm_90), on a machine without a GPU.

Each case group runs `triton_compile_cases.py` in a subprocess: it replaces triton's launch with a compile for
sm_90 (PTX and cubin) and calls the op wrappers with the dtypes, shapes and configs a GPU call would use. This catches
what the interpreter tests cannot: compiler failures such as a `tl.dot` under a runtime `if` (a layout assertion
in triton 3.6) or a key block that is not a power of 2, both of which once cost a GPU run.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

CASES = Path(__file__).with_name("triton_compile_cases.py")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("group", ["topk", "sparse", "kl", "rotary", "norm"])
def test_triton_kernels_compile_for_sm90(group):
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("this triton has no NVIDIA backend to compile for")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    run = subprocess.run([sys.executable, str(CASES), group], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0 and "kernel variants compiled for sm_90" in run.stdout, \
        run.stdout[-3000:] + run.stderr[-3000:]
