#!/usr/bin/env bash
# One nvidia-h200 call, carry [".device/bundle"] (the series' bundle), with
# the candidate applied to the patched tree: the GPU tests of patches 5, 8
# and 9 and the candidate's, then its probe and the decode benchmark.
R=$PWD
OUT=${OUT:-$R/.device/out}
P=results/one-launch-wip/moe-decode-one-launch.patch
bash ci/device_test.sh --runs patched --name one-launch --budget 200 --apply "$P" -- \
  --test tests/kernels/moe/test_moe_decode_gemv.py --test tests/kernels/moe/test_moe_expert_major.py \
  --test tests/kernels/moe/test_triton_router_gemm.py -n 8 2>&1 | grep -v "INFO\|WARNING" | tail -14
cd /tmp/trees/patched || exit 2
export PYTHONPATH=/tmp/trees/patched:/tmp/site
timeout 150 python3 "$R/results/one-launch-wip/probe.py" --json "$OUT/probe.json" 2>&1 \
  | grep -v "INFO\|WARNING" | tee "$OUT/probe.txt"
timeout 100 python3 benchmarks/kernels/benchmark_moe_decode_gemv.py \
  --shapes qwen1.5-moe-a2.7b qwen3-next-80b-a3b --num-tokens 1 2 4 8 16 \
  --json "$OUT/gemv.json" 2>&1 | grep -v "INFO\|WARNING" | tee "$OUT/gemv.txt"
