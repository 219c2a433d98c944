#!/usr/bin/env bash
# One training round of doom-small on a GPU machine, in three calls of under 10 minutes each made back to back
# (the machine stays warm between them, so /tmp/mg carries over):
#   bash scripts/device_train_round.sh 1   # setup, record 90 minutes, encode with the shipped VAE, start the DiT
#   bash scripts/device_train_round.sh 2   # continue the DiT (--resume) to the end of its schedule
#   bash scripts/device_train_round.sh 3   # [distill,] reward head, eval, and the results as pieces in $OUT
# The DiT continues from models/doom-small (MG_DIT_INIT) for MG_DIT_STEPS steps at batch 128 with the action
# modules at 10x; MG_DISTILL_MINUTES > 0 adds a distillation before the reward head. Join the pieces here with
# `cat bundle.tar.part* | tar x` and `python scripts/pack_model.py --unpack pack/reward NEW_MODEL_DIR`.
set -eo pipefail
cd "$(dirname "$0")/.."
export MG_WORK=${MG_WORK:-/tmp/mg} PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export MG_DIT_INIT=${MG_DIT_INIT:-models/doom-small} MG_DIT_BATCH=${MG_DIT_BATCH:-128}
export MG_DIT_STEPS=${MG_DIT_STEPS:-3000} MG_ENCODE_INIT=${MG_ENCODE_INIT:-models/doom-small}
export MG_DIT_ARGS=${MG_DIT_ARGS:---compile --lr 1.5e-4 --warmup-steps 200 --action-lr-mult 10 --log-every 50}
pipeline() { bash scripts/device_pipeline.sh "$@"; }
case ${1:-} in
  1) pipeline setup "record:${MG_RECORD_MINUTES:-90}" encode:3 "dit:${MG_DIT_MINUTES:-5.5}" ;;
  2) pipeline "dit:${MG_DIT_MINUTES:-8.6}" ;;
  3)
    if [ "${MG_DISTILL_MINUTES:-0}" != 0 ]; then
      pipeline "distill:$MG_DISTILL_MINUTES"
      export MG_REWARD_INIT=$MG_WORK/runs/distill/model
    else
      export MG_REWARD_INIT=$MG_WORK/runs/dit/model
    fi
    pipeline "reward:${MG_REWARD_MINUTES:-1.2}" eval pack ;;
  *) echo "usage: bash scripts/device_train_round.sh 1|2|3" >&2; exit 2 ;;
esac
