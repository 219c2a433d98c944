#!/usr/bin/env bash
# One GPU call (about 9 minutes) for the fast paths that are written but not yet measured, results under $OUT:
#   1. their agreement tests on the GPU (young cohorts on a second stream; the decoder's Triton norms);
#   2. bench_env.py: synchronised vector envs of 16 and 64 worlds, the decoder's Triton norms off and on;
#   3. bench_desync.py: 64 desynchronised worlds, merged / merged_triton_norms / merged_young_stream.
# Run from the repository root with the git-ignored .whl/ of pure-Python wheels carried (see
# scripts/device_speed_check.sh). Each part has a time limit, so that a slow one leaves time to the others.
set -uo pipefail
: "${OUT:?set OUT to the folder that receives the results}"
mkdir -p /tmp/site && python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 100 python3 -m pytest -q tests/test_cuda_graphs.py -k "second_stream or triton_norms or layout_policy" 2>&1 | tail -4
timeout 120 python3 benchmarks/bench_env.py --cpu-steps 0 --gpu-worlds 16 64 --paths graphs --triton-norms both \
    --action-guidance 1 --gpu-steps 30 --warmup 6 --out "$OUT" >"$OUT/env.log" 2>&1
grep "gpu vector" "$OUT/env.log" | tail -4
timeout 290 python3 benchmarks/bench_desync.py --device cuda --worlds 64 --episode-steps 20 --warmup 200 --steps 100 \
    --rounds 1 --settings merged merged_triton_norms merged_young_stream --fast graphs --out "$OUT" >"$OUT/desync.log" 2>&1
grep -v -i warn "$OUT/desync.log" | tail -6
