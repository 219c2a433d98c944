#!/usr/bin/env bash
# GPU calls for the fast paths written but not yet on by default, results under $OUT (each under 10 minutes):
#   bash scripts/device_pending_checks.sh sync    # the GPU tests first (the DiT's Triton chains against the eager
#                                                 # chains, eagerly and through CUDA graphs, bf16 and float32; the
#                                                 # test that a desynchronised step waits only for its frames), then
#                                                 # bench_env.py at 16 and 64 synchronised worlds, the DiT's Triton
#                                                 # chains off, on, on, off (about 5 minutes)
#   bash scripts/device_pending_checks.sh desync  # bench_desync.py, 64 desynchronised worlds, two rounds of merged /
#                                                 # merged_triton_dit / merged_eager_norms (about 8 minutes)
#   bash scripts/device_pending_checks.sh stream  # bench_stream.py, the full-size model at batch 1 and 8: fast /
#                                                 # triton (the DiT's Triton chains) / fused (compiled chains), with
#                                                 # each one's agreement with the eager path (about 6 minutes)
# Run from the repository root with the git-ignored .whl/ of pure-Python wheels carried (see
# scripts/device_speed_check.sh).
set -uo pipefail
: "${OUT:?set OUT to the folder that receives the results}"
mkdir -p /tmp/site && python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
case ${1:?give sync, desync or stream} in
  sync)
    timeout 150 python3 -m pytest -q -p no:warnings tests/test_cuda_graphs.py tests/test_triton_dit.py \
        -k "waits_for_the_gpu_only or triton_dit or streaming_dit" 2>&1 | grep -E "Counter|Error|passed|failed"
    timeout 400 python3 benchmarks/bench_env.py --cpu-steps 0 --gpu-worlds 16 64 --paths graphs --gpu-steps 30 \
        --warmup 6 --triton-dit off on on off --out "$OUT" >"$OUT/env.log" 2>&1
    grep -E "^gpu vector" "$OUT/env.log" | tail -8 ;;
  desync)
    timeout 560 python3 benchmarks/bench_desync.py --device cuda --worlds 64 --episode-steps 20 --warmup 200 \
        --steps 100 --rounds 2 --settings merged merged_triton_dit merged_eager_norms --fast graphs --out "$OUT" \
        >"$OUT/desync.log" 2>&1
    grep -v -i warn "$OUT/desync.log" | tail -8 ;;
  stream)
    timeout 560 python3 benchmarks/bench_stream.py --batches 1 8 --paths fast triton fused --blocks 8 --repeats 3 \
        --long-blocks 0 --agreement-blocks 6 --out "$OUT" >"$OUT/stream.log" 2>&1
    grep -v -i warn "$OUT/stream.log" | tail -16 ;;
  *) echo "unknown check $1 (sync, desync or stream)" >&2; exit 2 ;;
esac
