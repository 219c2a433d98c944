#!/usr/bin/env bash
# One GPU call (about 8 minutes) for the fast path written but not yet on by default, results under $OUT:
# bench_desync.py with 64 desynchronised worlds: merged (the default env, the decoder's Triton norms on) /
# merged_young_stream (the same, young cohorts on a second CUDA stream) / merged_eager_norms (Triton norms off).
# Run from the repository root with the git-ignored .whl/ of pure-Python wheels carried (see
# scripts/device_speed_check.sh). MG_TESTS=1 first runs the GPU test that a desynchronised step waits only for its
# frames (about 20 s; it found one more wait, no package line behind it, with the norms on and off: its key now
# names the caller's line and thread).
set -uo pipefail
: "${OUT:?set OUT to the folder that receives the results}"
mkdir -p /tmp/site && python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
if [ "${MG_TESTS:-0}" = 1 ]; then
  timeout 100 python3 -m pytest -q tests/test_cuda_graphs.py -k "waits_for_the_gpu_only" 2>&1 | grep -E "Counter|passed|failed"
fi
timeout 540 python3 benchmarks/bench_desync.py --device cuda --worlds 64 --episode-steps 20 --warmup 200 --steps 100 \
    --rounds 2 --settings merged merged_young_stream merged_eager_norms --fast graphs --out "$OUT" >"$OUT/desync.log" 2>&1
grep -v -i warn "$OUT/desync.log" | tail -6
