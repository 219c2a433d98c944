#!/usr/bin/env bash
# GPU checks of the fast path, results under $OUT (each under 10 minutes; two fit one call where noted):
#   bash scripts/device_pending_checks.sh tests   # the GPU tests (tests/test_cuda_graphs.py: CUDA graphs, the Triton
#                                                 # kernels of the DiT and the decoder against the eager chains, the
#                                                 # fast paths' agreement; about 2 minutes)
#   bash scripts/device_pending_checks.sh interp  # the Triton kernels' interpreter tests with the machine's Triton and
#                                                 # NumPy (slow there: about 5 minutes)
#   bash scripts/device_pending_checks.sh stream  # bench_stream.py, the full-size model at batch 1 and 8: eager /
#                                                 # graphs / fast (= fast=True) / overlap / fused_cl, each fast
#                                                 # path's agreement with eager, memory over 300 blocks (5 minutes on
#                                                 # an H200, more on an H100: alone in a call)
#   bash scripts/device_pending_checks.sh batch1  # bench_stream.py at batch 1: fast / through WorldModel.generate (frames
#                                                 # before the re-run) / with the decode on its own stream beside the
#                                                 # re-run / with the decoder's CUDA graphs / compiled (fused_cl), each
#                                                 # one's agreement (about 7 minutes: alone in a call)
#   bash scripts/device_pending_checks.sh env     # bench_env.py at 1, 4, 16 and 64 synchronised worlds, the DiT's
#                                                 # Triton chains as fast=True chooses (on) and off (about 4 minutes)
#   bash scripts/device_pending_checks.sh latent  # bench_env.py at 1, 16 and 64 synchronised worlds observing frames
#                                                 # and latents (no decoding), and bench_imagine.py with and without
#                                                 # frames at 16 and 64 plans (about 4 minutes)
#   bash scripts/device_pending_checks.sh small   # bench_env.py at 1 and 4 synchronised worlds: the decoder's layout
#                                                 # (standard / channels-last) x conv3d mode (auto / triton) x its
#                                                 # Triton norms (off / on), fast=True's DiT chains (about 3 minutes)
#   bash scripts/device_pending_checks.sh desync  # bench_desync.py, 64 desynchronised worlds, two rounds of merged /
#                                                 # merged_eager_dit_chains / merged_eager_norms (about 8 minutes)
#   bash scripts/device_pending_checks.sh sides   # bench_env.py at 64 synchronised worlds (the last frame alone, then
#                                                 # every frame), this tree and the older tree in $MG_BASE_TREE (a
#                                                 # folder holding its matrixgame_env/, e.g. from `git archive`)
#                                                 # alternating base / this / this / base, then
#                                                 # profile_vector_host.py --phases (about 3 minutes on an H100)
#   bash scripts/device_pending_checks.sh warmup  # bench_env.py at 64 synchronised worlds, the last frame alone, with
#                                                 # 4 and with 8 steps of warm-up alternating (4, 8, 8, 4): that both
#                                                 # time steady steps (captures_timed [0, 0]; before bench_env.py warmed
#                                                 # up to steady state, 4 left a capture in them: 1,912 against 2,158
#                                                 # steps/s on an H100) (about 4 minutes on an H100)
#   bash scripts/device_pending_checks.sh cold    # bench_cold_start.py: a fresh process to the first frame of the
#                                                 # full-size architecture (random weights written first), 3 times
#                                                 # (about 3 minutes)
# Run from the repository root with the git-ignored .whl/ of pure-Python wheels carried (see
# scripts/device_speed_check.sh).
set -uo pipefail
: "${OUT:?set OUT to the folder that receives the results}"
checks="tests, interp, stream, batch1, env, latent, small, desync, sides, warmup or cold"
for check in "$@"; do  # every name and input checked before anything is installed or run
  case $check in
    tests|interp|stream|batch1|env|latent|small|desync|warmup|cold) ;;
    sides)
      if [ ! -d "${MG_BASE_TREE:-}/matrixgame_env" ]; then
        echo "sides: MG_BASE_TREE must name a folder that holds an older matrixgame_env/ (got '${MG_BASE_TREE:-}')" >&2
        exit 2
      fi ;;
    *) echo "unknown check $check ($checks)" >&2; exit 2 ;;
  esac
