#!/usr/bin/env bash
# GPU tests of the Triton DSA kernels and the fla mixers, then the benchmarks, logs and JSON into $OUT. The whole
# list takes longer than one 10-minute device call: pick parts with ONLY (e.g. ONLY="tests kl model"; default all).
# Run from the repository root, after `source .gpu/bN/env.sh` when fla / flash-attn-4 travel as wheel bundles.
# Arguments per part: LAYER_ARGS, MODEL_ARGS (e.g. MODEL_ARGS="--configs gdn-dsa-350m dense-350m --T 32768").
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
# Parts added for what runs 14-17 left, run in the sixth session (runs 18-25, BENCHMARKS.md): ONLY="dsatests
# kernels" (the DSA kernel tests, the 350M DSA shape, the KL both ways), ONLY="layer16 model32" (the layer at 16k/64k,
# the 350M pair at 4k/32k), ONLY="compiled fla"; in the seventh (runs 26-30): ONLY=fla FLA_PARALLEL=1
# FLA_TESTS="trains_a_step packed cached" FLA_MIXERS="fla_simple_gla fla_retnet fla_mamba2 fla_gated_deltanet"
# (206 s), ONLY="model32 ckpt" (~4 min), ONLY=residual (45 s warm); in the eighth (runs 31-33, an H200):
# ONLY="model125 locality" (300 s; deepseek-v32-125m went over model125's budget and ran alone next),
# ONLY="dsatests profile4k" (~4 min warm). Still open: ONLY=norm (the opt-in RMSNorm kernel, never run on a GPU).
# The one-off parts of runs 11 (pending) and 13 (final) are in git history (2cfb793).
ONLY=${ONLY:-"tests layer sparse topk kl model"}
want() { [[ " $ONLY " == *" $1 "* ]]; }
if want tests || want dsatests; then  # dsatests: the Triton kernels only (fla's own first-use compiles take minutes)
  if want tests; then sel="tests/gpu tests/ops/test_gpu.py tests/hf/test_gpu.py"
  else sel="tests/gpu/test_dsa_kernels.py tests/gpu/test_indexer_kl_kernels.py tests/gpu/test_rotary_kernel.py
    tests/gpu/test_norm_kernel.py"; fi
  timeout ${TEST_TIMEOUT:-240} python3 -m pytest $sel -q -p no:cacheprovider -rfE > "$OUT/tests.log" 2>&1
  grep -E "passed|failed|^FAILED|^ERROR|^E " "$OUT/tests.log" | cut -c1-220 | head -40
fi
if want kernels; then  # the 350M hybrid's DSA shape (16 heads x 64, one KV head), incl. 64-key backward blocks
  (cd benchmarks && timeout 90 python3 bench_sparse_attention.py --T 32768 --head-dim 64 --hkv 1 \
    > "$OUT/sparse-d64.log" 2>&1)
  tail -9 "$OUT/sparse-d64.log" | cut -c1-150
  (cd benchmarks && timeout 120 python3 bench_indexer_kl.py --T 16384 65536 --ref-max-T 0 > "$OUT/kl.log" 2>&1)
  grep -v "^{" "$OUT/kl.log" | tail -9 | cut -c1-150
fi
if want layer16; then  # the DSA layer since the tie bound, beside flash-attn-4
  (cd benchmarks && timeout 200 python3 bench_layer.py --T 16384 65536 --hkv 1 --skip gdn --name layer-next \
    > "$OUT/layer-next.log" 2>&1)
  grep -v "^{" "$OUT/layer-next.log" | tail -8 | cut -c1-150
fi
if want model32; then  # the 350M pair at 4k and 32k (run 19 also timed the old casts, --cast-per-projection)
  (cd benchmarks && timeout 230 python3 bench_model.py --configs dense-350m gdn-dsa-350m --T 4096 32768 \
    --out "$OUT/model-next.json" > "$OUT/model-next.log" 2>&1)
  grep -v "^{" "$OUT/model-next.log" | grep " | " | tail -5 | cut -c1-200
