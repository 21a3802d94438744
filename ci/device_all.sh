#!/usr/bin/env bash
# Runs ON the GPU device: all the series' GPU evidence in one call, from one
# bundle made by `python ci/device_bundle.py build` (pristine base + patched):
#   1. vLLM's own Qwen MoE blocks, base vs patched (ci/bench_layers.py),
#      default settings, then with the shared expert in line
#      (VLLM_DISABLE_SHARED_EXPERTS_STREAM=1);
#   2. device-to-device copies per modular MoE forward (ci/count_moe_copies.py);
#   3. the patches' tests and their upstream tests, base vs patched
#      (ci/device_test.sh).
# Everything lands in $OUT/gpu-all.tgz (the device returns at most 8 files).
#
# Usage (device `run`, carry [".device/final/bundle"], timeout_s 600):
#   bash ci/device_all.sh [BUNDLE] [-- <apply.py test options>]
set -uo pipefail
BUNDLE=${1:-.device/final/bundle}
shift || true
[[ "${1:-}" == "--" ]] && shift
REPO=$PWD
RES=/tmp/gpu-all
rm -rf "$RES"; mkdir -p "$RES/serial"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
W=/tmp/bench_layers

timeout 170 python3 ci/bench_layers.py run --bundle "$BUNDLE" --work "$W" --out "$RES" \
  --configs a2.7b,57b,next80b,next80b-q3next --rounds 3 > "$RES/layers.log" 2>&1
echo "layers: exit $?"; tail -25 "$RES/layers.log"

for tree in base patched; do
  (cd "$W/$tree" && PYTHONPATH="$W/$tree:$W/site" timeout 60 python3 "$REPO/ci/count_moe_copies.py" \
    --out "$RES/copies-$tree.json") > "$RES/copies-$tree.log" 2>&1
  echo "copies $tree: exit $?"; tail -8 "$RES/copies-$tree.log"
done

VLLM_DISABLE_SHARED_EXPERTS_STREAM=1 timeout 80 python3 ci/bench_layers.py run \
  --base "$W/base" --patched "$W/patched" --site "$W/site" --work /tmp/bench_layers_serial \
  --out "$RES/serial" --configs a2.7b,next80b --ns 1,4,16,64,256 --rounds 3 \
  > "$RES/serial/layers.log" 2>&1
echo "serial layers: exit $?"; tail -12 "$RES/serial/layers.log"

left=$(( 575 - SECONDS ))
OUT="$RES" bash ci/device_test.sh --bundle "$BUNDLE" --runs base,patched --name gpu \
  --budget "$(( left > 60 ? left - 20 : 40 ))" -- "$@" > /dev/null 2>&1
echo "tests: exit $?"; tail -40 "$RES/gpu-log.txt"
tar czf "$OUT/gpu-all.tgz" -C "$RES" .
