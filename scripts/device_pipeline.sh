#!/usr/bin/env bash
# Trains doom-small on a GPU machine in resumable, time-limited pieces.
# Usage: bash scripts/device_pipeline.sh STAGE[:MINUTES] ...   (stages: setup record vae encode dit distill reward)
# Work lives in $MG_WORK (default /tmp/mg) so that consecutive calls on a warm machine reuse it;
# finished model folders are copied to $OUT when it is set.
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
      fi ;;
    record)
      cli record --out "$WORK/data" --minutes "$minutes" --workers "${MG_RECORD_WORKERS:-14}" --no-progress ;;
    vae)
      cli train vae --data "$WORK/data" --model-config "$CONFIG" --out "$WORK/runs" --minutes "$minutes" \
        --batch-size "${MG_VAE_BATCH:-16}" --steps "${MG_VAE_STEPS:-4000}" --workers 8 --no-progress $(resume_flag vae) ;;
    encode)
      cli train encode --data "$WORK/data" --init "$WORK/runs/vae/model" --out "$WORK/runs" --minutes "$minutes" \
        --workers 8 --no-progress ;;
    dit)
      cli train dit --data "$WORK/runs/encode" --init "${MG_DIT_INIT:-$WORK/runs/vae/model}" --out "$WORK/runs" \
        --minutes "$minutes" --batch-size "${MG_DIT_BATCH:-32}" --steps "${MG_DIT_STEPS:-6000}" --workers 4 \
        --no-progress $(resume_flag dit) ${MG_DIT_ARGS:-} ;;
    distill)
      cli train distill --data "$WORK/runs/encode" --init "$WORK/runs/dit/model" --out "$WORK/runs" \
        --minutes "$minutes" --batch-size "${MG_DISTILL_BATCH:-8}" --steps "${MG_DISTILL_STEPS:-600}" --workers 4 \
        --no-progress $(resume_flag distill) ${MG_DISTILL_ARGS:-} ;;
    reward)
      cli train reward --data "$WORK/runs/encode" --init "${MG_REWARD_INIT:-$WORK/runs/distill/model}" \
        --out "$WORK/runs" --minutes "$minutes" --no-progress $(resume_flag reward) ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
  if [ -n "$OUT" ] && [ -d "$WORK/runs/$stage/model" ]; then
    rm -rf "$OUT/$stage" && mkdir -p "$OUT/$stage"
    cp "$WORK/runs/$stage/model/"* "$OUT/$stage/" 2>/dev/null || true
    tail -n 3 "$WORK/runs/$stage/log.jsonl" > "$OUT/$stage/log_tail.jsonl" 2>/dev/null || true
  fi
done
