#!/usr/bin/env bash
# VAE widths side by side on one GPU machine: each variant trains from scratch with the same recipe, all at
# once, in calls of under 10 minutes made back to back (the machine stays warm, so $MG_WORK carries over):
#   bash scripts/device_vae_widths.sh 1      # setup, record 90 minutes, start every variant
#   bash scripts/device_vae_widths.sh 2      # continue them (--resume)
#   bash scripts/device_vae_widths.sh 3      # continue, compare their round trips of clips and of frames alone
#                                            # (PSNR, frame statistics, the shipped IDM's accuracy), pack into $OUT
# Variants (MG_VAE_VARIANTS, NAME=ENCODER_DIM/DECODER_DIM, default "e16d16=16/16 e32d16=32/16 e32d32=32/32")
# take the rest of models/doom-small/config.json. Recipe: MG_VAE_ARGS. Each round gives every variant the minutes
# left of MG_CALL_SECONDS (default 560) after its other steps. MG_GPU_TESTS=1 runs tests/test_cuda_graphs.py beside
# the recording in round 1. MG_PACK_VARIANTS (default: all) names the variants whose weights come back: $OUT returns
# at most 64 MiB in all (float32: 10 MB for 16/16, 22 MB for 32/16, 41 MB for 32/32).
# MG_VAE_INIT=FOLDER (config.json + vae.safetensors, e.g. a variant brought back by an earlier round 3) continues that
# VAE with a new schedule instead of starting from scratch (its widths, not the variant's; scripts/assemble_model.py
# makes it a model folder first). Round 3 compares the variants with the models in MG_COMPARE_WITH (default
# models/doom-small; empty: none), so leave that empty when the shipped weights stay out of the working tree.
# MG_VAE_EXTRA_<NAME> adds options for one variant (e.g. MG_VAE_EXTRA_motion="--motion-weight 1" beside a plain one:
# two variants of the same widths continued from the same MG_VAE_INIT make an A/B test of a loss).
set -eo pipefail
cd "$(dirname "$0")/.."
export MG_WORK=${MG_WORK:-/tmp/mg} PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
VARIANTS=${MG_VAE_VARIANTS:-e16d16=16/16 e32d16=32/16 e32d32=32/32}
RECIPE=${MG_VAE_ARGS:---batch-size 32 --steps 8000 --lr 3e-4 --warmup-steps 200 --edge-weight 0.5}
started=$(date +%s)
minutes_left() { python3 -c "print(round(($1 - ($(date +%s) - $started)) / 60, 2))"; }
train_all() {  # $1: minutes for each variant, all at once on the GPU
  local pids=()
  for variant in $VARIANTS; do
    name=${variant%%=*}; widths=${variant#*=}
    out=$MG_WORK/vae_$name
    mkdir -p "$out"
    python3 - "$out/config.json" "${widths%/*}" "${widths#*/}" <<'PY'
import json, sys
config = json.load(open("models/doom-small/config.json"))
config["vae"].update(dim=int(sys.argv[2]), decoder_dim=int(sys.argv[3]))
json.dump(config, open(sys.argv[1], "w"), indent=1)
PY
    start=(--model-config "$out/config.json")
    if [ -n "${MG_VAE_INIT:-}" ]; then
      [ -f "$out/init/config.json" ] || python3 scripts/assemble_model.py "$out/init" --vae "$MG_VAE_INIT"
      start=(--init "$out/init")
    fi
    resume=""; [ -d "$out/vae/checkpoints" ] && resume=--resume
    extra="MG_VAE_EXTRA_$name"
    python3 -m matrixgame_env.cli train vae --data "$MG_WORK/data" "${start[@]}" --out "$out" \
      --minutes "$1" --workers 4 --no-progress $resume $RECIPE ${!extra:-} > "$out/round.txt" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || echo "a variant failed (pid $pid)"; done
  for variant in $VARIANTS; do
    name=${variant%%=*}; echo "--- $name"; tail -n 4 "$MG_WORK/vae_$name/round.txt"
  done
}
call=${MG_CALL_SECONDS:-560}
case ${1:-} in
  1)
    bash scripts/device_pipeline.sh setup
    if [ "${MG_GPU_TESTS:-0}" = 1 ]; then
      timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py > "$MG_WORK/gpu_tests.txt" 2>&1 &
      tests=$!
    fi
    bash scripts/device_pipeline.sh record:${MG_RECORD_MINUTES:-90}
    if [ -n "${tests:-}" ]; then wait "$tests" || true; tail -n 15 "$MG_WORK/gpu_tests.txt"; fi
    train_all "$(minutes_left "$call")" ;;
  2) train_all "$(minutes_left "$call")" ;;
  3)
    train_all "$(minutes_left $((call - ${MG_COMPARE_SECONDS:-120})))"
    models=(${MG_COMPARE_WITH-models/doom-small})
    for variant in $VARIANTS; do models+=("$MG_WORK/vae_${variant%%=*}/vae/model"); done
    python3 scripts/compare_decoders.py --data "$MG_WORK/data" --device cuda --clips 32 --frames 81 --frames-alone \
      --idm models/doom-small/eval/idm --out "$MG_WORK/compare_widths.json" "${models[@]}"
    rm -rf /tmp/pack && mkdir -p /tmp/pack
    cp "$MG_WORK/compare_widths.json" /tmp/pack/
    for variant in $VARIANTS; do
      name=${variant%%=*}; mkdir -p "/tmp/pack/$name"
      cp "$MG_WORK/vae_$name/vae/"{log.jsonl,result.json} "/tmp/pack/$name/" 2>/dev/null || true
      if [[ " ${MG_PACK_VARIANTS:-$name} " == *" $name "* ]]; then
        cp "$MG_WORK/vae_$name/vae/model/"{vae.safetensors,config.json} "/tmp/pack/$name/"
      fi
    done
    [ -n "$OUT" ] && tar cf - -C /tmp pack | split -b 15M - "$OUT/bundle.tar.part"
    ls -la "$OUT" ;;
  *) echo "usage: bash scripts/device_vae_widths.sh 1|2|3" >&2; exit 2 ;;
esac
