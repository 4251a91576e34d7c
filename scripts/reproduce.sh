#!/usr/bin/env bash
# PARE's claims on the embedded teacher, regenerated from scratch into docs/claims/: run from the repository root,
# scripts/reproduce.sh [RUNS] (default runs/claims). Stop it at any time and re-run it: a finished step is skipped
# (RUNS/NAME.done), one that was interrupted resumes or starts over. Every step prints its wall time into
# RUNS/times.txt. Total wall time of the run behind docs/claims: 32,366 s of recorded steps (9.0 hours) at one
# thread (OMP_NUM_THREADS=1), each step beside one to three other jobs on 2 cores; each step's time is in
# docs/results.md.
#
# Claim 1, head roles matter (6,170 s measured beside other jobs; about 45 minutes alone, at the teacher's 1.5
# minutes per 64 prompts, 7 x 256 videos): the shipped teacher
# profiled, then its k = 2, 4, 8 most important temporal or spatial heads removed (no retraining), 256 held-out
# prompts, paired 95% bootstrap intervals: docs/claims/role_experiment.{md,json,png}.
set -euo pipefail
R=${1:-runs/claims}
D=docs/claims
mkdir -p "$R" "$D"
source "$(dirname "$0")/steps.sh"
step profile pare profile --model builtin:shapes-t2v --out "$R/profile" --seed 0
step roles python scripts/role_experiment.py --model builtin:shapes-t2v --profile "$R/profile/heads.json" \
    --k 2 4 8 --prompts 256 --work "$R/roles" --out "$D/role_experiment"

# Claim 2, role-aware beats role-agnostic pruning: the same head and FFN shares removed (25% + 25%, 40% + 40%),
# role-aware (temporal heads' scores x the multiplier, at least half of each block's temporal heads kept) or not
# (multiplier 1, no share kept), each distilled with the default preset's recipe (128 teacher videos, 400 steps
# of 16); and the temporal multiplier swept (1, 1.5, 2, 3) at 40% + 40%. Every model scored on the same 256
# held-out prompts as the teacher: docs/claims/width_experiment.{md,json,png}.
step data pare data --teacher builtin:shapes-t2v --out "$R/data" --videos 128 --seed 0
width() {  # width NAME HEADS FFN MULTIPLIER MIN_TEMPORAL_SHARE: prune and distill one student
  local w=$R/width/$1
  step "prune-$1" pare prune --model builtin:shapes-t2v --profile "$R/profile/heads.json" --heads "$2" --ffn "$3" \
      --temporal-multiplier "$4" --min-temporal-share "$5" --out "$w/prune"
  step "distill-$1" pare distill --teacher builtin:shapes-t2v --student "$w/prune" --data "$R/data" --out "$w/distill" \
      --steps 400 --batch-size 16 --seed 0
}
width 25-aware 0.25 0.25 2 0.5
width 25-agnostic 0.25 0.25 1 0
width 40-aware 0.4 0.4 2 0.5
width 40-agnostic 0.4 0.4 1 0
width 40-m1 0.4 0.4 1 0.5
width 40-m1.5 0.4 0.4 1.5 0.5
width 40-m3 0.4 0.4 3 0.5
W=$R/width
step width-table python scripts/compare_models.py --prompts 256 --work "$R/scores" --out "$D/width_experiment" \
    --model "teacher=builtin:shapes-t2v" \
    --model "25%+25% role-aware=$W/25-aware/distill/model" --model "25%+25% role-agnostic=$W/25-agnostic/distill/model" \
    --model "40%+40% role-aware=$W/40-aware/distill/model" --model "40%+40% role-agnostic=$W/40-agnostic/distill/model" \
    --model "40%+40% multiplier 1=$W/40-m1/distill/model" --model "40%+40% multiplier 1.5=$W/40-m1.5/distill/model" \
    --model "40%+40% multiplier 3=$W/40-m3/distill/model" \
    --claim "25%+25% role-aware>25%+25% role-agnostic" --claim "40%+40% role-aware>40%+40% role-agnostic" \
    --sweep "temporal multiplier at 40%+40%:1=40%+40% multiplier 1,1.5=40%+40% multiplier 1.5,2=40%+40% role-aware,3=40%+40% multiplier 3"

