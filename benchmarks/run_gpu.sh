#!/usr/bin/env bash
# One device call: GPU tests of the Triton DSA kernels, then the three benchmarks, logs and JSON into $OUT.
# Run from the repository root, after `source .gpu/bN/env.sh` when fla / flash-attn-4 travel as wheel bundles.
#   bash benchmarks/run_gpu.sh [PYTEST_WHEELS_DIR]
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/bench_out}; mkdir -p "$OUT"
if ! python3 -c "import pytest" 2>/dev/null && [[ -n ${1:-} ]]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/pyt "$1"/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/pyt
fi
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
python3 -c "from hybrid_lm.ops import backends as b; print('fla', b.has_fla(), 'flash_attn', b.has_flash_attn())"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader
timeout ${TEST_TIMEOUT:-150} python3 -m pytest tests/gpu tests/ops/test_gpu.py::test_dsa_ops_run_on_cuda -q -s \
  -p no:cacheprovider > "$OUT/tests.log" 2>&1
grep -E "rel errors|passed|failed|^FAILED|^E " "$OUT/tests.log" | cut -c1-220 | head -40
cd benchmarks
timeout ${LAYER_TIMEOUT:-240} python3 bench_layer.py ${LAYER_ARGS:-} > "$OUT/layer.log" 2>&1; tail -40 "$OUT/layer.log" | cut -c1-200
timeout ${SPARSE_TIMEOUT:-90} python3 bench_sparse_attention.py > "$OUT/sparse.log" 2>&1; tail -22 "$OUT/sparse.log"
timeout ${TOPK_TIMEOUT:-70} python3 bench_topk.py > "$OUT/topk.log" 2>&1; tail -12 "$OUT/topk.log"
