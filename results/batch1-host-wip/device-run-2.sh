#!/usr/bin/env bash
# The second device call behind this folder (nvidia-h200, carry .device/bundle
# and .device/pyspy): the CutlassExpertsFp8 combination tests on both trees
# with the time to finish, then the py-spy run again with only the stacks of
# the decode repetitions kept (the whole run's raw file is 80-126 MB). A call
# brings back at most 8 files, so the benchmark's own files stay in /tmp and
# the tests keep their tables, compare and log.
set -u
bash ci/device_test.sh --runs base,patched --name cutlass --budget 300 -- \
    --test tests/kernels/moe/test_modular_kernel_combinations.py -k "CutlassExpertsFp8 and singlegpu" -n 3 2>&1 | tail -8
rm -f "$OUT"/cutlass-*.xml "$OUT"/cutlass-*.json

python3 -m pip install -q --no-deps --target /tmp/pyspy .device/pyspy/*.whl
/tmp/pyspy/bin/py-spy record --subprocesses --nonblocking --rate 500 --format raw \
    -o /tmp/spy-raw.txt -- \
    python3 ci/bench_e2e.py device --bundle .device/bundle --out /tmp/spy-e2e --against release \
    --models a2.7b:1 --batches 1 --reps 8 --prefill-reps 1 --first-estimate 115 --budget 250 \
    > /tmp/spy-log.txt 2>&1 || echo "py-spy run: exit $?"
grep -a "time_decode" /tmp/spy-raw.txt | xz -9 > "$OUT/spy-decode.txt.xz"
grep -a "batch 1:" /tmp/spy-log.txt
ls -la "$OUT"
