#!/usr/bin/env bash
# One nvidia-h200 call, carry [".device/bundle"] (the bundle of the series):
# applies moe-decode-prefetch-w2.patch to the bundle's patched tree, runs
# probe.py (no prefetch / before / after, alone and beside a shared-expert
# GEMM pair), then the decode GEMV test file with the patch.
R=$PWD
OUT=${OUT:-$R/.device/out}
python3 -c "import sys; sys.path.insert(0, 'ci'); from pathlib import Path; \
from device_harness import unpack_bundle; unpack_bundle(Path('.device/bundle'), Path('/tmp/w'))" \
  2>&1 | tail -2
cd /tmp/w/patched || exit 2
git apply "$R/results/decode-w2-prefetch-wip/moe-decode-prefetch-w2.patch" || exit 2
export PYTHONPATH=/tmp/w/patched:/tmp/w/site
timeout 240 python3 "$R/results/decode-w2-prefetch-wip/probe.py" --json "$OUT/probe.json" \
  2>&1 | grep -v "INFO\|WARNING" | tee "$OUT/probe.txt"
timeout 200 python3 -m pytest -q -n 8 tests/kernels/moe/test_moe_decode_gemv.py \
  -p no:cacheprovider 2>&1 | tail -5 | tee "$OUT/tests.txt"