# Claim 3, content + timestep routing beats timestep-only routing and static block removal at the same executed
# FLOPs (--mode topk runs the same number of blocks for every input), budgets 0.55 and 0.7, on the 25% + 25%
# role-aware student above (the default preset's). Claim 4, progressive beats one-stage: the same router trained
# from the pruned (not distilled) student, 600 steps = distillation's 400 + routing's 200, at the distillation's
# learning rate for the student. Error to the teacher, domain scores, distinct routes:
# docs/claims/routing_experiment.{md,json,png}.
S=$R/width/25-aware
for b in 0.55 0.7; do
  for r in content timestep static; do
    step "route-$r-$b" pare route --teacher builtin:shapes-t2v --student "$S/distill/model" --data "$R/data" \
        --out "$R/routes/$r-$b" --router "$r" --budget "$b" --steps 200 --batch-size 16 --seed 0
  done
done
step route-one-stage pare route --teacher builtin:shapes-t2v --student "$S/prune" --data "$R/data" \
    --out "$R/routes/one-stage-0.55" --router content --budget 0.55 --steps 600 --student-lr 2e-4 --batch-size 16 --seed 0
Q=$R/routes
step routing-table python scripts/compare_models.py --prompts 256 --work "$R/scores" --out "$D/routing_experiment" \
    --model "teacher=builtin:shapes-t2v" --model "student, no routing=$S/distill/model" \
    --model "content 0.55=$Q/content-0.55/model" --model "timestep 0.55=$Q/timestep-0.55/model" \
    --model "static 0.55=$Q/static-0.55/model" --model "content 0.7=$Q/content-0.7/model" \
    --model "timestep 0.7=$Q/timestep-0.7/model" --model "static 0.7=$Q/static-0.7/model" \
    --model "one-stage content 0.55=$Q/one-stage-0.55/model" \
    --claim "content 0.55>timestep 0.55" --claim "content 0.55>static 0.55" \
    --claim "content 0.7>timestep 0.7" --claim "content 0.7>static 0.7" --claim "content 0.55>one-stage content 0.55"

# Claim 5, PARE against diffusers' caches (First Block Cache, PAB, TaylorSeer, MagCache, each at 2-3 settings) at
# equal FLOPs, and PARE's width-only model combined with the best cache (the one reaching the highest mean domain
# accuracy at no more than 0.75 of the teacher's FLOPs, the width model's own share): pare bench on the 256
# held-out prompts, docs/claims/bench.{md,png}.
WIDTH=("--variant" "width 25%+25%=$S/distill/model" "--variant" "width 40%+40%=$R/width/40-aware/distill/model"
       "--variant" "width + depth 0.7=$Q/content-0.7/model" "--variant" "width + depth 0.55=$Q/content-0.55/model")
step bench pare bench --model builtin:shapes-t2v --n 256 --out "$R/bench" "${WIDTH[@]}"
BEST=$(python - "$R/bench/results.json" <<'PY'
import json, sys
keys = {"First Block Cache": "fbc", "Pyramid Attention Broadcast": "pab", "TaylorSeer": "taylorseer", "MagCache": "magcache"}
rows = [r for r in json.load(open(sys.argv[1]))["rows"] if r["family"] == "cache" and "why_not" not in r]
within = [r for r in rows if r["flops_ratio"] <= 0.75] or rows
print(keys[max(within, key=lambda r: (r["shapes_mean"], -r["flops_ratio"]))["method"]])
PY
)
step bench-combined pare bench --model builtin:shapes-t2v --n 256 --out "$R/bench" "${WIDTH[@]}" \
    --combine "width 25%+25%=$BEST"
cp "$R/bench/results.md" "$D/bench.md"
cp "$R/bench/pareto.png" "$D/bench.png"
# Claim 5 tested video by video from the bench's kept videos: each PARE row against the cache row nearest to it in
# FLOPs per step, each PARE + cache row against the nearest cache and PARE rows, paired over the 256 prompts:
# docs/claims/bench_claims.{md,json,png}.
step bench-claims python scripts/bench_claims.py --bench "$R/bench" --out "$D/bench_claims" --equal-flops
cat "$R/times.txt"
