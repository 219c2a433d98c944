#!/usr/bin/env bash
# Two back-to-back calls on a warm GPU machine that finish the next doom-small (models/next: the VAE
# trained with the motion loss and the DiT mapped onto its latents) and bring it back in $OUT.
#   bash scripts/device_next_model.sh train    # assemble, record 90 minutes, encode; then, side by side,
#                                               # the self-forcing distillation (the bundled recipe) and the
#                                               # decoder's adversarial fine-tune (frozen encoder); pack both
#   bash scripts/device_next_model.sh finish   # the new decoder into the student and into the teacher (sampled
#                                               # at action guidance 2); the reward head beside `eval` of both
#                                               # (drift over MG_DRIFT_MINUTES, default 10; MG_TEACHER_EVAL=0:
#                                               # the student alone); pack
#   bash scripts/device_next_model.sh decoders # assemble, record; then side by side two adversarial fine-tunes of
#                                               # the decoder, the discriminator judging single frames (--disc-frames 1)
#                                               # and pairs of consecutive frames (2)
#   bash scripts/device_next_model.sh judge    # each decoder in the teacher, `eval` of both without drift (the
#                                               # VAE round trip read by the IDM, fidelity); both decoders and
#                                               # reports in $OUT
#   bash scripts/device_next_model.sh distill  # assemble, record and encode (once per machine), then the
#                                               # self-forcing distillation alone for the rest of the call, toward
#                                               # MG_DISTILL_STEPS (default 300); again on the warm machine resumes
#   bash scripts/device_next_model.sh student  # `eval` of the distilled student through the next VAE's own
#                                               # decoder (drift over MG_DRIFT_MINUTES); student and eval packed
#   bash scripts/device_next_model.sh adapt    # after train and distill: the train call's adversarial decoder taught
#                                               # the student's latents (`train vae --generated-from`, anchor to the
#                                               # student's own decoder: MG_ANCHOR_WEIGHT, default 5), then `eval` of
#                                               # the student through it; decoder, logs and eval in $OUT (adapted.tar.part*;
#                                               # MG_ADAPT_TAG=anchor2 MG_ANCHOR_WEIGHT=2: another run, anchor2.tar.part*;
#                                               # MG_ADAPT_MOTION=1: with a loss on frame-to-frame change;
#                                               # MG_ADAPT_GAN_WEIGHT=0: no adversary, so the recording alone (default 0.1);
#                                               # MG_ADAPT_LR: the learning rate (default 5e-5);
#                                               # MG_ADAPT_JUDGE=IDM: against a second judge (--action-judge);
#                                               # MG_ADAPT_ARGS: more `train vae` options (e.g. --reference-weight 5);
#                                               # the student's DiT (bfloat16) and distillation log come along, in student/;
#                                               # MG_ADAPT_FROM=DIR: a student and a decoder carried in instead, after
#                                               # `setup next record` on a fresh machine (DIR=models/doom-small: the
#                                               # shipped DiT and decoder); MG_ADAPT_EVAL=0: no eval)
#   bash scripts/device_next_model.sh complete # after adapt (same MG_ADAPT_TAG): `eval` of its student and decoder beside
#                                               # encoding the recording and the reward head's training on its latents;
#                                               # eval, head and logs in $OUT (<tag>_complete.tar.part*)
#   bash scripts/device_next_model.sh whole    # the action judge on the whole VAE (encoder too) from the shipped
#                                               # model's, side by side at reference weights $MG_WHOLE_REFERENCES
#                                               # (default "5 2"); then the round trips of the shipped VAE and of each,
#                                               # judged by the eval IDM (scripts/compare_decoders.py); VAEs, logs and
#                                               # the comparison in $OUT (whole.tar.part*); MG_WHOLE_ARGS: more
#                                               # `train vae` options for both (e.g. --no-sample)
# The student of 300 steps with the adversarial decoder: `train`, `distill` (resumes the distillation to its
# 300 steps; again if the call ends first), then `MG_TEACHER_EVAL=0 ... finish`, on one warm machine.
# MG_CALL_SECONDS (default 585) bounds the train call: both trainings get what recording and packing leave.
# `finish` needs the train call's work folder ($MG_WORK, default /tmp/mg), so it must follow it on the same
# machine. Join the pieces here with `cat bundle.tar.part* | tar x`; `python scripts/pack_model.py --unpack`.
set -eo pipefail
cd "$(dirname "$0")/.."
export MG_WORK=${MG_WORK:-/tmp/mg} PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
pipeline() { bash scripts/device_pipeline.sh "$@"; }
started=$(date +%s)
left() { echo $((${MG_CALL_SECONDS:-585} - ($(date +%s) - started))); }
next=$MG_WORK/next
student=$MG_WORK/runs/distill/model
decoder=$MG_WORK/runs/vae/model/vae.safetensors
pairs=${MG_WORK}_pairs  # the work folder of the decoder whose discriminator judges pairs of frames
record_and_encode() {  # once per machine: the recording and its latents under the next VAE
  if [ ! -d "$MG_WORK/runs/encode" ]; then
    pipeline "record:${MG_RECORD_MINUTES:-90}"
    MG_ENCODE_INIT=$next pipeline encode:3
  fi
}
copy_eval() {  # an eval folder $1 to $2 without the IDM's checkpoints (the IDM's weights travel as safetensors)
  if [ -d "$1" ]; then cp -r "$1" "$2" && rm -f "$2"/idm/*.pt; fi
}
bundle() {  # /tmp/$1 into $OUT as <=15 MiB pieces ($1.tar.part*; join here with `cat $1.tar.part* | tar x`)
  tar cf - -C /tmp "$1" | split -b 15M - "$OUT/$1.tar.part" && ls -la "$OUT"
}
adopt_carried() {  # $1/student/{config.json,dit.safetensors} (the distilled student) and $1/vae.safetensors (its
  # decoder's starting point), carried in, take the places of the train and distill calls' results; a model folder
  # such as models/doom-small (config.json, dit.safetensors and vae.safetensors side by side) serves as well
  [ -f "$next/config.json" ] || { echo "run \`setup next record\` first, on this machine" >&2; exit 2; }
  local from=$1/student; [ -d "$from" ] || from=$1
  for f in "$from/config.json" "$from/dit.safetensors" "$1/vae.safetensors"; do
    [ -f "$f" ] || { echo "MG_ADAPT_FROM: $f is missing (give a folder with student/ and vae.safetensors, or a model folder)" >&2; exit 2; }
  done
  [ -d "$student" ] && echo "MG_ADAPT_FROM: the carried student replaces the distilled one in $student"
  rm -rf "$student" && mkdir -p "$(dirname "$student")" "$(dirname "$decoder")"
  cp -r "$next" "$student" && cp "$from/config.json" "$from/dit.safetensors" "$student/"
  cp "$1/vae.safetensors" "$decoder"
}
distill_recipe="--critic-steps 5 --lr 2e-5 --action-lr-mult 10 --guidance 1.5 --data-weight 0.25"  # the bundled student's recipe
# MG_ACTION_WEIGHT > 0 adds the latent action reader's loss (`train distill --action-weight`) to that recipe.
# MG_ACTION_READER: a reader packed by an earlier run (on the same seeded recording) instead of training one.
if [ -n "${MG_ACTION_WEIGHT:-}" ]; then distill_recipe="$distill_recipe --action-weight $MG_ACTION_WEIGHT"; fi
if [ -n "${MG_ACTION_READER:-}" ]; then distill_recipe="$distill_recipe --action-reader $MG_ACTION_READER"; fi
# MG_ACTION_READER_FRAMES=4: the reader trained here names each video frame's keys (`--action-reader-frames 4`).
if [ -n "${MG_ACTION_READER_FRAMES:-}" ]; then
  distill_recipe="$distill_recipe --action-reader-frames $MG_ACTION_READER_FRAMES"
fi
case ${1:?give train, finish, decoders, judge, distill, student, adapt, complete or whole} in
  train)
    pipeline setup next
    record_and_encode
    minutes=$(python3 -c "print(round(($(left) - 45) / 60, 2))")
    MG_VAE_STEPS=2500 MG_VAE_ARGS="--init $next --decoder-only --lr 5e-5 --warmup-steps 50 --clip-frames 9 \
      --latent-noise 0.05 --edge-weight 0.5 --gan-weight 0.1 --gan-start 100" \
      pipeline "vae:$minutes" > "$MG_WORK/vae_stage.txt" 2>&1 &
    vae_stage=$!
    MG_DISTILL_INIT=$next MG_DISTILL_BATCH=16 MG_DISTILL_STEPS=300 \
      MG_DISTILL_ARGS="$distill_recipe" \
      pipeline "distill:$minutes"
    wait "$vae_stage" || echo "the decoder stage failed"
    tail -n 4 "$MG_WORK/vae_stage.txt"
    MG_PACK_MODELS=distill pipeline pack ;;
  finish)
    [ -f "$decoder" ] && [ -d "$student" ] || { echo "run the train call first, on this machine" >&2; exit 2; }
    cp "$decoder" "$student/vae.safetensors"
    MG_REWARD_INIT=$student pipeline reward:3 > "$MG_WORK/reward_stage.txt" 2>&1 &
    reward_stage=$!
    teacher_eval=""
    if [ "${MG_TEACHER_EVAL:-1}" = 1 ]; then  # 0: the student alone (the teacher's row is known)
      teacher=$MG_WORK/teacher_g2
      rm -rf "$teacher" && cp -r "$next" "$teacher" && cp "$decoder" "$teacher/vae.safetensors"
      python3 - "$teacher/config.json" <<'EOF'
import json, sys
path = sys.argv[1]
config = json.load(open(path))
config["sampler"]["action_guidance"] = 2.0
json.dump(config, open(path, "w"), indent=2)
EOF
      MG_EVAL_MODEL=$teacher MG_EVAL_OUT=$MG_WORK/eval_teacher_g2 pipeline eval > "$MG_WORK/eval_teacher.txt" 2>&1 &
      teacher_eval=$!
    fi
    MG_EVAL_MODEL=$student MG_EVAL_OUT=$MG_WORK/eval_student pipeline eval || echo "student eval failed: $?"
    if [ -n "$teacher_eval" ]; then
      wait "$teacher_eval" || echo "teacher eval failed"
      grep -E "fidelity at 1s|IDM on generated|drift|target" "$MG_WORK/eval_teacher.txt" || true
    fi
    wait "$reward_stage" || echo "the reward stage failed"
    tail -n 3 "$MG_WORK/reward_stage.txt"
    # The reward stage's folder holds the student (with the new decoder) and its head; without it, the student alone.
    packed=reward; [ -d "$MG_WORK/runs/reward/model" ] || packed=distill
    MG_PACK_MODELS=$packed pipeline pack ;;
  decoders)
    pipeline setup next "record:${MG_RECORD_MINUTES:-90}"
    rm -rf "$pairs" && mkdir -p "$pairs" && ln -s "$MG_WORK/data" "$pairs/data"
    minutes=$(python3 -c "print(round(($(left) - 30) / 60, 2))")
    recipe="--init $next --decoder-only --lr 5e-5 --warmup-steps 50 --clip-frames 9 --latent-noise 0.05 \
      --edge-weight 0.5 --gan-weight 0.1 --gan-start 100"
    MG_WORK=$pairs MG_VAE_STEPS=2500 MG_VAE_ARGS="$recipe --disc-frames 2" pipeline "vae:$minutes" \
      > "$pairs/vae_stage.txt" 2>&1 &
    second=$!
    MG_VAE_STEPS=2500 MG_VAE_ARGS="$recipe --disc-frames 1" pipeline "vae:$minutes"
    wait "$second" || echo "the two-frame decoder stage failed"
    tail -n 4 "$pairs/vae_stage.txt" ;;
  judge)
    [ -f "$decoder" ] && [ -f "$pairs/runs/vae/model/vae.safetensors" ] || { echo "run the decoders call first" >&2; exit 2; }
    rm -rf /tmp/judged && mkdir -p /tmp/judged
    evals=()
    for frames in 1 2; do
      made=$decoder; [ "$frames" = 2 ] && made=$pairs/runs/vae/model/vae.safetensors
      teacher=$MG_WORK/teacher_k$frames
      rm -rf "$teacher" && cp -r "$next" "$teacher" && cp "$made" "$teacher/vae.safetensors"
      mkdir -p "/tmp/judged/k$frames"
      cp "$made" "$(dirname "$made")"/../{log.jsonl,result.json} "/tmp/judged/k$frames/" 2>/dev/null || true
      MG_EVAL_MODEL=$teacher MG_EVAL_OUT=$MG_WORK/eval_k$frames MG_DRIFT_MINUTES=0 pipeline eval \
        > "$MG_WORK/eval_k$frames.txt" 2>&1 &
      evals+=($!)
    done
    for frames in 1 2; do
      echo "--- discriminator over $frames frame(s)"
      if wait "${evals[$((frames - 1))]}"; then
        grep -E "fidelity at 1s|IDM|round trip" "$MG_WORK/eval_k$frames.txt" || true
        copy_eval "$MG_WORK/eval_k$frames" "/tmp/judged/k$frames/eval"
      else
        echo "its eval failed:"; tail -n 3 "$MG_WORK/eval_k$frames.txt"
      fi
    done
    bundle judged ;;
  distill)
    pipeline setup next
    record_and_encode
    minutes=$(python3 -c "print(round(($(left) - 20) / 60, 2))")
    MG_DISTILL_INIT=$next MG_DISTILL_BATCH=16 MG_DISTILL_STEPS=${MG_DISTILL_STEPS:-300} \
      MG_DISTILL_ARGS="$distill_recipe" \
      pipeline "distill:$minutes"
    tail -n 2 "$MG_WORK/runs/distill/log.jsonl" ;;
  student)
    [ -d "$student" ] || { echo "run the distill call first, on this machine" >&2; exit 2; }
    MG_EVAL_MODEL=$student MG_EVAL_OUT=$MG_WORK/eval_student pipeline eval
    MG_PACK_MODELS=distill pipeline pack ;;
  adapt)
    if [ -n "${MG_ADAPT_FROM:-}" ]; then adopt_carried "$MG_ADAPT_FROM"; fi
    [ -f "$decoder" ] && [ -d "$student" ] || { echo "run the train and distill calls first, on this machine" >&2; exit 2; }
    sharp=$MG_WORK/student_sharp  # the student with the train call's adversarial decoder: where the decoder starts
    rm -rf "$sharp" && cp -r "$student" "$sharp" && cp "$decoder" "$sharp/vae.safetensors"
    tag=${MG_ADAPT_TAG:-adapted}  # another tag, another run (e.g. a second anchor weight on the same machine)
    adapted=$MG_WORK/runs_$tag
    resume=""; [ -d "$adapted/vae/checkpoints" ] && resume=--resume
    minutes=$(python3 -c "print(round(($(left) - ${MG_ADAPT_EVAL_SECONDS:-200}) / 60, 2))")
    # MG_ADAPT_MOTION=W: a loss on the frame-to-frame change of the reconstructed clips (`--motion-weight W`),
    # against the sharpened decoder's still frames that the judge reads as walking
    motion=(); [ -n "${MG_ADAPT_MOTION:-}" ] && motion=(--motion-weight "$MG_ADAPT_MOTION")
    # MG_ADAPT_JUDGE=IDM: a frozen second judge's loss on the decoded clips (`--action-judge`, weight
    # MG_ADAPT_JUDGE_WEIGHT, default 0.1), e.g. models/next/action-judge-w24
    [ -n "${MG_ADAPT_JUDGE:-}" ] && motion+=(--action-judge "$MG_ADAPT_JUDGE" --action-weight "${MG_ADAPT_JUDGE_WEIGHT:-0.1}")
    # the student's latents are judged by the adversary alone (and anchored): without one (MG_ADAPT_GAN_WEIGHT=0)
    # the decoder learns from the recording's clips only
    gan=${MG_ADAPT_GAN_WEIGHT:-0.1}
    generated=(--gan-weight 0)
    case $gan in 0|0.0|0.00) ;; *)
      generated=(--generated-from "$student" --gan-weight "$gan" --disc-start 0 --gan-start "${MG_ADAPT_GAN_START:-200}"
        --anchor-weight "${MG_ANCHOR_WEIGHT:-5}" --generated-clips "${MG_ADAPT_CLIPS:-256}" --generated-blocks 4) ;;
    esac
    python3 -m matrixgame_env.cli train vae --data "$MG_WORK/data" --init "$sharp" --decoder-only "${motion[@]}" \
      "${generated[@]}" --lr "${MG_ADAPT_LR:-5e-5}" --warmup-steps 50 --clip-frames 9 --latent-noise 0.05 \
      --edge-weight 0.5 --batch-size "${MG_ADAPT_BATCH:-16}" --steps "${MG_ADAPT_STEPS:-2000}" \
      --workers 8 --minutes "$minutes" --out "$adapted" --no-progress $resume ${MG_ADAPT_ARGS:-}
    if [ "${MG_ADAPT_EVAL:-1}" = 1 ]; then
      MG_EVAL_MODEL=$adapted/vae/model MG_EVAL_OUT=$MG_WORK/eval_$tag pipeline eval || echo "its eval failed: $?"
    fi
    rm -rf "/tmp/$tag" && mkdir -p "/tmp/$tag"
    cp "$adapted"/vae/log.jsonl "$adapted"/vae/result.json "$adapted"/vae/model/vae.safetensors \
      "$adapted"/vae/model/config.json "/tmp/$tag/"
    copy_eval "$MG_WORK/eval_$tag" "/tmp/$tag/eval"
    # the student itself (its DiT in bfloat16, as shipped, and config), so that the pair can ship; in float32
    # it would push the whole past $OUT's 64 MiB; MG_ADAPT_STUDENT=0 leaves it behind
    if [ "${MG_ADAPT_STUDENT:-1}" = 1 ]; then
      mkdir -p "/tmp/$tag/student" && cp "$student"/config.json "/tmp/$tag/student/"
      python3 scripts/pack_model.py --cast "$student/dit.safetensors" "/tmp/$tag/student/dit.safetensors"
      cp "$MG_WORK"/runs/distill/{log.jsonl,result.json} "/tmp/$tag/student/" 2>/dev/null || true
    fi
    bundle "$tag" ;;
  complete)
    tag=${MG_ADAPT_TAG:-adapted}
    model=$MG_WORK/runs_$tag/vae/model
    [ -d "$model" ] || { echo "run adapt (MG_ADAPT_TAG=$tag) first, on this machine" >&2; exit 2; }
    # the reward head reads the encoder's latents, which the decoder-only stages leave as they were
    ( record_and_encode && MG_REWARD_INIT=$model pipeline reward:3 ) > "$MG_WORK/reward_stage.txt" 2>&1 &
    reward_stage=$!
    MG_EVAL_MODEL=$model MG_EVAL_OUT=$MG_WORK/eval_$tag pipeline eval || echo "its eval failed: $?"
    wait "$reward_stage" || echo "the encode or reward stage failed"
    tail -n 3 "$MG_WORK/reward_stage.txt"
    done_dir=/tmp/${tag}_complete
    rm -rf "$done_dir" && mkdir -p "$done_dir/reward"
    copy_eval "$MG_WORK/eval_$tag" "$done_dir/eval"
    cp "$MG_WORK"/runs/reward/model/{reward_head.safetensors,config.json} "$MG_WORK"/runs/reward/{log.jsonl,result.json} \
      "$done_dir/reward/" 2>/dev/null || true
    bundle "${tag}_complete" ;;
  whole)
    pipeline setup
    [ -d "$MG_WORK/data" ] || pipeline "record:${MG_RECORD_MINUTES:-90}"
    references=${MG_WHOLE_REFERENCES:-5 2}
    minutes=$(python3 -c "print(round(($(left) - 120) / 60, 2))")
    for r in $references; do  # one GPU shared: each run gets about half of it
      python3 -m matrixgame_env.cli train vae --data "$MG_WORK/data" --init models/doom-small --out "$MG_WORK/whole_ref$r" \
        --minutes "$minutes" --finish-minutes 0.6 --action-judge models/next/action-judge-w24 --action-weight 1 \
        --reference-weight "$r" --gan-weight 0 --lr 1e-4 --warmup-steps 50 --steps 1400 --clip-frames 9 \
        --edge-weight 0.5 --batch-size 16 --workers 6 --no-progress ${MG_WHOLE_ARGS:-} > "$MG_WORK/whole_ref$r.txt" 2>&1 &
    done
    wait || true
    rm -rf /tmp/whole && mkdir -p /tmp/whole
    models=()
    for r in $references; do
      run=$MG_WORK/whole_ref$r/vae; tail -n 2 "$MG_WORK/whole_ref$r.txt"
      [ -f "$run/model/vae.safetensors" ] || { echo "the run at reference $r left no model"; continue; }
      mkdir -p "/tmp/whole/ref$r" && models+=("$run/model")
      cp "$run/model/vae.safetensors" "$run/model/config.json" "$run/log.jsonl" "$run/result.json" "/tmp/whole/ref$r/"
    done
    python3 scripts/compare_decoders.py --data "$MG_WORK/data" models/doom-small "${models[@]}" --clips 64 --frames 33 \
      --device cuda --idm models/doom-small/eval/idm --out /tmp/whole/compare.json | tee /tmp/whole/compare.txt \
      || echo "the comparison failed: the VAEs come back without it"
    bundle whole ;;
  *) echo "unknown call $1 (train, finish, decoders, judge, distill, student, adapt, complete or whole)" >&2; exit 2 ;;
esac
