#!/usr/bin/env bash
# A second call on the same warm machine, after device-run.sh left the trees in
# /tmp/trees: the three CUTLASS FP8 combination cases through pytest itself,
# with the worker's random state seeded before each test (seed_before_test.py),
# seeds 0-3 on both trees at once. Everything goes into $OUT/seeded.tar.xz.
set -uo pipefail
: "${OUT:?run on the device, where OUT is set}"
HERE=$PWD/results/cutlass-fp8-flake
mkdir -p "$OUT/seeded"
for tree in base patched; do
  [[ -d /tmp/trees/$tree ]] || { echo "no /tmp/trees/$tree: run device-run.sh first"; exit 2; }
  for seed in 0 1 2 3; do
    (cd "/tmp/trees/$tree" && CUTLASS_FLAKE_SEED=$seed \
      PYTHONPATH="/tmp/trees/$tree:/tmp/site:$HERE" timeout 420 python3 -m pytest \
      -p seed_before_test -q -rA -p no:cacheprovider \
      tests/kernels/moe/test_modular_kernel_combinations.py \
      -k "singlegpu and CutlassExpertsFp8" > "$OUT/seeded/$tree-$seed.txt" 2>&1
     echo "$tree seed $seed: pytest exit $?") &
  done
done
wait
for f in "$OUT"/seeded/*.txt; do
  echo "== $(basename "$f" .txt)"
  grep -E "^(PASSED|FAILED|ERROR) |Mismatched elements|Greatest absolute|[0-9]+ (passed|failed)" "$f"
done
tar -cJf "$OUT/seeded.tar.xz" -C "$OUT" seeded && rm -rf "$OUT/seeded"
