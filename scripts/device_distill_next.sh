#!/usr/bin/env bash
# One call on a GPU machine that distils the next doom-small (models/next: the VAE trained with the motion loss and
# the DiT mapped onto its latents) the way the bundled student was made, and brings the result back in $OUT:
#   assemble the next model, record 90 minutes and encode them with its VAE, the self-forcing distillation
#   (teacher guidance 1.5, the bundled recipe), then the reward head beside `eval` of the student
#   (drift over MG_DRIFT_MINUTES, default 10), and `pack` (the student with its reward head, logs, eval).
# MG_CALL_SECONDS (default 570) bounds the call: the distillation gets what the other stages leave
# (MG_EVAL_SECONDS, default 250, are kept for the eval and 20 for packing); the eval is cut, not the pack, when time
# runs out. Join the pieces here with `cat bundle.tar.part* | tar x` and
# `python scripts/pack_model.py --unpack pack/reward NEW_MODEL_DIR`.
set -eo pipefail
cd "$(dirname "$0")/.."
export MG_WORK=${MG_WORK:-/tmp/mg} PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
pipeline() { bash scripts/device_pipeline.sh "$@"; }
started=$(date +%s)
budget=${MG_CALL_SECONDS:-570}
eval_seconds=${MG_EVAL_SECONDS:-250}
left() { echo $((budget - ($(date +%s) - started))); }
next=$MG_WORK/next
pipeline setup next "record:${MG_RECORD_MINUTES:-90}"
MG_ENCODE_INIT=$next pipeline encode:3
distill_minutes=$(python3 -c "print(round(($(left) - $eval_seconds - 20) / 60, 2))")
export MG_DISTILL_BATCH=${MG_DISTILL_BATCH:-16} MG_DISTILL_STEPS=${MG_DISTILL_STEPS:-300}
export MG_DISTILL_ARGS=${MG_DISTILL_ARGS:---critic-steps 5 --lr 2e-5 --action-lr-mult 10 --guidance 1.5 --data-weight 0.25}
MG_DISTILL_INIT=$next pipeline "distill:$distill_minutes"
student=$MG_WORK/runs/distill/model
MG_REWARD_INIT=$student pipeline reward:1 > "$MG_WORK/reward_stage.txt" 2>&1 &  # small: it shares the GPU
reward_stage=$!
MG_EVAL_MODEL=$student timeout "$(($(left) - 20))" bash scripts/device_pipeline.sh eval || echo "eval stopped: $?"
wait "$reward_stage" || echo "the reward stage failed"
tail -n 5 "$MG_WORK/reward_stage.txt"
MG_PACK_MODELS=reward pipeline pack
