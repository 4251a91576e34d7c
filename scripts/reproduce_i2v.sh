#!/usr/bin/env bash
# PARE's pipeline on the embedded image-to-video teacher builtin:shapes-i2v, end to end, and claim 2 (role-aware
# beats role-agnostic pruning at equal FLOPs) checked on it as on the text-to-video teacher (scripts/reproduce.sh):
# run from the repository root, scripts/reproduce_i2v.sh [RUNS] (default runs/claims-i2v). Stop it at any time and
# re-run it: a finished step is skipped (RUNS/NAME.done), one that was interrupted resumes or starts over. Every
# step prints its wall time into RUNS/times.txt. First frames: the teacher's own (frame 0 of a render of each
# prompt; `--images DIR` on each command for your own).
#
# The T2V recipe at the I2V teacher's cost (a forward is ~1.7x the T2V teacher's on a CPU): profile, 128 teacher
# videos, 25% heads + 25% FFN channels pruned role-aware (temporal multiplier 2, at least half of each block's
# temporal heads kept) and role-agnostic, each distilled 400 steps of 16, a content router at budget 0.55 on the
# role-aware student (200 steps). Then the paired table on 128 held-out prompts (docs/claims/i2v_experiment.*)
# and the bench on 64 (docs/claims/i2v_bench.*: FLOPs, seconds per video, First Block Cache beside PARE, each
# PARE row paired with the cache nearest in FLOPs in docs/claims/i2v_bench_claims.*). Total: 9,911 s of steps
# at one thread, each beside one or two other jobs on 2 cores (docs/i2v.md lists each).
set -euo pipefail
R=${1:-runs/claims-i2v}
D=docs/claims
T=builtin:shapes-i2v
mkdir -p "$R" "$D"
source "$(dirname "$0")/steps.sh"
step profile pare profile --model $T --out "$R/profile" --seed 0
step data pare data --teacher $T --out "$R/data" --videos 128 --seed 0
width() {  # width NAME MULTIPLIER MIN_TEMPORAL_SHARE: prune 25% + 25% and distill one student
  local w=$R/width/$1
  step "prune-$1" pare prune --model $T --profile "$R/profile/heads.json" --heads 0.25 --ffn 0.25 \
      --temporal-multiplier "$2" --min-temporal-share "$3" --out "$w/prune"
  step "distill-$1" pare distill --teacher $T --student "$w/prune" --data "$R/data" --out "$w/distill" \
      --steps 400 --batch-size 16 --seed 0
}
width aware 2 0.5
width agnostic 1 0
W=$R/width
step route pare route --teacher $T --student "$W/aware/distill/model" --data "$R/data" --out "$R/route" \
    --router content --budget 0.55 --steps 200 --batch-size 16 --seed 0
step table python scripts/compare_models.py --prompts 128 --work "$R/scores" --out "$D/i2v_experiment" \
    --model "teacher=$T" --model "25%+25% role-aware=$W/aware/distill/model" \
    --model "25%+25% role-agnostic=$W/agnostic/distill/model" --model "role-aware + content 0.55=$R/route/model" \
    --claim "25%+25% role-aware>25%+25% role-agnostic"
step bench pare bench --model $T --n 64 --out "$R/bench" --caches fbc \
    --variant "width 25%+25%=$W/aware/distill/model" --variant "width + depth 0.55=$R/route/model" \
    --baseline "width 25%+25% role-agnostic=$W/agnostic/distill/model"
cp "$R/bench/results.md" "$D/i2v_bench.md"
cp "$R/bench/pareto.png" "$D/i2v_bench.png"
step bench-claims python scripts/bench_claims.py --bench "$R/bench" --out "$D/i2v_bench_claims" --equal-flops
cat "$R/times.txt"
