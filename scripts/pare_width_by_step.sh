#!/usr/bin/env bash
# PARE on top of the 4-step student with a width per step (docs/results.md, "Width by step" and "Longer sittings
# for B"), resumably (RUNS/NAME/STEP.done skips a finished step; a killed training resumes from its checkpoint):
# profile the student on its own 4 steps; cut it twice, wide for steps 1 and 4 (heads 20%, FFN 35%: 0.734 of its
# FLOPs) and narrow for steps 2 and 3 (heads 50%, FFN 80%: 0.372), 0.553 per step on average (1.81x fewer); stack
# the two cuts as step experts (`pare experts --groups 1,4/2,3`); then four sittings of segment regression on the
# teacher's trajectories with the objects weighed over the background: 2,000 steps at lr 1e-4, 1,000 on steps 2
# and 3 alone, 2,500 on all steps with a third folder of teacher videos, 1,500 on the weakest group alone: the
# steps whose hybrid with the student (scripts/step_hybrid.py: the student at every other step) loses the most,
# steps 2 and 3 on the plain student's cut (7,000 optimiser steps, about 2.9 hours at one thread; the third
# folder's videos about 50 minutes at two). Then the
# student and the cut on 256 held-out prompts, paired, and the bench beside the teacher, seconds per video side by
# side.
# A student whose first step has blocks of its own (step experts 1/2,3,4, reproduction/step-student/exp1) is cut
# group by group: each group is taken out as a plain model (`pare experts --take`), profiled at its own steps, and
# cut (step 1 wide from the first group, steps 2 and 3 narrow and step 4 wide from the second), and the three cuts
# are stacked as groups 1/2,3/4; the sittings are the same.
# Run from the repository root: scripts/pare_width_by_step.sh RUNS STUDENT [NAME]
# RUNS: the step_student.sh folder (its data/ and data2/ hold the teacher's videos; data3/ is made here);
# STUDENT: the student to put PARE on (step_student.sh's RUNS/sal2/model, or a step-1 expert student); NAME: the
# folder in RUNS this run writes (default pare-width).
set -euo pipefail
USAGE="usage: scripts/pare_width_by_step.sh RUNS STUDENT [NAME]"
RUNS=${1:?$USAGE}
R=$RUNS/${3:-pare-width}
S=${2:?$USAGE}
mkdir -p "$R"
source "$(dirname "$0")/steps.sh"
T=builtin:shapes-t2v
WIDE=(--heads 0.2 --ffn 0.35)
NARROW=(--heads 0.5 --ffn 0.8)
if python -c "import sys; from pare import load_bundle; from pare.routing.experts import is_step_experts
sys.exit(0 if is_step_experts(load_bundle(sys.argv[1], weights=False).transformer) else 1)" "$S"; then
    for g in 1 2; do
        step take-$g pare experts --model "$S" --take $g --out "$R/group$g"
        step profile-$g pare profile --model "$R/group$g" --out "$R/prof$g"
    done
    step prune-1-wide pare prune --model "$R/group1" --profile "$R/prof1/heads.json" "${WIDE[@]}" --out "$R/wide1"
    step prune-2-narrow pare prune --model "$R/group2" --profile "$R/prof2/heads.json" "${NARROW[@]}" --out "$R/narrow"
    step prune-2-wide pare prune --model "$R/group2" --profile "$R/prof2/heads.json" "${WIDE[@]}" --out "$R/wide4"
    step experts pare experts --model "$R/wide1" --model "$R/narrow" --model "$R/wide4" --groups 1/2,3/4 --out "$R/init"
    PATTERNS=(--pattern CSSS --pattern SCCS --pattern SSSC)  # each group of the cut alone
else
    step profile pare profile --model "$S" --out "$R/prof"
    step prune-wide pare prune --model "$S" --profile "$R/prof/heads.json" "${WIDE[@]}" --out "$R/wide"
    step prune-narrow pare prune --model "$S" --profile "$R/prof/heads.json" "${NARROW[@]}" --out "$R/narrow"
    step experts pare experts --model "$R/wide" --model "$R/narrow" --groups 1,4/2,3 --out "$R/init"
    PATTERNS=(--pattern CSSC --pattern SCCS)
fi
step train sitting "$R/train" "$R/init" 2000 1e-4
step narrow-steps sitting "$R/train-narrow" "$R/train/model" 1000 5e-5 --only-steps 2,3
step data3 pare data --teacher "$T" --videos 3072 --shard-videos 16 --seed 4608 --out "$RUNS/data3"
step long sitting "$R/train-long" "$R/train-narrow/model" 2500 5e-5 --more-data "$RUNS/data3"
step hybrid python scripts/step_hybrid.py --student "$S" --cut "$R/train-long/model" --pattern SSSS "${PATTERNS[@]}" \
    --out "$R/hybrid_long.json"
GROUP=$(python -c "import json, sys; print(json.load(open(sys.argv[1]))['weakest'])" "$R/hybrid_long.json")
step group sitting "$R/train-group" "$R/train-long/model" 1500 5e-5 --more-data "$RUNS/data3" --only-steps "$GROUP"
step compare python scripts/compare_models.py --prompts 256 --work "$RUNS/cmp" --out "$R/compare256" \
    --model "teacher=$T" --model "4-step=$S" --model "width by step, 2,000 steps=$R/train/model" \
    --model "width by step, 7,000 steps=$R/train-group/model" --claim "width by step, 7,000 steps>width by step, 2,000 steps"
step bench pare bench --model "$T" --n 64 --caches none --timing-rounds 3 --out "$R/bench" \
    --variant "4-step=$S" --variant "4-step + PARE, width by step=$R/train-group/model"
