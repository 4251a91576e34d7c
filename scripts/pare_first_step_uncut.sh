#!/usr/bin/env bash
# PARE on a step-1 expert student (`pare experts --groups 1/2,3,4`) with its first step left as it is: step 1,
# where the layout and the count of objects are decided, runs the student's own blocks; steps 2, 3 and 4 run narrow
# cuts (heads 50%, FFN 80%: 0.372 of the student's FLOPs each), 0.529 of its FLOPs per step on average (1.89x
# fewer). It starts from a finished scripts/pare_width_by_step.sh folder BASE: its untouched step-1 group and the
# narrow group its sittings trained on steps 2 and 3, which also starts step 4's own group. The experts keep the
# student's patch embedding, condition embedder and output head (`--shared-from 1`: its first step is then exactly
# the student's), which the narrow blocks were not trained beside; 1,000 steps on step 4 alone and 1,000 on steps
# 2, 3 and 4 train them to it (the step-1 blocks and the shared parts do not train). Then the paired compare.
# Resumable like the other scripts (RUNS/NAME/STEP.done).
# Run from the repository root: scripts/pare_first_step_uncut.sh RUNS STUDENT BASE [NAME]
# RUNS: the step_student.sh folder (data/, data2/, data3/ hold the teacher's videos); STUDENT: the step-1 expert
# student; BASE: pare_width_by_step.sh's folder for it; NAME: the folder in RUNS this run writes (default pare-first).
set -euo pipefail
USAGE="usage: scripts/pare_first_step_uncut.sh RUNS STUDENT BASE [NAME]"
RUNS=${1:?$USAGE}
S=${2:?$USAGE}
BASE=${3:?$USAGE}
R=$RUNS/${4:-pare-first}
[ -e "$R/experts.done" ] || { [ -d "$BASE/group1" ] && [ -d "$BASE/train-group/model" ]; } || {
    echo "pare_first_step_uncut.sh: BASE must be a finished pare_width_by_step.sh folder of a step-1 expert student" \
        "(with group1/ and train-group/model), got $BASE" >&2; exit 2; }
mkdir -p "$R"
source "$(dirname "$0")/steps.sh"
T=builtin:shapes-t2v
step take-narrow pare experts --model "$BASE/train-group/model" --take 2 --out "$R/narrow"
step experts pare experts --model "$BASE/group1" --model "$R/narrow" --model "$R/narrow" --groups 1/2,3/4 \
    --shared-from 1 --out "$R/init"
step flops to_file "$R/flops.txt" pare flops --model "$R/init" --frames 8 --height 32 --width 32
step step4 sitting "$R/train-4" "$R/init" 1000 5e-5 --more-data "$RUNS/data3" --only-steps 4
step joint sitting "$R/train-234" "$R/train-4/model" 1000 5e-5 --more-data "$RUNS/data3" --only-steps 2,3,4
step compare python scripts/compare_models.py --prompts 256 --work "$RUNS/cmp" --out "$R/compare256" \
    --model "teacher=$T" --model "4-step=$S" --model "first step uncut=$R/train-234/model"
# where it loses, by group, and then steps 2 and 3 apart: each its own copy of the narrow blocks the joint sitting
# trained (the same FLOPs per step, more weights, as step 1 got its own blocks in the student), 1,000 steps on
# steps 2 and 3, and the compare again
step hybrid python scripts/step_hybrid.py --student "$S" --cut "$R/train-234/model" --pattern SSSS --pattern SCCS \
    --pattern SSSC --out "$R/hybrid.json"
for g in 1 2 3; do
    step take-$g pare experts --model "$R/train-234/model" --take $g --out "$R/group$g"
done
step split pare experts --model "$R/group1" --model "$R/group2" --model "$R/group2" --model "$R/group3" \
    --groups 1/2/3/4 --out "$R/split"
step split-sitting sitting "$R/train-split" "$R/split" 1000 5e-5 --more-data "$RUNS/data3" --only-steps 2,3
step compare-split python scripts/compare_models.py --prompts 256 --work "$RUNS/cmp" --out "$R/compare256_split" \
    --model "teacher=$T" --model "4-step=$S" --model "first step uncut=$R/train-234/model" \
    --model "first step uncut, steps 2 and 3 apart=$R/train-split/model"
