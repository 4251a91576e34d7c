#!/usr/bin/env bash
# The whole PARE pipeline on the embedded default, as the README reports it. Run from the repository root;
# everything lands in runs/ (re-running resumes or redoes each stage).
set -euo pipefail
M=builtin:shapes-t2v
pare eval-shapes --model $M --n 64 --out runs/eval-teacher
pare profile --model $M --out runs/profile
python scripts/role_experiment.py --model $M --profile runs/profile/heads.json --k 2 4 --prompts 64 --out docs/role_experiment
pare prune --model $M --profile runs/profile/heads.json --heads 0.25 --ffn 0.25 --out runs/pruned
pare prune --model $M --profile runs/profile/heads.json --heads 0.25 --ffn 0.25 --temporal-multiplier 1 --min-temporal-share 0 --out runs/pruned-agnostic
pare eval-shapes --model runs/pruned --n 64 --out runs/eval-pruned
pare eval-shapes --model runs/pruned-agnostic --n 64 --out runs/eval-pruned-agnostic
pare data --teacher $M --videos 128 --out runs/data
pare distill --teacher $M --student runs/pruned --data runs/data --out runs/distill --steps "${DISTILL_STEPS:-400}" --batch-size 16
pare eval-shapes --model runs/distill/model --n 64 --out runs/eval-distill
for router in content timestep static; do
  pare route --teacher $M --student runs/distill/model --data runs/data --out runs/route-$router --router $router \
    --budget 0.55 --steps "${ROUTE_STEPS:-200}" --batch-size 16
done
python scripts/route_stats.py --model runs/route-content/model --prompts 64 --out docs/routes_content
python scripts/route_stats.py --model runs/route-timestep/model --prompts 64 --out docs/routes_timestep
python scripts/route_latency.py --model runs/route-content/model --batch 16 --repeats 15 > docs/route_latency.txt
pare bench --model $M --n 32 --out runs/bench \
  --variant "width (pruned + distilled)=runs/distill/model" \
  --variant "width + depth (content router)=runs/route-content/model" \
  --baseline "width, pruned only=runs/pruned" \
  --baseline "role-agnostic width, pruned only=runs/pruned-agnostic" \
  --baseline "static depth=runs/route-static/model" \
  --baseline "timestep-only router=runs/route-timestep/model"
