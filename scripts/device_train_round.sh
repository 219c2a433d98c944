#!/usr/bin/env bash
# One training round of doom-small on a GPU machine, in three calls of under 10 minutes each made back to back
# (the machine stays warm between them, so /tmp/mg carries over):
#   bash scripts/device_train_round.sh 1   # setup, record 90 minutes, encode with the shipped VAE, start the DiT
#   bash scripts/device_train_round.sh 2   # continue the DiT (--resume) to the end of its schedule
#   bash scripts/device_train_round.sh 3   # [distill,] reward head, eval, and the results as pieces in $OUT
# The DiT continues from models/doom-small (MG_DIT_INIT) for MG_DIT_STEPS steps at batch 128 with the action
# modules at 10x; MG_DISTILL_MINUTES > 0 adds a distillation before the reward head. MG_VAE_MINUTES > 0 runs the
# vae stage (MG_VAE_ARGS, e.g. a --decoder-only retrain from models/doom-small) beside the DiT in round 1; round 3
# then evaluates the new DiT with that VAE (valid only while the latent space stays the same).
# MG_CALL_SECONDS (e.g. 570) lets rounds 1 and 2 give the DiT whatever is left of the call after the other stages;
# MG_BESIDE_DISTILL=1 runs a distillation from MG_DISTILL_INIT (default models/doom-small) beside the DiT in rounds 1
# and 2, for as long as the DiT (settings: MG_DISTILL_ARGS, MG_DISTILL_BATCH, MG_DISTILL_STEPS).
# MG_REWARD_MINUTES=0 keeps the init model's reward head (it reads VAE latents, so it stays valid while the VAE
# does) and evaluates and packs the DiT (or distilled) model itself.
# MG_START_VAE=FOLDER (config.json + vae.safetensors, e.g. a VAE trained by scripts/device_vae_widths.sh and carried
# along) starts over on a new latent space: round 1 assembles $MG_WORK/start from that VAE, the image encoder of
# MG_START_CLIP (default models/doom-small) and a placeholder DiT (scripts/assemble_model.py), encodes the recording
# with it and trains a DiT from scratch (every round then uses $MG_WORK/start as the init). The shipped DiT and VAE
# are not needed then: leave them out of the working tree to make room for the carried VAE. Pack the DiT after the
# last round with `MG_PACK_MODELS=dit bash scripts/device_pipeline.sh pack`.
# Join the pieces here with `cat bundle.tar.part* | tar x` and
# `python scripts/pack_model.py --unpack pack/STAGE NEW_MODEL_DIR` (STAGE: reward, or dit/distill with MG_REWARD_MINUTES=0).
set -eo pipefail
cd "$(dirname "$0")/.."
export MG_WORK=${MG_WORK:-/tmp/mg} PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
if [ -n "${MG_START_VAE:-}" ]; then export MG_DIT_INIT=$MG_WORK/start MG_ENCODE_INIT=$MG_WORK/start; fi
export MG_DIT_INIT=${MG_DIT_INIT:-models/doom-small} MG_DIT_BATCH=${MG_DIT_BATCH:-128}
export MG_DIT_STEPS=${MG_DIT_STEPS:-3000} MG_ENCODE_INIT=${MG_ENCODE_INIT:-models/doom-small}
export MG_DIT_ARGS=${MG_DIT_ARGS:---compile --lr 1.5e-4 --warmup-steps 200 --action-lr-mult 10 --log-every 50}
pipeline() { bash scripts/device_pipeline.sh "$@"; }
started=$(date +%s)
dit_minutes() {  # $1: the default; with MG_CALL_SECONDS, the minutes left of the call
  if [ -n "${MG_DIT_MINUTES:-}" ]; then echo "$MG_DIT_MINUTES"
  elif [ -n "${MG_CALL_SECONDS:-}" ]; then
    python3 -c "print(round(($MG_CALL_SECONDS - ($(date +%s) - $started)) / 60, 2))"
  else echo "$1"; fi
}
dit_beside_distill() {  # $1: minutes; the DiT stage, with a distillation beside it when MG_BESIDE_DISTILL=1
  if [ "${MG_BESIDE_DISTILL:-0}" = 1 ]; then  # the two share the GPU and its CPU cores
    MG_DISTILL_INIT=${MG_DISTILL_INIT:-models/doom-small} pipeline "distill:$1" > "$MG_WORK/distill_stage.txt" 2>&1 &
    distill_stage=$!
  fi
  pipeline "dit:$1"
  if [ -n "${distill_stage:-}" ]; then
    wait "$distill_stage" || echo "the distill stage failed"
    tail -n 8 "$MG_WORK/distill_stage.txt"
  fi
}
case ${1:-} in
  1)
    pipeline setup  # first: the package needs the installed wheels
    if [ -n "${MG_START_VAE:-}" ] && [ ! -f "$MG_WORK/start/config.json" ]; then
      python3 scripts/assemble_model.py "$MG_WORK/start" --vae "$MG_START_VAE" --clip "${MG_START_CLIP:-models/doom-small}"
    fi
    pipeline "record:${MG_RECORD_MINUTES:-90}" encode:3
    if [ "${MG_VAE_MINUTES:-0}" != 0 ]; then  # the vae stage shares the GPU with the DiT (both are small)
      pipeline "vae:$MG_VAE_MINUTES" > "$MG_WORK/vae_stage.txt" 2>&1 &
      vae_stage=$!
    fi
    dit_beside_distill "$(dit_minutes 5.5)"
    if [ -n "${vae_stage:-}" ]; then
      wait "$vae_stage" || echo "the vae stage failed"
      tail -n 5 "$MG_WORK/vae_stage.txt"
    fi ;;
  2) dit_beside_distill "$(dit_minutes 8.6)" ;;
  3)
    last=dit
    if [ "${MG_DISTILL_MINUTES:-0}" != 0 ]; then
      pipeline "distill:$MG_DISTILL_MINUTES"
      last=distill
    fi
    if [ "${MG_REWARD_MINUTES:-1.2}" != 0 ]; then
      MG_REWARD_INIT=$MG_WORK/runs/$last/model pipeline "reward:${MG_REWARD_MINUTES:-1.2}"
      last=reward
    fi
    if [ -f "$MG_WORK/runs/vae/model/vae.safetensors" ]; then  # a decoder retrained by round 1 (--decoder-only)
      cp "$MG_WORK/runs/vae/model/vae.safetensors" "$MG_WORK/runs/$last/model/vae.safetensors"
    fi
    MG_EVAL_MODEL=$MG_WORK/runs/$last/model MG_PACK_MODELS=$last pipeline eval pack ;;
  *) echo "usage: bash scripts/device_train_round.sh 1|2|3" >&2; exit 2 ;;
esac
