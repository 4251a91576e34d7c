#!/bin/bash
# builtin:shapes-i2v, the embedded image-to-video teacher, in sittings: started from the T2V teacher (the shipped
# one from the T2V teacher of commit 34e7457), each later sitting from the one before (`pare teacher train
# --init-from`), then scored on the 64 held-out prompts. Re-run to
# resume: a finished sitting is skipped, an interrupted one resumes from its checkpoint. Time per sitting in
# $R/times.txt. Usage: scripts/train_i2v_teacher.sh [RUN_FOLDER]
set -euo pipefail
R=${1:-runs/i2v-teacher}
mkdir -p "$R"
sitting() {  # sitting NAME ARGS...: one `pare teacher train`, skipped once it has finished
  local name=$1; shift
  if [ ! -e "$R/$name.done" ]; then
    local s; s=$(date +%s)
    pare teacher train --out "$R/$name" "$@"
    echo "$name $(( $(date +%s) - s )) s" >> "$R/times.txt"
    touch "$R/$name.done"
  fi
}
I2V=(--preset shapes-i2v --object-tokens --lr 5e-4 --warmup-steps 50 --frame-noise 0.25 --two-objects 0.75
     --eval-prompts 32 --checkpoint-every 50)
# 500 steps of 32 from the T2V teacher: held-out scores at the T2V teacher's level after 250 steps, first-frame
# PSNR 17.6 -> 22.0 -> 23.6 dB at steps 125, 250, 375 (the bar is 30)
sitting c1 --init-from builtin:shapes-t2v "${I2V[@]}" --samples 16000 --seed 7 --eval-every 125
# frame 0's velocity error weighted 8 (as much as the 7 other frames together), to copy the given frame exactly;
# the shipped model is step 400 of this sitting's 1,000-step schedule (its learning rate still high there)
sitting c2 --init-from "$R/c1/model" "${I2V[@]}" --samples 32000 --seed 8 --eval-every 250 --first-frame-weight 8 \
  --stop-at-step 400
[ -e "$R/eval64/scores.json" ] || pare eval-shapes --model "$R/c2/model" --n 64 --out "$R/eval64"
