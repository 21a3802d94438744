#!/usr/bin/env bash
# One nvidia-h200 call, carry [".device/bundle"] (the bundle of the ten
# patches): patch 10's kernel benchmark as it is (gate and up interleaved in
# one tile), then with two-dot-wip.patch (two tl.dots per K step), at the
# Qwen2-57B point that measured slower and at A2.7B for reference.
R=$PWD
OUT=${OUT:-$R/.device/out}
python3 -c "import sys; sys.path.insert(0, 'ci'); from pathlib import Path; \
from device_harness import unpack_bundle; unpack_bundle(Path('.device/bundle'), Path('/tmp/w'))" \
  2>&1 | tail -2
cd /tmp/w/patched || exit 2
export PYTHONPATH=/tmp/w/patched:/tmp/w/site
for v in interleaved two-dot; do
  [[ $v == two-dot ]] && { git apply "$R/results/tiled-silu-and-mul/two-dot-wip.patch" || exit 2; }
  timeout 200 python3 benchmarks/kernels/benchmark_moe_fused_silu_and_mul.py \
    --shapes qwen2-57b-a14b qwen1.5-moe-a2.7b --num-tokens 32 512 1024 2048 4096 \
    --reps 100 --json "$OUT/bench-$v.json" 2>&1 | grep -v "INFO\|WARNING" > "$OUT/bench-$v.txt"
  echo "== $v"; grep -E "^qwen" "$OUT/bench-$v.txt"
done
