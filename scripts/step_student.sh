#!/usr/bin/env bash
# The 4-step, guidance-free student of the built-in teacher, from scratch, then its scores beside the teacher's on
# 256 held-out prompts (paired). Run from the repository root: scripts/step_student.sh [RUNS] [VIDEOS] (defaults
# runs/step-student and 3072). Stop it at any time and re-run it: a finished step is skipped (RUNS/NAME.done), an
# interrupted training run resumes from its checkpoint; each step's time goes into RUNS/times.txt. The recipe is the
# one behind docs/results.md "Step distillation": teacher videos (the teacher's guided 25-step samples), segment
# regression, then the rollout loss at weight 10; then a distribution-matching sitting from that student with the
# segment loss beside it (docs/results.md "Distribution matching"), and a rollout sitting on the levels of flow
# shift 5 (more of its steps at high noise, where the layout settles). On the shipped teacher, at two threads
# (times.txt): data 2,310 s, segment 1,374 s, rollout 1,742 s, dmd 712 s; shift5 2,269 s at one thread beside two
# other jobs (run by hand with this command). Then the student of record (docs/results.md, "The salience weight on
# the guidance-2 data"): 1,536 more teacher videos (data2) and a rollout sitting from the shift-5 student on both
# folders with the objects weighed over the background (salience). Copy the models elsewhere to keep them.
set -euo pipefail
R=${1:-runs/step-student}
VIDEOS=${2:-3072}
mkdir -p "$R"
source "$(dirname "$0")/steps.sh"
T=builtin:shapes-t2v
step data pare data --teacher "$T" --videos "$VIDEOS" --shard-videos 16 --seed 0 --out "$R/data"
step segment pare step-distill --teacher "$T" --data "$R/data" --steps 4 --train-steps 1000 --batch-size 32 \
    --lr 1e-4 --warmup-steps 50 --checkpoint-every 100 --eval-every 500 --out "$R/s4"
step rollout pare step-distill --teacher "$T" --data "$R/data" --steps 4 --train-steps 600 --batch-size 32 \
    --lr 5e-5 --warmup-steps 20 --checkpoint-every 50 --eval-every 200 --rollout-weight 10 --rollout-examples 8 \
    --init-from "$R/s4/model" --out "$R/s4r10"
step dmd pare step-distill --method dmd --teacher "$T" --data "$R/data" --steps 4 --train-steps 400 --batch-size 16 \
    --lr 1e-5 --critic-lr 3e-5 --warmup-steps 20 --lr-schedule cosine --ema-decay 0.995 --regression-weight 1 \
    --checkpoint-every 50 --eval-every 200 --init-from "$R/s4r10/model" --out "$R/s4dmd"
step shift5 pare step-distill --teacher "$T" --data "$R/data" --steps 4 --flow-shift 5 --train-steps 400 \
    --batch-size 32 --lr 1e-4 --warmup-steps 20 --checkpoint-every 50 --eval-every 200 --rollout-weight 10 \
    --rollout-examples 8 --init-from "$R/s4r10/model" --out "$R/s4s5"
step compare python scripts/compare_models.py --prompts 256 --work "$R/cmp" --out "$R/compare256" \
    --model "teacher=$T" --model "segment=$R/s4/model" --model "segment + rollout=$R/s4r10/model" \
    --model "segment + rollout + dmd=$R/s4dmd/model" --model "shift 5=$R/s4s5/model" \
    --claim "segment + rollout + dmd>segment + rollout" --claim "shift 5>segment + rollout"
step data2 pare data --teacher "$T" --videos $((VIDEOS / 2)) --shard-videos 16 --seed "$VIDEOS" --out "$R/data2"
step salience pare step-distill --teacher "$T" --data "$R/data" --more-data "$R/data2" --steps 4 --train-steps 400 \
    --batch-size 32 --lr 5e-5 --warmup-steps 20 --checkpoint-every 50 --rollout-weight 10 --rollout-examples 8 \
    --ema-decay 0.99 --salience-weight 1 --init-from "$R/s4s5/model" --out "$R/sal2"
step compare-salience python scripts/compare_models.py --prompts 256 --work "$R/cmp" --out "$R/compare256-salience" \
    --model "teacher=$T" --model "shift 5=$R/s4s5/model" --model "student of record=$R/sal2/model" \
    --claim "student of record>shift 5"
