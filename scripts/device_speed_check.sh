#!/usr/bin/env bash
# Speed check on a GPU machine, results under $OUT: the fast paths' agreement tests, then the full-size
# stream benchmark (eager vs the fastest path, with profiles) and the doom-small env benchmark.
# Run from the repository root on a machine with torch and CUDA, with a git-ignored .whl/ beside it that holds
# the pure-Python wheels the image lacks, made here with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl gymnasium==1.4.0 \
#       farama-notifications cloudpickle pytest pluggy iniconfig packaging
#   MG_BATCHES       stream batch sizes          (default "1 4 8")
#   MG_WORLDS        vector-env world counts     (default "1 16 64")
#   MG_LONG_BLOCKS   blocks of the memory check  (default 100)
#   MG_TESTS         0: skip the agreement tests (e.g. run already in the same machine's earlier call)
#   MG_GUIDANCE      action guidance scales of the env benchmark (default "1 2")
#   MG_DECODER_GRAPHS  off, on or both: the env benchmark with the decoder replayed from CUDA graphs
#   MG_CONV3D        the decoder's GPU convolution forms of the env benchmark (default "auto"; e.g. "native triton")
#   MG_DESYNC_WORLDS vector-env world counts of the desynchronised-episodes benchmark (default "64"; empty: skip it)
set -euo pipefail
: "${OUT:?set OUT to the folder that receives the results}"
python3 -m pip install -q --no-deps .whl/*.whl
if [ "${MG_TESTS:-1}" != 0 ]; then python3 -m pytest -q tests/test_cuda_graphs.py 2>&1 | tail -3; fi
# shellcheck disable=SC2086
python3 benchmarks/bench_stream.py --batches ${MG_BATCHES:-1 4 8} --paths eager fused_cl \
    --long-blocks "${MG_LONG_BLOCKS:-100}" --agreement-blocks 6 --profile fused_cl --out "$OUT" >"$OUT/stream.log" 2>&1
grep -v -i warn "$OUT/stream.log" | head -16
# shellcheck disable=SC2086
python3 benchmarks/bench_env.py --cpu-steps 0 --gpu-worlds ${MG_WORLDS:-1 16 64} --paths graphs compile \
    --action-guidance ${MG_GUIDANCE:-1 2} --decoder-graphs ${MG_DECODER_GRAPHS:-off} --gpu-conv3d ${MG_CONV3D:-auto} \
    --profile --out "$OUT" \
    >"$OUT/env.log" 2>&1
grep "gpu vector" "$OUT/env.log" | tail -12
if [ -n "${MG_DESYNC_WORLDS-64}" ]; then
  # shellcheck disable=SC2086
  python3 benchmarks/bench_desync.py --device cuda --worlds ${MG_DESYNC_WORLDS-64} --episode-steps 20 --steps 100 \
      --warmup 250 --rounds 1 --settings merged merged_eager_norms merged_young_stream --fast graphs --out "$OUT" >"$OUT/desync.log" 2>&1
  grep -v -i warn "$OUT/desync.log" | tail -8
fi
