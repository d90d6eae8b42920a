#!/usr/bin/env bash
# The device check: one call on a machine with a lent GPU, within 8 minutes.
#   1. the CUDA tests (pytest -m cuda)
#   2. the kernel on CUDA at p = 97, d_model 128 (30 steps, 16 inputs x 97 outputs):
#      steps per second and efficiency against the device's measured matmul rate
#   3. the kernel sharded with nccl over every visible GPU against the single-process result
# Results: bench/results/device_*.json. On a machine without CUDA the CUDA parts are skipped
# (and it says so). Installs nothing from the network: at most `pip install -e .` of this repo
# without dependencies.
#
#   bash bench/device_check.sh
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout, whatever is installed
out=bench/results
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python -c "import explaind_kernel" 2>/dev/null \
  || pip install -e . --no-deps --no-build-isolation -q || { echo "cannot import the repo"; exit 1; }

gpus=$(python -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
started=$(date +%s)
if [ "$gpus" = "0" ]; then
  echo "device_check: no CUDA device here: skipping the CUDA tests, the CUDA kernel bench and the nccl sharding"
  python - <<'PY'
import json, platform, torch
json.dump({"cuda": False, "torch": torch.__version__, "machine": platform.machine(),
           "skipped": ["pytest -m cuda", "kernel bench on cuda", "sharded kernel (nccl)"]},
          open("bench/results/device_cpu_only.json", "w"), indent=1)
PY
  # the CUDA tests still collect and skip, which proves the marker works here
  timeout 120 python -m pytest -q -m cuda -p no:cacheprovider tests 2>&1 | tail -1
  echo "device_check: wrote $out/device_cpu_only.json"
  exit 0
fi

echo "device_check: $gpus CUDA device(s)"
status=0
timeout 150 python -m pytest -q -m cuda -p no:cacheprovider tests > "$work/tests.txt" 2>&1
tests_rc=$?
tail -3 "$work/tests.txt"
python - "$tests_rc" "$work/tests.txt" <<'PY'
import json, sys
lines = open(sys.argv[2]).read().splitlines()
json.dump({"returncode": int(sys.argv[1]), "summary": lines[-1] if lines else ""},
          open("bench/results/device_tests.json", "w"), indent=1)
PY
[ "$tests_rc" = "0" ] || status=1

timeout 60 python bench/device_kernel.py record "$work" || { echo "recording failed"; exit 1; }
timeout 200 python bench/device_kernel.py single "$work" || status=1
if [ -f "$work/single.explaind" ]; then
  timeout 120 torchrun --standalone --nproc-per-node "$gpus" bench/device_kernel.py sharded "$work" \
    && timeout 30 python bench/device_kernel.py compare "$work" || status=1
fi
echo "device_check: done in $(( $(date +%s) - started )) s (status $status); results in $out/device_*.json"
exit $status
