#!/usr/bin/env bash
# One self-contained training round on a fresh GPU machine: record, encode with the shipped VAE, continue the
# diffusion-forcing DiT from models/doom-small, distill it, train the reward head, and bundle the results into
# $OUT as <=15 MiB pieces (join with `cat bundle.tar.part* | tar x`).
set -eo pipefail
cd "$(dirname "$0")/.."
export MG_WORK=${MG_WORK:-/tmp/mg} PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
RESULTS=${OUT:-/tmp/out}; unset OUT
bash scripts/device_pipeline.sh setup "record:${MG_RECORD_MINUTES:-90}"
python3 -m matrixgame_env.cli train encode --data "$MG_WORK/data" --init models/doom-small --out "$MG_WORK/runs" \
  --workers 8 --no-progress --minutes 3
MG_DIT_INIT=models/doom-small bash scripts/device_pipeline.sh "dit:${MG_DIT_MINUTES:-3}" \
  "distill:${MG_DISTILL_MINUTES:-3.5}" "reward:${MG_REWARD_MINUTES:-0.8}" || echo "pipeline stopped: $?"
mkdir -p /tmp/pack
for stage in dit distill reward; do
  if [ -d "$MG_WORK/runs/$stage/model" ]; then
    python3 scripts/pack_model.py "$MG_WORK/runs/$stage/model" "/tmp/pack/$stage" --piece-mib 1000
    cp "$MG_WORK/runs/$stage/log.jsonl" "/tmp/pack/$stage/" 2>/dev/null || true
  fi
done
cp "$MG_WORK/runs/encode/manifest.json" /tmp/pack/ 2>/dev/null || true
tar cf - -C /tmp pack | split -b 15M - "$RESULTS/bundle.tar.part"
ls -la "$RESULTS"
