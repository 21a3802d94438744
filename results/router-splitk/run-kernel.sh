#!/usr/bin/env bash
# One nvidia-h200 call carrying .device/bundle: the router GEMM's GPU tests,
# then its kernel benchmark and (unless TUNE=0) its sweep, into $OUT.
#   bash results/router-splitk/run-kernel.sh [CANDIDATE.patch]
# With a bundle of the series this revision joined (head 6ad313792fdc), pass
# results/router-splitk/router-splitk.patch, as the calls of 2026-12-02 did;
# with a bundle of the current series, pass nothing.
set -uo pipefail
APPLY=()
[[ $# -gt 0 ]] && APPLY=(--apply "$(realpath "$1")")
bash ci/device_test.sh --runs patched --name splitk --budget 150 ${APPLY[@]+"${APPLY[@]}"} \
  -- --test tests/kernels/moe/test_triton_router_gemm.py -n 4
cd /tmp/trees/patched || exit 2
export PYTHONPATH=/tmp/trees/patched:/tmp/site
timeout 100 python3 benchmarks/kernels/benchmark_moe_router_gemm.py --reps 100 \
  --json "$OUT/bench.json"
if [[ ${TUNE:-1} == 1 ]]; then
  timeout 250 python3 benchmarks/kernels/benchmark_moe_router_gemm.py --reps 60 \
    --tune --json "$OUT/tune.json"
fi
