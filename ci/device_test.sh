#!/usr/bin/env bash
# Runs ON the GPU device: unpack .device/bundle (made by ci/device_bundle.py),
# run the test selection on the base and/or patched tree, and write into $OUT:
#   <name>-<run>.xml  <name>-<run>-table.txt  <name>-<run>.json   (per run)
#   <name>-compare.txt (base vs patched, when both ran)   <name>-log.txt
#
# Usage (from the repo root, in a device `run` with carry [".device/bundle"]):
#   bash ci/device_test.sh [--runs base,patched] [--name gpu] [--budget 540] \
#        [--bundle .device/bundle] [--apply PATCH ...] [--gpus 0,1] \
#        [-- <apply.py test options>]
# Options after `--` go to `python3 -m moepatch.testing` (e.g. --patch NAME,
# --all-moe, --test tests/kernels/moe/test_moe.py, --skip-test FILE, -k EXPR, -n 8).
# Default selection: every patch's tests; unless -n is given, `-n 14` with
# xdist's worksteal scheduling (the slow process-spawning combination tests
# then do not queue behind one worker): a whole tree in about 4.5 min.
# The time budget (seconds, default 540) is split evenly over the runs, each
# run interrupted at its share so its partial results still come back.
# --gpus 0,1 (a machine with several GPUs) runs the runs at once instead, the
# i-th run alone on the i-th GPU listed, each with the whole budget.
# --apply PATCH (repeatable, in order) applies a candidate patch to the patched
# tree before its run, as ci/bench_e2e.py --apply does for the engine, so a
# candidate's tests run on the GPU before it joins the series.
set -uo pipefail

BUNDLE=.device/bundle
RUNS=patched
NAME=gpu
BUDGET=540
APPLY=()
GPUS=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --runs) RUNS="$2"; shift 2 ;;
    --name) NAME="$2"; shift 2 ;;
    --budget) BUDGET="$2"; shift 2 ;;
    --bundle) BUNDLE="$2"; shift 2 ;;
    --gpus) GPUS="$2"; shift 2 ;;
    --apply) [[ -f "$2" ]] || { echo "device_test.sh: no patch $2" >&2; exit 2; }
             APPLY+=("$(realpath "$2")"); shift 2 ;;
    --) shift; break ;;
    *) echo "device_test.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