fi
if want model125; then  # the 125M configs at 32k (the 4k/16k/32k grid; runs 16 and 22 timed 4k and 16k)
  (cd benchmarks && timeout 300 python3 bench_model.py --configs dense-125m gdn-125m gdn-attn-125m gdn-dsa-125m \
    dsa-125m qwen3-next-125m deepseek-v32-125m --T 32768 --budget-s 250 --out "$OUT/model-125m-32k.json" \
    > "$OUT/model-125m-32k.log" 2>&1)
  grep -v "^{" "$OUT/model-125m-32k.log" | grep " | " | tail -8 | cut -c1-200
fi
if want locality; then  # index rows sharing their most recent keys between neighbouring queries, as trained ones do
  (cd benchmarks && timeout 120 python3 bench_sparse_attention.py --T 65536 --local 0 0.5 0.9 \
    > "$OUT/sparse-locality.log" 2>&1)
  grep -v "^{" "$OUT/sparse-locality.log" | tail -5 | cut -c1-150
fi
if want profile4k; then  # where the 4k step goes for the configs nearest the 35% MFU target (eager; top 15 kernels)
  (cd benchmarks && timeout 200 python3 bench_model.py --configs dense-350m gdn-dsa-1b --T 4096 --profile 15 \
    --out "$OUT/model-4k-profile.json" > "$OUT/model-4k-profile.log" 2>&1)
  grep -v "^{" "$OUT/model-4k-profile.log" | grep -A16 "top kernels" | cut -c1-160
fi
if want residual; then  # the residual stream in bf16 under autocast against fp32 (model32's rows, same machine)
  (cd benchmarks && timeout 200 python3 bench_model.py --configs dense-350m gdn-dsa-350m --T 4096 32768 \
    --residual-dtype bf16 --out "$OUT/model-residual-bf16.json" > "$OUT/model-residual-bf16.log" 2>&1)
  grep -v "^{" "$OUT/model-residual-bf16.log" | grep " | " | tail -5 | cut -c1-200
fi
if want norm; then  # the RMSNorm kernel (opt-in, written in the eighth session): its GPU tests, the op alone, and
  # dense-350m / gdn-dsa-1b at 4k with it against torch's F.rms_norm (same machine, back to back), ~3 min warm
  timeout 120 python3 -m pytest tests/gpu/test_norm_kernel.py -q -p no:cacheprovider 2>&1 | tail -3
  (cd benchmarks && timeout 90 python3 bench_norm.py > "$OUT/norm.log" 2>&1); grep " | " "$OUT/norm.log"
  for flag in "" --rms-norm-kernel; do
    (cd benchmarks && timeout 150 python3 bench_model.py --configs dense-350m gdn-dsa-1b --T 4096 $flag \
      --out "$OUT/model-4k${flag:+-rms-norm-kernel}.json" > "$OUT/model-4k${flag:+-rms-norm-kernel}.log" 2>&1)
    grep -v "^{" "$OUT/model-4k${flag:+-rms-norm-kernel}.log" | grep " | " | tail -2 | cut -c1-200
  done
fi
if want ckpt; then  # gdn-dsa-1b at 32k: every block checkpointed (run 24: 20.8 GiB) against only the first 8 of 16
  (cd benchmarks && timeout 200 python3 bench_model.py --configs gdn-dsa-1b --T 32768 --activation-checkpointing \
    --out "$OUT/model-1b-ckpt.json" > "$OUT/model-1b-ckpt.log" 2>&1)
  (cd benchmarks && timeout 200 python3 bench_model.py --configs gdn-dsa-1b --T 32768 --activation-checkpointing 8 \
    --out "$OUT/model-1b-ckpt8.json" > "$OUT/model-1b-ckpt8.log" 2>&1)
  for f in model-1b-ckpt model-1b-ckpt8; do grep -v "^{" "$OUT/$f.log" | grep " | " | tail -1 | cut -c1-200; done
