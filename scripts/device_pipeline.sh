#!/usr/bin/env bash
# Trains doom-small on a GPU machine in resumable, time-limited pieces.
# Usage: bash scripts/device_pipeline.sh STAGE[:MINUTES] ...
#   stages: setup next record vae encode dit distill reward eval pack
#   distill: from $MG_DISTILL_INIT (default: the dit stage's model), settings in $MG_DISTILL_ARGS;
#   eval: `matrixgame-env eval` of $MG_EVAL_MODEL (default: the reward model) on the recording's held-out episodes
#         (rollouts of $MG_DRIFT_MINUTES, default 10, for the drift statistics),
#         into $MG_EVAL_OUT (default: $MG_WORK/eval),
#         judged by the IDM in $MG_IDM (default: models/doom-small/eval/idm; empty: train one);
#   pack: the model folders named in $MG_PACK_MODELS (default: reward, which holds the DiT too), the VAE (float32)
#         and config of the vae stage when it ran, the logs of the vae, dit, distill and reward stages, the distillation's
#         action reader (--action-weight) and the eval, as <=15 MiB pieces in $OUT
#         (join here with `cat bundle.tar.part* | tar x`, then `python scripts/pack_model.py --unpack ...`).
# Work lives in $MG_WORK (default /tmp/mg) so that consecutive calls on a warm machine reuse it;
# each stage's result.json is copied to $OUT when it is set; `pack` bundles the model folders.
set -eo pipefail
cd "$(dirname "$0")/.."
WORK=${MG_WORK:-/tmp/mg}
CONFIG=${MG_CONFIG:-models/doom-small/config.json}
mkdir -p "$WORK"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
cli() { python3 -m matrixgame_env.cli "$@"; }
resume_flag() { [ -d "$WORK/runs/$1/checkpoints" ] && echo --resume || true; }
for item in "$@"; do
  stage=${item%%:*}; minutes=${item#*:}; [ "$minutes" = "$item" ] && minutes=5
  echo "=== $stage ($minutes min) $(date +%T)"
  case $stage in
    setup)
      if ! python3 -c "import vizdoom, gymnasium" 2>/dev/null; then
        mkdir -p /tmp/site && tar -xJf .whl/vizdoom_slim.tar.xz -C /tmp/site
        python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
        mkdir -p /tmp/site/vizdoom/scenarios  # the slim package drops the bundled scenarios
        chmod +x /tmp/site/vizdoom/vizdoom    # in case the archive was packed without file modes
      fi ;;
    next)  # the next model (models/next: the motion-loss VAE, the DiT mapped onto its latents) in $WORK/next
      if [ ! -f "$WORK/next/config.json" ]; then
        python3 scripts/assemble_model.py "$WORK/next" --vae models/next/vae-e32d16-motion --clip models/doom-small \
          --dit models/next/dit-mapped-motion
        cp models/doom-small/start_*.png "$WORK/next/"
      fi ;;
    record)
      cli record --out "$WORK/data" --minutes "$minutes" --workers "${MG_RECORD_WORKERS:-14}" --no-progress ;;
    vae)
      cli train vae --data "$WORK/data" --model-config "$CONFIG" --out "$WORK/runs" --minutes "$minutes" \
        --batch-size "${MG_VAE_BATCH:-16}" --steps "${MG_VAE_STEPS:-4000}" --workers 8 --no-progress $(resume_flag vae) \
        ${MG_VAE_ARGS:-} ;;
    encode)
      cli train encode --data "$WORK/data" --init "${MG_ENCODE_INIT:-$WORK/runs/vae/model}" --out "$WORK/runs" --minutes "$minutes" \
        --workers 8 --no-progress ;;
    dit)
      cli train dit --data "$WORK/runs/encode" --init "${MG_DIT_INIT:-$WORK/runs/vae/model}" --out "$WORK/runs" \
        --minutes "$minutes" --batch-size "${MG_DIT_BATCH:-32}" --steps "${MG_DIT_STEPS:-6000}" --workers 4 \
        --no-progress $(resume_flag dit) ${MG_DIT_ARGS:-} ;;
    distill)
      cli train distill --data "$WORK/runs/encode" --init "${MG_DISTILL_INIT:-$WORK/runs/dit/model}" --out "$WORK/runs" \
        --minutes "$minutes" --batch-size "${MG_DISTILL_BATCH:-8}" --steps "${MG_DISTILL_STEPS:-600}" --workers 4 \
        --no-progress $(resume_flag distill) ${MG_DISTILL_ARGS:-} ;;
    reward)
      cli train reward --data "$WORK/runs/encode" --init "${MG_REWARD_INIT:-$WORK/runs/distill/model}" \
        --out "$WORK/runs" --minutes "$minutes" --no-progress $(resume_flag reward) ;;
    eval)  # judged by the shipped inverse-dynamics model (MG_IDM; empty: train one for MG_IDM_STEPS)
      idm=${MG_IDM-models/doom-small/eval/idm}
      cli eval --model "${MG_EVAL_MODEL:-$WORK/runs/reward/model}" --data "$WORK/data" --out "${MG_EVAL_OUT:-$WORK/eval}" \
        --clips 32 --horizon-s 4 --drift-minutes "${MG_DRIFT_MINUTES:-10}" ${idm:+--idm "$idm"} --steps "${MG_IDM_STEPS:-6000}" \
        --workers 8 --no-progress ;;
    pack)
      [ -n "$OUT" ] || { echo "pack needs \$OUT" >&2; exit 2; }
      rm -rf /tmp/pack && mkdir -p /tmp/pack
      for s in vae dit distill reward; do
        mkdir -p "/tmp/pack/$s"
        if [ "$s" = vae ] && [ -f "$WORK/runs/vae/model/vae.safetensors" ]; then  # float32, as shipped
          cp "$WORK/runs/vae/model/vae.safetensors" "$WORK/runs/vae/model/config.json" /tmp/pack/vae/
        elif [ -d "$WORK/runs/$s/model" ] && [[ " ${MG_PACK_MODELS:-reward} " == *" $s "* ]]; then
          python3 scripts/pack_model.py "$WORK/runs/$s/model" "/tmp/pack/$s" --piece-mib 1000
        fi
        cp "$WORK/runs/$s/log.jsonl" "$WORK/runs/$s/result.json" "/tmp/pack/$s/" 2>/dev/null || true
        # the distillation's latent action reader (--action-weight), reusable with --action-reader
        cp "$WORK/runs/$s/action_reader.safetensors" "/tmp/pack/$s/" 2>/dev/null || true
      done
      for e in "$WORK"/eval*; do  # every eval folder (MG_EVAL_OUT), without the IDM's checkpoints
        [ -d "$e" ] && cp -r "$e" /tmp/pack/ && rm -f "/tmp/pack/$(basename "$e")"/idm/*.pt
      done
      tar cf - -C /tmp pack | split -b 15M - "$OUT/bundle.tar.part"
      ls -la "$OUT"
      continue ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
  if [ -n "$OUT" ] && [ -f "$WORK/runs/$stage/result.json" ]; then
    cp "$WORK/runs/$stage/result.json" "$OUT/${stage}_result.json"  # the model itself travels with `pack`
  fi
done
