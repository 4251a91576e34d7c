#!/usr/bin/env bash
# PARE on top of the 4-step student of scripts/step_student.sh, resumably (RUNS/NAME/STEP.done skips a finished
# step; a killed training resumes from its checkpoint): profile the student on its own 4 steps, cut 35% of its heads
# and 60% of its FFN channels (0.547 of its FLOPs per step, 1.83x fewer), and train the cut two ways, side by side at
# one thread each: PARE's stage 1 on the student's own guidance-free samples (`pare data --teacher STUDENT`, then
# `pare distill`), and the student's own losses on the teacher's trajectories (`pare step-distill --init-from CUT`).
# Then the three on 256 held-out prompts, paired, and the bench beside the teacher, seconds per video side by side.
# Run from the repository root: scripts/pare_on_step_student.sh RUNS STUDENT [NAME]
# RUNS: the step_student.sh folder (its data/ holds the teacher's videos); STUDENT: the student to put PARE on;
# NAME: the folder in RUNS this run writes (default pare; another student needs another NAME).
set -euo pipefail
USAGE="usage: scripts/pare_on_step_student.sh RUNS STUDENT [NAME]"
R=${1:?$USAGE}/${3:-pare}
S=${2:?$USAGE}
mkdir -p "$R"
source "$(dirname "$0")/steps.sh"
T=builtin:shapes-t2v
step profile pare profile --model "$S" --out "$R/prof"
step prune-a pare prune --model "$S" --profile "$R/prof/heads.json" --heads 0.35 --ffn 0.6 --out "$R/cut-a"
export OMP_NUM_THREADS=1
own() {  # PARE's stage 1: the cut learns the student's velocities on the student's own 4-step samples
    pare data --teacher "$S" --videos 4096 --shard-videos 16 --seed 0 --out "$R/student-data" \
        > "$R/student-data.log" 2>&1
    pare distill --teacher "$S" --student "$R/cut-a" --data "$R/student-data" --steps 2400 --batch-size 16 \
        --lr-schedule cosine --checkpoint-every 100 --seed 0 --out "$R/distill-a" > "$R/distill-a.log" 2>&1
}
teacher_paths() {  # the student's recipe on the cut: segment regression on the teacher's trajectories
    pare step-distill --teacher "$T" --data "$R/../data" --steps 4 --train-steps 1200 --batch-size 32 --lr 1e-4 \
        --warmup-steps 20 --checkpoint-every 50 --eval-every 400 --init-from "$R/cut-a" --out "$R/train-a" \
        > "$R/train-a.log" 2>&1
}
step distill-a own &
a=$!
step train-a teacher_paths &
b=$!
wait $a
wait $b  # either one failing stops the script here (a finished one is kept: re-run to go on)
unset OMP_NUM_THREADS
OWN="4-step + PARE, on its samples"
TRAJ="4-step + PARE, on the teacher's trajectories"
step compare python scripts/compare_models.py --prompts 256 --work "$R/../cmp" --out "$R/compare256" \
    --model "teacher=$T" --model "4-step=$S" --model "$OWN=$R/distill-a/model" --model "$TRAJ=$R/train-a/model" \
    --claim "$OWN>4-step" --claim "$TRAJ>4-step" --claim "$OWN>$TRAJ"
step bench pare bench --model "$T" --n 64 --caches none --timing-rounds 3 --out "$R/bench" \
    --variant "4-step=$S" --variant "4-step + PARE (heads 35%, FFN 60%)=$R/distill-a/model"
