#!/usr/bin/env bash
# One device call (carry [".device/bundle"], a bundle of patches/): upstream
# test_batched_moe.py and test_cutlass_moe.py on both trees, then the CUTLASS
# FP8 case from seeded inputs on both trees (plain and with --poison), then
# the side-by-side comparison. Everything goes into $OUT/call.tar.xz (a call
# brings back few files); the comparison also to stdout.
set -uo pipefail
: "${OUT:?run on the device, where OUT is set}"
FINAL=$OUT
export OUT=$FINAL/call
mkdir -p "$OUT"
ROOT=$PWD
SCRIPT=$ROOT/results/cutlass-fp8-flake/cutlass_fp8_errors.py

bash ci/device_test.sh --runs base,patched --name upstream --budget 470 -- \
    --test tests/kernels/moe/test_batched_moe.py --test tests/kernels/moe/test_cutlass_moe.py

errors() {  # $1 = tree, $2 = time limit, rest = script options
  local tree=$1 limit=$2
  shift 2
  (cd "/tmp/trees/$tree" && PYTHONPATH="/tmp/trees/$tree:/tmp/site" \
      timeout "$limit" python3 "$SCRIPT" --label "$tree" "$@")
  echo "=== cutlass_fp8_errors $tree $*: exit $?"
}
for tree in base patched; do
  errors "$tree" 100 --seeds 0-7 --out "$OUT/errors-$tree.jsonl"
done
for tree in base patched; do
  errors "$tree" 60 --seeds 0-2 --poison --out "$OUT/errors-$tree-poison.jsonl"
done
python3 "$SCRIPT" --compare "$OUT"/errors-*.jsonl | tee "$OUT/errors-compare.txt"
tar -cJf "$FINAL/call.tar.xz" -C "$FINAL" call && rm -rf "$OUT"
