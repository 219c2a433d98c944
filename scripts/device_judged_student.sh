#!/usr/bin/env bash
# The shipped student taken further by self-forcing with a judge of decoded pixels in its update
# (`train distill --pixel-judge`), beside the same continuation without that judge, on one GPU at once.
# Three calls on one warm machine, so that no call carries more than the travel limit:
#   bash scripts/device_judged_student.sh prepare  # carry .whl and the shipped weights: setup, record 90 minutes,
#                                                  # encode with the shipped VAE, keep the shipped model in $MG_WORK
#   bash scripts/device_judged_student.sh train    # carry the teacher's DiT (models/next/dit-mapped-motion): every
#                                                  # variant of $MG_VARIANTS side by side for the rest of the call
#                                                  # (resumes on a second call); their DiTs packed as by eval, so
#                                                  # that eval can run on another machine if this one goes back
#   bash scripts/device_judged_student.sh eval     # `eval` of every variant (10 minutes of drift), side by side,
#                                                  # stopped at the call's end; the judged variants' DiTs (bfloat16;
#                                                  # the control's too if its eval did not finish; two at most) in
#                                                  # $OUT/judged.tar.part*
#   bash scripts/device_judged_student.sh both     # train, then eval, in one call (the training ~3.5 minutes shorter)
# The train, eval and both calls keep $OUT/logs.tar up to date every 15 s with the training logs and the eval reports
# written so far, so that a call cut short still brings back what it did.
# MG_VARIANTS (default "control judge1 floor1"): "control" continues with the release's recipe alone, "judgeW" adds the
# judge (models/next/action-judge-w24, not the IDM eval scores with) at weight W, "floorW" the same judge counted only
# above its reading of the recorded clips' round trip (--pixel-judge-floor). MG_STEPS (default 120) is the
# schedule's length, MG_LR (default 1e-5) its peak learning rate, MG_RECIPE the rest (default: the release's). Join the pieces here with
# `cat judged.tar.part* | tar x`.
set -eo pipefail
cd "$(dirname "$0")/.."
export MG_WORK=${MG_WORK:-/tmp/mg} PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
pipeline() { bash scripts/device_pipeline.sh "$@"; }
cli() { python3 -m matrixgame_env.cli "$@"; }
started=$(date +%s)
left() { echo $((${MG_CALL_SECONDS:-585} - ($(date +%s) - started))); }
shipped=$MG_WORK/shipped
teacher=$MG_WORK/teacher
variants=${MG_VARIANTS:-control judge1 floor1}
recipe=${MG_RECIPE:-"--batch-size 16 --critic-steps 5 --action-lr-mult 10 --guidance 1.5 --data-weight 0.25 --action-weight 1.0"}
model_folder() {  # a model folder $3 of model folder $1's config, VAE and image encoder with the DiT file $2
  mkdir -p "$3" && cp "$1"/{config.json,vae.safetensors,clip.safetensors} "$3/" && cp "$2" "$3/dit.safetensors"
}
variant_options() {  # the `train distill` options variant $1 adds to the recipe, or exit 2
  local weight=${1#judge}; [ "$weight" = "$1" ] && weight=${1#floor}
  if [ "$1" = control ]; then return; fi
  if [ "$weight" = "$1" ] || ! [[ $weight =~ ^[0-9]+(\.[0-9]+)?$ ]]; then
    echo "unknown variant $1 (control, judgeW or floorW)" >&2; exit 2
  fi
  echo "--pixel-judge models/next/action-judge-w24 --pixel-judge-weight $weight"
  [[ $1 == floor* ]] && echo "--pixel-judge-floor" || true
}
report=$MG_WORK/report  # logs and eval reports; `logs.tar` in $OUT holds its latest state
ship_report() {
  [ -d "$report" ] || return 0
  mkdir -p "$OUT" && tar cf "$OUT/logs.tmp" -C "$MG_WORK" report && mv "$OUT/logs.tmp" "$OUT/logs.tar"
}
keep_shipping() {  # $OUT/logs.tar refreshed every 15 s, so that a call cut short still brings back what was written
  while sleep 15; do ship_report 2>/dev/null || true; done &
  shipper=$!
  trap 'kill $shipper 2>/dev/null; ship_report' EXIT
}
train() {  # every variant side by side, for the call's time less $1 seconds
  [ -d "$MG_WORK/runs/encode" ] || { echo "run the prepare call first, on this machine" >&2; exit 2; }
  local minutes pids=() v out extra resume failed=0
  for v in $variants; do variant_options "$v" > /dev/null; done  # every name checked before anything starts
  [ -d "$teacher" ] || model_folder "$shipped" models/next/dit-mapped-motion/dit.safetensors "$teacher"
  minutes=$(python3 -c "print(round(($(left) - 25 - $1) / 60, 2))")
  mkdir -p "$report/earlier"
  for v in $variants; do  # an earlier call's eval reports score models this call trains further: set aside, so that
    for f in "$report/${v}"_{eval.json,eval.png,config.json}; do [ ! -f "$f" ] || mv "$f" "$report/earlier/"; done
  done  # the control's new DiT is packed (a control with a report is not)
  for v in $variants; do
    read -r -a extra <<< "$(variant_options "$v" | tr '\n' ' ')"
    out=$MG_WORK/cont_$v
    resume=(); [ -d "$out/distill/checkpoints" ] && resume=(--resume)
    cli train distill --data "$MG_WORK/runs/encode" --init "$shipped" --teacher "$teacher" --out "$out" \
      --minutes "$minutes" --steps "${MG_STEPS:-120}" --lr "${MG_LR:-1e-5}" --warmup-steps 10 --workers 3 \
      --check-clips 32 --no-progress $recipe "${extra[@]}" "${resume[@]}" > "$report/train_$v.txt" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || { echo "a variant failed"; failed=1; }; done
  for v in $variants; do
    tail -n 3 "$report/train_$v.txt"
    cp "$MG_WORK/cont_$v/distill/log.jsonl" "$report/${v}_log.jsonl" 2>/dev/null || true
    cp "$MG_WORK/cont_$v/distill/result.json" "$report/${v}_result.json" 2>/dev/null || true
  done
  return $failed
}
trained_variants() {  # the variants of $variants that have a trained model, one a line
  local v
  for v in $variants; do
    if [ -d "$MG_WORK/cont_$v/distill/model" ]; then echo "$v"; else echo "no model of $v: left out" >&2; fi
  done
}
pack() {  # the judged variants' DiTs of $@ (bfloat16, 24 MB each), then the control's if it has no eval report, in
  # $OUT/judged.tar.part*, so that an eval not run or cut short can be run elsewhere; two at most, what $OUT brings back
  local v packed=()
  for v in "$@"; do [ "$v" = control ] || packed+=("$v"); done
  [[ " $* " == *" control "* ]] && [ ! -f "$report/control_eval.json" ] && packed+=(control)
  rm -rf /tmp/judged && mkdir -p /tmp/judged "$OUT"
  for v in "${packed[@]:0:2}"; do
    python3 scripts/pack_model.py --cast "$MG_WORK/cont_$v/distill/model/dit.safetensors" "/tmp/judged/${v}_dit.safetensors"
  done
  tar cf - -C /tmp judged | split -b 15M - "$OUT/judged.tar.part" && ls -la "$OUT"
}
evaluate() {  # every trained variant's eval side by side, stopped at the call's end; reports and DiTs in $OUT
  local pids=() v trained budget
  mapfile -t trained < <(trained_variants)
  [ ${#trained[@]} -gt 0 ] || { echo "no variant has a model: run the train call first" >&2; exit 2; }
  budget=$(($(left) - ${MG_PACK_SECONDS:-30}))  # what is left of the call, less the packing
  [ "$budget" -gt 0 ] || { echo "no time left in this call to evaluate: call eval again" >&2; exit 2; }
  mkdir -p "$report"
  for v in "${trained[@]}"; do
    (  # each report joins $report as soon as it is written
      MG_EVAL_MODEL=$MG_WORK/cont_$v/distill/model MG_EVAL_OUT=$MG_WORK/eval_$v \
        timeout "$budget" bash scripts/device_pipeline.sh eval > "$report/eval_$v.txt" 2>&1 || exit 1
      for f in "eval_$v/eval.json" "eval_$v/eval.png" "cont_$v/distill/model/config.json"; do
        cp "$MG_WORK/$f" "$report/${v}_${f##*/}"
      done
    ) &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || echo "an eval failed or ran out of time"; done
  for v in "${trained[@]}"; do tail -n 2 "$report/eval_$v.txt"; done
  pack "${trained[@]}"
}
case ${1:?give prepare, train, eval or both} in
  prepare)
    pipeline setup "record:${MG_RECORD_MINUTES:-90}"
    model_folder models/doom-small models/doom-small/dit.safetensors "$shipped"
    cp models/doom-small/start_*.png "$shipped/"
    [ -d "$MG_WORK/runs/encode" ] || MG_ENCODE_INIT=$shipped pipeline encode:3
    du -sh "$MG_WORK"/* ;;
  train) keep_shipping; train "${MG_PACK_SECONDS:-30}" || echo "packing the variants that finished"
    mapfile -t finished < <(trained_variants)
    if [ ${#finished[@]} -gt 0 ]; then pack "${finished[@]}"; else echo "no variant has a model" >&2; exit 1; fi ;;
  eval) keep_shipping; evaluate ;;
  both) keep_shipping; train "${MG_EVAL_SECONDS:-210}" || echo "evaluating the variants that finished"; evaluate ;;
  *) echo "unknown call $1 (prepare, train, eval or both)" >&2; exit 2 ;;
esac
