#!/usr/bin/env bash
# The device call behind this folder (nvidia-h200, carry .device/bundle and
# .device/pyspy): the graph-launch probe, then one engine process per tree at
# batch 1 sampled by py-spy (Python frames of every thread), then the
# CutlassExpertsFp8 combination tests on both trees (one failed once in the
# selection of 2026-12-02 and passed in the two selections before).
set -u
HERE=results/batch1-host-wip
python3 "$HERE/graph_launch_probe.py" --out "$OUT/graph-launch-probe.json" 2>&1 | tee "$OUT/graph-launch-probe.txt"

python3 -m pip install -q --no-deps --target /tmp/pyspy .device/pyspy/*.whl
/tmp/pyspy/bin/py-spy record --subprocesses --nonblocking --rate 500 --format raw \
    -o "$OUT/spy-raw.txt" -- \
    python3 ci/bench_e2e.py device --bundle .device/bundle --out "$OUT" --against release \
    --models a2.7b:1 --batches 1 --reps 12 --prefill-reps 1 --first-estimate 100 --budget 230 \
    > "$OUT/spy-log.txt" 2>&1 || echo "py-spy run: exit $?"
tail -5 "$OUT/spy-log.txt"
bash ci/device_test.sh --runs base,patched --name cutlass --budget 160 -- \
    --test tests/kernels/moe/test_modular_kernel_combinations.py -k "CutlassExpertsFp8 and singlegpu" -n 3 2>&1 | tail -12
ls -la "$OUT"
