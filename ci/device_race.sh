#!/usr/bin/env bash
# Runs ON the GPU device: why the patched A2.7B block at N = 1 runs at one of
# two speeds under CUDA graphs (issue 9). bench_layers runs at N = 1 with the
# shared expert on its aux stream (vLLM's default), timing base and patched
# beside second processes of each tree and ci/layer_variants.py variants, with
# 40 profiled cold replays per process for the per-replay timelines
# (`python ci/plot_layers.py --race ...` tabulates them).
#
# Usage (device `run`, carry [".device/bundle"], timeout_s 600):
#   bash ci/device_race.sh [BUNDLE]                       # race-{a2.7b,rf,next80b}.json.xz
#   bash ci/device_race.sh BUNDLE --capture-priority -1   # race-prio-{a2.7b,next80b}.json.xz
# With a priority the graphs are captured on a stream of that priority, so the
# block's main stream (router, routed experts) ranks above the aux stream.
set -uo pipefail
B=${1:-.device/bundle}
PRIO=()
TAG=race
if [[ "${2:-}" == "--capture-priority" ]]; then
  PRIO=(--capture-priority "$3")
  TAG=race-prio
fi
W=/tmp/bench_race
export PYTHONUNBUFFERED=1
python3 -c "import sys; sys.path.insert(0, 'ci'); import device_harness as h; from pathlib import Path; h.unpack_bundle(Path('$B'), Path('$W'))" || exit 1
python3 ci/layer_variants.py --work "$W" nogate pad3 rf-base rf-patched || exit 1
set -- $(python3 -c "import json; m = json.load(open('$B/MANIFEST.json'))['trees']; print(m['base_rev'], m['head_rev'])")
COMMON=(--base "$W/base" --patched "$W/patched" --site "$W/site" --base-rev "$1" --patched-rev "$2"
  --ns 1 --rounds 7 --cold-replays 40 "${PRIO[@]}")
SECOND=(--also base2=base --also patched2=patched)

bench() {  # NAME CONFIG TIMEOUT ARGS...: one run, its JSON as $OUT/$TAG-NAME.json.xz
  local name=$1 config=$2 limit=$3
  shift 3
  timeout "$limit" python3 ci/bench_layers.py run "${COMMON[@]}" --configs "$config" \
    --work "$W/$name" --out "$OUT/$name" "$@" > "$OUT/$TAG-$name.log" 2>&1
  echo "$name: exit $?"
  grep -v '^\[' "$OUT/$TAG-$name.log" | sed -n '1,/^{/p' | head -12
  mv "$OUT/$name/layers.json" "$OUT/$TAG-$name.json" && xz -9 "$OUT/$TAG-$name.json"
  rm -rf "${OUT:?}/$name"
}

# Six A2.7B workers fit the H100; Qwen3-Next dims (512 experts) fit five.
if [[ ${#PRIO[@]} -eq 0 ]]; then
  bench a2.7b a2.7b 250 "${SECOND[@]}" --also nogate="$W/nogate" --also pad3="$W/pad3"
  bench rf a2.7b 200 --also rf-base="$W/rf-base" --also rf-patched="$W/rf-patched"
else
  bench a2.7b a2.7b 250 "${SECOND[@]}" --also pad3="$W/pad3"
fi
bench next80b next80b 130 "${SECOND[@]}" --also pad3="$W/pad3"