done
mkdir -p /tmp/site && python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
bench_env_64() {  # $1 mode, $2 run tag, $3 tree, then bench_env.py options: one run at 64 synchronised worlds
  local mode=$1 tag=$2 tree=$3; shift 3
  (cd "$tree" && PYTHONPATH=/tmp/site:$tree timeout 120 python3 benchmarks/bench_env.py --cpu-steps 0 \
      --gpu-worlds 64 --paths graphs "$@" --out "/tmp/${mode}_$tag" >"/tmp/${mode}_$tag.log" 2>&1)
  echo "$tag: rc $?"; grep -E "^gpu vector" "/tmp/${mode}_$tag.log" | tail -2
  { echo "== $tag"; grep -v -i warn "/tmp/${mode}_$tag.log"; } >>"$OUT/$mode.log"  # one file: $OUT returns few
  for f in /tmp/"${mode}_$tag"/*.json; do [ -f "$f" ] && cp "$f" "$OUT/${mode}_${tag}_$(basename "$f")"; done
}
for check in "$@"; do
  case $check in
    tests)
      timeout 240 python3 -m pytest -q -p no:warnings --tb=line tests/test_cuda_graphs.py tests/test_transfer.py \
          >"$OUT/tests.log" 2>&1
      grep -E "^E  |^FAILED|passed|failed" "$OUT/tests.log" | cut -c1-400 | tail -30 ;;
    interp)
      timeout 400 python3 -m pytest -q -p no:warnings --tb=line tests/test_triton_dit.py tests/test_triton_norm.py \
          tests/test_triton_conv.py >"$OUT/interp.log" 2>&1
      grep -E "^E  |^FAILED|passed|failed" "$OUT/interp.log" | cut -c1-400 | tail -30 ;;
    stream)
      timeout 560 python3 benchmarks/bench_stream.py --batches 1 8 --paths eager graphs fast overlap fused_cl \
          --blocks 6 --repeats 2 --long-blocks 300 --agreement-blocks 6 --out "$OUT" >"$OUT/stream.log" 2>&1
      grep -v -i warn "$OUT/stream.log" | tail -24 ;;
    batch1)
      timeout 540 python3 benchmarks/bench_stream.py --batches 1 --paths eager fast fast_early fast_beside \
          fast_decoder_graphs fused_cl --blocks 8 --repeats 3 --long-blocks 0 --agreement-blocks 4 --out "$OUT" \
          >"$OUT/batch1.log" 2>&1
      grep -v -i warn "$OUT/batch1.log" | tail -24 ;;
    env)
      timeout 400 python3 benchmarks/bench_env.py --cpu-steps 0 --gpu-worlds 1 4 16 64 --paths graphs --gpu-steps 30 \
          --warmup 6 --triton-dit auto off --out "$OUT" >"$OUT/env.log" 2>&1
      grep -E "^gpu vector" "$OUT/env.log" | tail -8 ;;
    latent)
      timeout 300 python3 benchmarks/bench_env.py --cpu-steps 0 --gpu-worlds 1 16 64 --paths graphs --gpu-steps 40 \
          --warmup 8 --observations last latent last latent --out "$OUT" >"$OUT/latent.log" 2>&1
      grep -E "^gpu vector" "$OUT/latent.log" | tail -12
      timeout 200 python3 benchmarks/bench_imagine.py --candidates 16 64 --horizon 3 --repeats 5 --rounds 2 \
          --out "$OUT" >"$OUT/imagine.log" 2>&1
      grep -E "faster" "$OUT/imagine.log" ;;
    small)
      timeout 400 python3 benchmarks/bench_env.py --cpu-steps 0 --gpu-worlds 1 4 --paths graphs --gpu-steps 60 \
          --warmup 10 --channels-last both --gpu-conv3d auto triton --triton-norms both --out "$OUT" >"$OUT/small.log" 2>&1
      grep -E "^gpu vector" "$OUT/small.log" | tail -16 ;;
    desync)
      timeout 560 python3 benchmarks/bench_desync.py --device cuda --worlds 64 --episode-steps 20 --warmup 200 \
          --steps 100 --rounds 2 --settings merged merged_eager_dit_chains merged_eager_norms --fast graphs --out "$OUT" \
          >"$OUT/desync.log" 2>&1
      grep -v -i warn "$OUT/desync.log" | tail -8 ;;
    sides)
      rm -rf /tmp/base_tree && mkdir -p /tmp/base_tree && cp -r "$MG_BASE_TREE/matrixgame_env" benchmarks models /tmp/base_tree/
      for tag in base_a this_a this_b base_b; do
        tree=$PWD; [ "${tag%_*}" = base ] && tree=/tmp/base_tree
        # both trees run this tree's benchmarks/, warmed 8 steps at least (after 4 a capture fell in the timed steps)
        bench_env_64 sides "$tag" "$tree" --observations last_only last --warmup 8
      done
      timeout 120 python3 benchmarks/profile_vector_host.py --worlds 64 --observation last_only --phases --out "$OUT" \
          >"$OUT/host_phases.log" 2>&1
      tail -24 "$OUT/host_phases.log" ;;
    warmup)
      for tag in w4_a w8_a w8_b w4_b; do
        steps=${tag%_*}; bench_env_64 warmup "$tag" "$PWD" --observations last_only --warmup "${steps#w}"
      done ;;
    cold)
      timeout 400 python3 benchmarks/bench_cold_start.py --random universal --repeats 3 --out "$OUT" \
          >"$OUT/cold.log" 2>&1
      tail -8 "$OUT/cold.log" ;;
  esac
done
