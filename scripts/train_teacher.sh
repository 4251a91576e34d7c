#!/usr/bin/env bash
# The shipped teacher's seven sittings from scratch, then its score on the 64 held-out prompts beside the shipped
# one's. Run from the repository root: scripts/train_teacher.sh [RUNS] (default runs/teacher-chain). 328,000
# videos, 10,250 steps: about 7 hours on the 2-core CPU with nothing else running (1.7-2.3 s per step of 32
# videos at two threads, plus the 5-minute autoencoder and about 20 evaluations of 1-2 minutes; the shipped
# teacher's recorded times are in its pare.json). Stop it at any time and re-run it: a sitting that finished is
# skipped, one that was interrupted resumes from its checkpoint; copy the finished sittings (pN/model and pN.done)
# to carry on on another machine.
# Needs the eval extra (`pip install -e ".[eval]"`, as the README's set-up): every sitting evaluates its model.
set -euo pipefail
R=${1:-runs/teacher-chain}
mkdir -p "$R"
sitting() {  # sitting NAME ARGS...: one `pare teacher train`, skipped once it has finished; its time in $R/times.txt
  local name=$1; shift
  if [ ! -e "$R/$name.done" ]; then
    local s; s=$(date +%s)
    pare teacher train --out "$R/$name" "$@"
    echo "$name $(( $(date +%s) - s )) s" >> "$R/times.txt"
    touch "$R/$name.done"
  fi
}
LATER=(--samples 48000 --lr 5e-4 --warmup-steps 100 --frame-noise 0.25 --eval-every 500)  # a later flag overrides
sitting p2 --samples 56000 --eval-every 500
sitting p3 --init-from "$R/p2/model" "${LATER[@]}" --seed 1
sitting p4 --init-from "$R/p3/model" "${LATER[@]}" --seed 2
sitting p6 --init-from "$R/p4/model" "${LATER[@]}" --two-objects 0.75 --seed 4 --eval-prompts 64
sitting p7 --init-from "$R/p6/model" "${LATER[@]}" --two-objects 0.75 --object-tokens --seed 5 --eval-prompts 64
sitting p8 --init-from "$R/p7/model" "${LATER[@]}" --two-objects 0.75 --object-tokens --seed 6 --eval-prompts 64 --eval-every 750
# a quarter of the scenes circling, the motion drawn worst (1 in 11 before), on a shorter schedule
sitting p9 --init-from "$R/p8/model" "${LATER[@]}" --samples 32000 --two-objects 0.75 --object-tokens --circling 0.25 --seed 7 --eval-prompts 64
[ -e "$R/eval64/scores.json" ] || pare eval-shapes --model "$R/p9/model" --n 64 --guidance 2 --out "$R/eval64"
python - "$R/eval64/scores.json" <<'PY'
import json, sys
from pare.loading import load_bundle
shipped = load_bundle("builtin:shapes-t2v", weights=False).manifest["training"]["eval"]
mine = json.load(open(sys.argv[1]))["scores"]
print(f"{'metric':<10} {'this run':>9} {'shipped':>8}")
for key in ("colour", "shape", "direction", "speed", "count"):
    print(f"{key:<10} {mine[key]:>9.1f} {shipped[key]:>8.1f}" + ("   differs by more than 3 points" if abs(mine[key] - shipped[key]) > 3 else ""))
PY
