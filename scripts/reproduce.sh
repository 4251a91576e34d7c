#!/usr/bin/env bash
# PARE's claims on the embedded teacher, regenerated from scratch into docs/claims/: run from the repository root,
# scripts/reproduce.sh [RUNS] (default runs/claims). Stop it at any time and re-run it: a finished step is skipped
# (RUNS/NAME.done), one that was interrupted resumes or starts over. Every step prints its wall time into
# RUNS/times.txt.
#
# Claim 1, head roles matter (6,170 s measured beside other jobs; about 45 minutes alone, at the teacher's 1.5
# minutes per 64 prompts, 7 x 256 videos): the shipped teacher
# profiled, then its k = 2, 4, 8 most important temporal or spatial heads removed (no retraining), 256 held-out
# prompts, paired 95% bootstrap intervals: docs/claims/role_experiment.{md,json,png}.
set -euo pipefail
R=${1:-runs/claims}
D=docs/claims
mkdir -p "$R" "$D"
step() {  # step NAME CMD...: run CMD once, record its time
  local name=$1; shift
  if [ ! -e "$R/$name.done" ]; then
    local t0=$SECONDS
    "$@"
    echo "$name $((SECONDS - t0)) s: $*" >> "$R/times.txt"
    touch "$R/$name.done"
  fi
}
step profile pare profile --model builtin:shapes-t2v --out "$R/profile" --seed 0
step roles python scripts/role_experiment.py --model builtin:shapes-t2v --profile "$R/profile/heads.json" \
    --k 2 4 8 --prompts 256 --work "$R/roles" --out "$D/role_experiment"
cat "$R/times.txt"