fi
if want compiled; then
  (cd benchmarks && timeout 200 python3 bench_model.py --configs dense-350m dense-125m --T 4096 --compile \
    --out "$OUT/model-next-compiled.json" > "$OUT/model-next-compiled.log" 2>&1)
  grep -v "^{" "$OUT/model-next-compiled.log" | grep " | " | tail -4 | cut -c1-200
fi
if want fla; then  # every fla mixer the registry exposes, one at a time (fla compiles and autotunes on first use)
  # FLA_TESTS narrows each mixer's tests, e.g. FLA_TESTS=trains_a_step (the first, and the longest to compile), or
  # lists several ("trains_a_step packed cached"), each its own pytest process. FLA_PARALLEL=1 runs all those
  # processes at once: fla's first-use compiles are CPU-bound (16 cores), and only correctness is checked here, so
  # autotuning beside each other costs nothing that is reported.
  mixers=${FLA_MIXERS:-fla_mamba2 fla_simple_gla fla_retnet fla_gated_deltanet fla_hgrn2 fla_gla fla_kda fla_deltanet}
  for m in $mixers; do
    for t in ${FLA_TESTS:-all}; do
      sel=$m; [[ $t != all ]] && sel="$m and $t"
      cmd=(timeout ${FLA_TIMEOUT:-120} python3 -m pytest tests/gpu/test_fla_mixers.py -v -p no:cacheprovider -rfE
        -k "$sel")
      if [[ ${FLA_PARALLEL:-0} == 1 ]]; then "${cmd[@]}" > "$OUT/tests-fla-$m-$t.log" 2>&1 &
      else "${cmd[@]}" > "$OUT/tests-fla-$m-$t.log" 2>&1; fi
    done
  done
  wait
  for m in $mixers; do
    done_=$(cat "$OUT"/tests-fla-$m-*.log | grep -oE "::test_[a-z_]+\[$m\] (PASSED|FAILED|SKIPPED)" \
      | sed 's/::test_//' | tr '\n' ' ')
    echo "$m: ${done_:-nothing finished within ${FLA_TIMEOUT:-120} s}"
  done
  grep -h -E "^E |^FAILED" "$OUT"/tests-fla-*.log | cut -c1-200 | head -20
fi
cd benchmarks
if want layer; then
  timeout ${LAYER_TIMEOUT:-240} python3 bench_layer.py ${LAYER_ARGS:-} > "$OUT/layer.log" 2>&1
  grep -v "^{" "$OUT/layer.log" | tail -40 | cut -c1-200
fi
if want sparse; then
  timeout ${SPARSE_TIMEOUT:-90} python3 bench_sparse_attention.py --index-order --T 65536 > "$OUT/order.log" 2>&1
  tail -6 "$OUT/order.log"
  timeout ${SPARSE_TIMEOUT:-90} python3 bench_sparse_attention.py > "$OUT/sparse.log" 2>&1; tail -22 "$OUT/sparse.log"
fi
if want topk; then
  timeout ${TOPK_TIMEOUT:-70} python3 bench_topk.py > "$OUT/topk.log" 2>&1; tail -12 "$OUT/topk.log"
  timeout ${TOPK_TIMEOUT:-70} python3 bench_topk.py --stages --T 65536 131072 --rows 32768 > "$OUT/topk-stages.log" 2>&1
  tail -10 "$OUT/topk-stages.log"
fi
if want kl; then timeout ${KL_TIMEOUT:-150} python3 bench_indexer_kl.py > "$OUT/kl.log" 2>&1; tail -16 "$OUT/kl.log"; fi
if want model; then
  timeout ${MODEL_TIMEOUT:-400} python3 bench_model.py ${MODEL_ARGS:-} --out "$OUT/model.json" > "$OUT/model.log" 2>&1
  grep -v "^{" "$OUT/model.log" | tail -40 | cut -c1-200
fi
