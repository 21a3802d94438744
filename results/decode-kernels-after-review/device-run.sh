#!/usr/bin/env bash
# One nvidia-h200 call, carry [".device/bundle"] (the series' bundle):
# patch 5's decode benchmark on the series as it is, with up-offset.patch and
# with revert-bounds.patch (diagnostic only), then the release-vs-series
# engine run, with up-offset.patch applied if it measured faster.
R=$PWD
OUT=${OUT:-$R/.device/out}
D=results/decode-kernels-after-review
START=$(date +%s)
python3 -c "import sys; sys.path.insert(0, 'ci'); from pathlib import Path; \
from device_harness import unpack_bundle; unpack_bundle(Path('.device/bundle'), Path('/tmp/w'))" \
  2>&1 | tail -2
cd /tmp/w/patched || exit 2
export PYTHONPATH=/tmp/w/patched:/tmp/w/site
for v in series up-offset revert-bounds; do
  [[ $v != series ]] && { git apply "$R/$D/$v.patch" || { echo "$v does not apply"; continue; }; }
  timeout 90 python3 benchmarks/kernels/benchmark_moe_decode_gemv.py \
    --shapes qwen1.5-moe-a2.7b qwen3-next-80b-a3b --num-tokens 1 2 4 8 \
    --json "$OUT/gemv-$v.json" 2>&1 | grep -v "INFO\|WARNING" > "$OUT/gemv-$v.txt"
  echo "== $v"; grep -E "^qwen" "$OUT/gemv-$v.txt"
  [[ $v != series ]] && git apply -R "$R/$D/$v.patch"
done
cd "$R"
PICK=$(python3 - "$OUT" <<'PY'
import json, sys
def total(v):
    try:
        rows = json.load(open(f"{sys.argv[1]}/gemv-{v}.json"))["rows"]
    except Exception:
        return float("inf")
    return sum(r["decode_us"] for r in rows)
print("up-offset" if total("up-offset") < total("series") else "series")
PY
)
echo "engine run on: $PICK"
APPLY=(); [[ $PICK == up-offset ]] && APPLY=(--apply "$D/up-offset.patch")
LEFT=$(( 560 - ($(date +%s) - START) ))
python3 ci/bench_e2e.py device --bundle .device/bundle --out "$OUT" --against release \
  "${APPLY[@]}" --check a2.7b --models a2.7b:3 --batches 1,8,16,32 --profile \
  --first-estimate 110 --budget "$LEFT" 2>&1 | grep -v "INFO\|WARNING" | tail -40
