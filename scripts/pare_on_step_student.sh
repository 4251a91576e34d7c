#!/usr/bin/env bash
# PARE on top of the 4-step student of scripts/step_student.sh, resumably (RUNS/NAME/STEP.done skips a finished
# step; a killed training resumes from its checkpoint): profile the student on its own 4 steps, cut 35% of its heads
# and 60% of its FFN channels (0.547 of its FLOPs per step, 1.83x fewer), and train the cut on the teacher's
# trajectories with the student's loss, segment regression (`pare step-distill --init-from CUT`, on the student's
# levels): 1,200 steps, then a second sitting of 800 at half the learning rate (its scores still rose at the end of
# the first; a sitting with the rollout loss instead lost 1-9 points on 64 prompts by its step 200). Then the student
# and the cut after each sitting on 256 held-out prompts, paired, and the bench beside the teacher, seconds per video
# side by side. (Until the shift-5 student, the cut was also trained on the student's own samples, PARE's stage 1 as
# `pare distill`: on the segment student the two recipes could not be told apart; this script at 2a6eb22 ran both.)
# Run from the repository root: scripts/pare_on_step_student.sh RUNS STUDENT [NAME [STEP-DISTILL OPTIONS...]]
# RUNS: the step_student.sh folder (its data/ holds the teacher's videos); STUDENT: the student to put PARE on;
# NAME: the folder in RUNS this run writes (default pare; another student needs another NAME); any further
# arguments go to both training sittings, e.g. `--more-data RUNS/data2` for a student trained on more teacher videos.
set -euo pipefail
USAGE="usage: scripts/pare_on_step_student.sh RUNS STUDENT [NAME [STEP-DISTILL OPTIONS...]]"
R=${1:?$USAGE}/${3:-pare}
S=${2:?$USAGE}
shift $(($# < 3 ? $# : 3))
MORE=("$@")
mkdir -p "$R"
source "$(dirname "$0")/steps.sh"
T=builtin:shapes-t2v
step profile pare profile --model "$S" --out "$R/prof"
step prune-a pare prune --model "$S" --profile "$R/prof/heads.json" --heads 0.35 --ffn 0.6 --out "$R/cut-a"
step train-a pare step-distill --teacher "$T" --data "$R/../data" --steps 4 --train-steps 1200 --batch-size 32 \
    --lr 1e-4 --warmup-steps 20 --checkpoint-every 50 --eval-every 400 --init-from "$R/cut-a" --out "$R/train-a" "${MORE[@]}"
step train-b pare step-distill --teacher "$T" --data "$R/../data" --steps 4 --train-steps 800 --batch-size 32 \
    --lr 5e-5 --warmup-steps 20 --checkpoint-every 50 --eval-every 400 --init-from "$R/train-a/model" --out "$R/train-b" "${MORE[@]}"
SEG="4-step + PARE, 1,200 steps"
LONG="4-step + PARE, 2,000 steps"
step compare python scripts/compare_models.py --prompts 256 --work "$R/../cmp" --out "$R/compare256" \
    --model "teacher=$T" --model "4-step=$S" --model "$SEG=$R/train-a/model" --model "$LONG=$R/train-b/model" \
    --claim "$SEG>4-step" --claim "$LONG>4-step" --claim "$LONG>$SEG"
step bench pare bench --model "$T" --n 64 --caches none --timing-rounds 3 --out "$R/bench" \
    --variant "4-step=$S" --variant "4-step + PARE (heads 35%, FFN 60%)=$R/train-b/model"
