#!/usr/bin/env bash
# Evaluates the bundled model at several action-guidance scales on a GPU machine, results in $OUT:
#   bash scripts/device_guidance_sweep.sh 1 1.5 3
#   MG_KEYBOARD_GUIDANCE=4 bash scripts/device_guidance_sweep.sh 1 2   # keyboard at 4, the mouse at each scale
# Records the (seeded, so always identical) 90-minute recording unless $MG_WORK/data holds it, then runs
# `matrixgame-env eval` per scale on its held-out episodes (32 clips of 4 s, judged by the shipped IDM, no
# drift rollout: MG_DRIFT_MINUTES) and writes $OUT/eval_g<scale>.json after each, so a cut-short call keeps
# what finished. With MG_KEYBOARD_GUIDANCE set, every run also gets --keyboard-guidance $MG_KEYBOARD_GUIDANCE
# (a separate keyboard scale) and its outputs are named eval_g<scale>_k<kscale> (.json, .log, folder).
set -eo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder that receives the results}"
export MG_WORK=${MG_WORK:-/tmp/mg} PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
[ -f "$MG_WORK/data/manifest.json" ] || bash scripts/device_pipeline.sh setup record:90
keyboard=()
[ -n "${MG_KEYBOARD_GUIDANCE:-}" ] && keyboard=(--keyboard-guidance "$MG_KEYBOARD_GUIDANCE")
for scale in "$@"; do
  name="eval_g$scale${MG_KEYBOARD_GUIDANCE:+_k$MG_KEYBOARD_GUIDANCE}"
  python3 -m matrixgame_env.cli eval --model "${MG_EVAL_MODEL:-models/doom-small}" --data "$MG_WORK/data" \
    --out "$MG_WORK/$name" --clips 32 --horizon-s 4 --drift-minutes "${MG_DRIFT_MINUTES:-0}" \
    --idm models/doom-small/eval/idm --action-guidance "$scale" "${keyboard[@]}" --no-progress \
    > "$MG_WORK/$name.log" 2>&1 || { tail -n 20 "$MG_WORK/$name.log"; exit 1; }
  grep -E "fidelity at 1s|on generated" "$MG_WORK/$name.log" || true
  cp "$MG_WORK/$name/eval.json" "$OUT/$name.json"
done
