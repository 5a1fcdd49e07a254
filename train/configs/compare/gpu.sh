#!/usr/bin/env bash
# The GPU comparison (gpu.yaml) on a GPU machine without the corpus, as one command from the repository root:
#   bash train/configs/compare/gpu.sh OUT_DIR
# Needs: fla installed (pip install -e ".[gpu]", or the wheel bundles of ../shared/gpu/README.md) and the mixed
# corpus in runs/compare-gpu/data (python train/compare.py train/configs/compare/gpu.yaml --prepare-data, run where
# the corpus is). matplotlib wheels in .gpu/mpl are installed if matplotlib is missing (else: no PNGs).
# Writes OUT_DIR/report.md and OUT_DIR/compare-gpu.tgz (report, log, each run's metrics, samples and evaluation
# cells; no checkpoints). Running it again resumes: finished runs and evaluation cells are kept.
set -uo pipefail
out=${1:?usage: bash train/configs/compare/gpu.sh OUT_DIR}
py=${PYTHON:-python3}
if [[ ! -f runs/compare-gpu/data/mix-info.json ]]; then
  echo "gpu.sh: runs/compare-gpu/data is missing: build it with '$py train/compare.py" \
       "train/configs/compare/gpu.yaml --prepare-data' where the corpus is, and bring the folder along" >&2
  exit 2
fi
if ! "$py" -c 'import matplotlib' 2>/dev/null && compgen -G '.gpu/mpl/*.whl' >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/mpl .gpu/mpl/*.whl \
    && export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}/tmp/mpl
fi
export PYTHONUNBUFFERED=1
"$py" train/compare.py train/configs/compare/gpu.yaml --report-dir runs/compare-gpu/report 2>&1 \
  | tee -a runs/compare-gpu/log.txt
rc=$?
mkdir -p "$out"
tar czf "$out/compare-gpu.tgz" -C runs/compare-gpu --exclude=checkpoints --exclude=data .
cp runs/compare-gpu/report/report.md "$out/" 2>/dev/null
exit $rc
