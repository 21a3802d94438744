#!/usr/bin/env bash
# One nvidia-h200 call, carry [".device/bundle"] (the series' bundle):
# the candidate's GPU tests and kernel benchmark on the series + the
# candidate, then the engine run of the candidate against the series at the
# batches it acts on (17 tokens and up) and prefill.
R=$PWD
OUT=${OUT:-$R/.device/out}
D=results/tiled-silu-and-mul
P=$R/$D/moe-tiled-silu-and-mul.patch
START=$(date +%s)
python3 -c "import sys; sys.path.insert(0, 'ci'); from pathlib import Path; \
from device_harness import unpack_bundle; unpack_bundle(Path('.device/bundle'), Path('/tmp/w'))" \
  2>&1 | tail -2
cd /tmp/w/patched || exit 2
git apply "$P" || { echo "the candidate does not apply"; exit 2; }
export PYTHONPATH=/tmp/w/patched:/tmp/w/site
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/kernels/moe/test_moe_fused_silu_and_mul.py \
  --junitxml "$OUT/tests.xml" 2>&1 | grep -v "INFO\|WARNING" | tail -15 > "$OUT/tests.txt"
cat "$OUT/tests.txt"
timeout 150 python3 benchmarks/kernels/benchmark_moe_fused_silu_and_mul.py \
  --shapes qwen1.5-moe-a2.7b qwen3-30b-a3b qwen2-57b-a14b --json "$OUT/bench.json" \
  2>&1 | grep -v "INFO\|WARNING" > "$OUT/bench.txt"
cat "$OUT/bench.txt"
cd "$R"
LEFT=$(( ${BUDGET:-570} - ($(date +%s) - START) ))
echo "engine run with ${LEFT}s left"
python3 ci/bench_e2e.py device --bundle .device/bundle --out "$OUT" --against series \
  --apply "$D/moe-tiled-silu-and-mul.patch" --models a2.7b:2 --batches 32,64 \
  --first-estimate 90 --budget "$LEFT" 2>&1 | grep -v "INFO\|WARNING" | tail -30
