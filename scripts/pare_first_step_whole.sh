#!/usr/bin/env bash
# PARE on a step-1 expert student (`pare experts --groups 1/2,3,4`) with its first step whole and the width moved
# from step 4 to steps 2 and 3 (docs/results.md, "Where the PARE half stands": steps 2 and 3 lose direction at 0.372
# of the student's FLOPs, step 4 alone stays within 1.6 points there). Fresh cuts of the student's second group:
# steps 2 and 3 at heads 40% + FFN 70% (579.7 MFLOP of 1,237.9 at 8x32x32), step 4 at heads 60% + FFN 90% (341.8):
# with step 1 whole, 0.553 of the student's FLOPs per step on average (1.81x fewer). Pruning leaves the parts the
# groups share as they are, so step 1 computes exactly what the student does, and the sittings train steps 2, 3
# and 4 only: 2,000 steps at lr 1e-4, 2,500 at 5e-5, on the teacher's videos in data, data2 and data3. Then the
# hybrid (which group loses what) and the paired compare, judged by docs/results.md's rule.
# Resumable like the other scripts (RUNS/NAME/STEP.done).
# Run from the repository root: scripts/pare_first_step_whole.sh RUNS STUDENT [NAME]
# RUNS: the step_student.sh folder (data/, data2/, data3/ hold the teacher's videos); STUDENT: the step-1 expert
# student; NAME: the folder in RUNS this run writes (default pare-whole).
set -euo pipefail
USAGE="usage: scripts/pare_first_step_whole.sh RUNS STUDENT [NAME]"
RUNS=${1:?$USAGE}
S=${2:?$USAGE}
R=$RUNS/${3:-pare-whole}
mkdir -p "$R"
source "$(dirname "$0")/steps.sh"
T=builtin:shapes-t2v
for g in 1 2; do
    step take-$g pare experts --model "$S" --take $g --out "$R/group$g"
done
step profile-2 pare profile --model "$R/group2" --out "$R/prof2"
step prune-mid pare prune --model "$R/group2" --profile "$R/prof2/heads.json" --heads 0.4 --ffn 0.7 --out "$R/mid"
step prune-thin pare prune --model "$R/group2" --profile "$R/prof2/heads.json" --heads 0.6 --ffn 0.9 --out "$R/thin"
step experts pare experts --model "$R/group1" --model "$R/mid" --model "$R/thin" --groups 1/2,3/4 --out "$R/init"
step flops to_file "$R/flops.txt" pare flops --model "$R/init" --frames 8 --height 32 --width 32
step train sitting "$R/train" "$R/init" 2000 1e-4 --more-data "$RUNS/data3" --only-steps 2,3,4
step long sitting "$R/train-long" "$R/train/model" 2500 5e-5 --more-data "$RUNS/data3" --only-steps 2,3,4
step hybrid python scripts/step_hybrid.py --student "$S" --cut "$R/train-long/model" --pattern SSSS --pattern SCCS \
    --pattern SSSC --out "$R/hybrid.json"
step compare python scripts/compare_models.py --prompts 256 --work "$RUNS/cmp" --out "$R/compare256" \
    --model "teacher=$T" --model "4-step=$S" --model "first step whole, steps 2-3 mid, step 4 thin=$R/train-long/model"