EXTRA=("$@")
IFS=, read -ra RUNLIST <<< "$RUNS"
IFS=, read -ra GPULIST <<< "$GPUS"
if [[ -n $GPUS ]] && (( ${#GPULIST[@]} < ${#RUNLIST[@]} )); then
  echo "device_test.sh: --gpus $GPUS names fewer GPUs than --runs $RUNS has runs" >&2; exit 2
fi
[[ " ${EXTRA[*]} " == *" -n "* ]] || EXTRA+=(-n 14 --pytest-arg=--dist=worksteal)
OUT=${OUT:-$PWD/.device/out}
mkdir -p "$OUT"
LOG="$OUT/$NAME-log.txt"
exec > >(tee -a "$LOG") 2>&1
START=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# Keep NVLink multicast off (device rule), also for every child process.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

[[ -f "$BUNDLE/MANIFEST.json" ]] || { echo "no bundle at $BUNDLE (carry it)"; exit 2; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'

# 1. dependency wheels -> /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site "$BUNDLE"/wheels/*.whl || { echo "wheel install failed"; exit 2; }
export PYTHONPATH=/tmp/site

# 2. compiled modules (sm_90-only fatbins) -> /tmp/so
mkdir -p /tmp/so
cp -r "$BUNDLE"/so/. /tmp/so/
for f in $(cd /tmp/so && find . -name '*.so.xz'); do xz -d -f "/tmp/so/$f"; done

# 3. trees: base in full, patched = base + overlay - deleted files
make_tree() {  # $1 = base|patched
  local dst=/tmp/trees/$1
  rm -rf "$dst"; mkdir -p "$dst"
  tar -xJf "$BUNDLE/trees/base.tar.xz" -C "$dst" || return 1
  if [[ $1 == patched ]]; then
    tar -xJf "$BUNDLE/trees/patched.tar.xz" -C "$dst" || return 1
    while IFS= read -r p; do [[ -n "$p" ]] && rm -f "$dst/$p"; done < "$BUNDLE/trees/patched.deleted"
    for patch in ${APPLY[@]+"${APPLY[@]}"}; do
      (cd "$dst" && git apply --whitespace=nowarn "$patch") \
        || { echo "device_test.sh: $patch does not apply to the patched tree"; return 1; }
      echo "applied $(basename "$patch") ($(sha256sum "$patch" | cut -c1-12)) to the patched tree"
    done
  fi
  cp /tmp/so/vllm/*.so "$dst/vllm/"
  cp -r /tmp/so/*.dist-info "$dst/" 2>/dev/null || true
  # FA2/FA3 binaries are not carried; an empty module lets vllm.vllm_flash_attn import.
  [[ -e "$dst/vllm/vllm_flash_attn/_vllm_fa3_C.py" ]] || : > "$dst/vllm/vllm_flash_attn/_vllm_fa3_C.py"
}

smoke() {  # the compiled ops load and give the right answer; fused_moe imports
  (cd "$1" && PYTHONPATH="$1:/tmp/site" python3 - <<'PY'
import torch
import vllm._C_stable_libtorch, vllm._moe_C_stable_libtorch  # noqa: F401,E401
from vllm.model_executor.layers import fused_moe  # noqa: F401
x = torch.randn(64, 4, 256, device="cuda", dtype=torch.bfloat16)
out = torch.empty(64, 256, device="cuda", dtype=torch.bfloat16)
torch.ops._moe_C.moe_sum(x, out, None, None)
torch.testing.assert_close(out, x.float().sum(1).bfloat16(), atol=2e-2, rtol=2e-2)
print("smoke: _C and _moe_C load, moe_sum correct, fused_moe imports on",
      torch.cuda.get_device_name())
PY
  )
}

one_run() {  # $1 = base|patched; $2 = how many runs share the budget left
  local run=$1 share rev label r
  make_tree "$run" || { echo "cannot unpack the $run tree"; return 2; }
  smoke "/tmp/trees/$run" || { echo "smoke test failed on the $run tree"; return 2; }
  share=$(( (BUDGET - ($(date +%s) - START)) / $2 ))
  echo "=== $run: time limit ${share}s${CUDA_VISIBLE_DEVICES:+ on GPU $CUDA_VISIBLE_DEVICES}"
  rev=$(python3 -c 'import json, sys; t = json.load(open(sys.argv[1]))["trees"]; print(t["base_rev" if sys.argv[2] == "base" else "head_rev"][:12])' "$BUNDLE/MANIFEST.json" "$run")
  label="$run $rev"
  if [[ $run == patched && ${#APPLY[@]} -gt 0 ]]; then
    label+=" + $(for p in "${APPLY[@]}"; do basename "$p"; done | paste -sd ' ')"
  fi
  python3 -m moepatch.testing --device cuda --precompiled none \
    --selection "$BUNDLE/selection.json" --tree "/tmp/trees/$run" --label "$label" \
    --time-limit "$share" --junit "$OUT/$NAME-$run.xml" --json "$OUT/$NAME-$run.json" \
    --table "$OUT/$NAME-$run-table.txt" "${EXTRA[@]}"
  r=$?
  echo "=== $run: exit $r"
  return $r
}

RC=0
if [[ -n $GPUS ]]; then
  RCDIR=$(mktemp -d)
  PIDS=()
  for i in "${!RUNLIST[@]}"; do
    run=${RUNLIST[$i]}
    { CUDA_VISIBLE_DEVICES=${GPULIST[$i]} one_run "$run" 1; echo $? > "$RCDIR/$run"; } 2>&1 \
      | sed -u "s/^/[$run] /" &
    PIDS+=($!)
  done
  wait "${PIDS[@]}"
  for run in "${RUNLIST[@]}"; do
    r=$(cat "$RCDIR/$run" 2>/dev/null || echo 2)
    [[ $r -ne 0 && $RC -eq 0 ]] && RC=$r
  done
  rm -rf "$RCDIR"
else
  NRUNS=${#RUNLIST[@]}
  for run in "${RUNLIST[@]}"; do
    one_run "$run" "$NRUNS"
    r=$?
    NRUNS=$(( NRUNS - 1 ))
    [[ $r -ne 0 && $RC -eq 0 ]] && RC=$r
  done
fi
if [[ -f "$OUT/$NAME-base.json" && -f "$OUT/$NAME-patched.json" ]]; then
  python3 -m moepatch.testing compare "$OUT/$NAME-base.json" "$OUT/$NAME-patched.json" \
    --out "$OUT/$NAME-compare.txt" || RC=1
fi
echo "device_test.sh: exit $RC after $(( $(date +%s) - START ))s"
exit $RC
