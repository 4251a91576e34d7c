"""How much can input-dependent routing gain over static block removal, on this student at this budget?

    python scripts/route_ceiling.py --student runs/distill/model --data runs/data --budget 0.55

Runs the student (before any stage-2 training) on the held-out shard of the data through every maximal route
that fits the budget (the always-run blocks plus routable blocks until no further block fits), and prints
the relative error of each route over all held-out rows, then three ceilings:

  best static route       one route for every row (what static block removal can reach by choosing well)
  per-timestep oracle     the best route for each (timestep, CFG branch): what a timestep-only router can reach
  per-row oracle          the best route for every row: what a content+timestep router can reach at most

A content router can only beat a timestep-only one by the gap between the last two lines. Both oracles pick
their routes on the rows they are scored on: with few videos per timestep the per-timestep oracle also adapts
to those videos' content and the gap reads too small. Score a data folder made for it, of held-out prompts,
with --all-shards (every shard is scored; do not pass the folder the student was distilled on):

    pare data --teacher builtin:shapes-t2v --videos 64 --prompts heldout.txt --out runs/ceiling-data
    python scripts/route_ceiling.py --student runs/distill/model --data runs/ceiling-data --all-shards --budget 0.55
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch

from pare import arch
from pare.distill import branches, pair_inputs, stack_examples
from pare.distill.data import TrajectoryData
from pare.flops import count_flops
from pare.loading import load_bundle
from pare.routing import RouteConfig, build_routed
from pare.training import split_data


def maximal_routes(flops: list[int], always_run: int, budget: float) -> list[tuple[int, ...]]:
    """0/1 masks over the routable blocks that fit the budget and to which no further block can be added."""
    room = budget * sum(flops) * (1 + 1e-9) - sum(flops[:always_run])
    cost = flops[always_run:]
    routes = []
    for mask in itertools.product((0, 1), repeat=len(cost)):
        spent = sum(c for c, m in zip(cost, mask) if m)
        if spent <= room and all(m or spent + c > room for c, m in zip(cost, mask)):
            routes.append(mask)
    return routes


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", required=True, help="a `pare distill` (or `pare prune`) output folder")
    p.add_argument("--data", type=Path, required=True, help="the `pare data` folder (its last shard is scored)")
    p.add_argument("--all-shards", action="store_true", help="score every shard of --data (a folder of held-out "
                   "prompts made for this, not the one the student was trained on)")
    p.add_argument("--budget", type=float, required=True)
    p.add_argument("--always-run", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=50)
    a = p.parse_args()
    bundle = load_bundle(a.student)
    student = bundle.transformer.eval()
    val = TrajectoryData(a.data) if a.all_shards else split_data(a.data)[1]  # every shard, or the held-out one
    grid = arch.token_grid(student.config, bundle.latent, *val.index["shape"])
    image_tokens = bundle.image_tokens(*val.index["shape"][1:])
    flops = [b.total for b in count_flops(student, grid, bundle.text_tokens, image_tokens).blocks]
    routes = maximal_routes(flops, a.always_run, a.budget)
    config = RouteConfig(budget=a.budget, router="static", always_run=a.always_run)
    routed = build_routed(student, config, grid, bundle.text_tokens, [a.always_run]).eval()
    n = len(val)
    nb = branches(val[0])  # 2 (cond, uncond) for a guided teacher's data, 1 for a guidance-free (few-step) one
    err = torch.zeros(len(routes), nb * n)  # squared error per route and row (cond rows, then uncond)
    energy = torch.zeros(nb * n)
    timestep = torch.zeros(nb * n)
    for lo in range(0, n, a.batch_size):
        batch = stack_examples([val[j] for j in range(lo, min(n, lo + a.batch_size))], "cpu")
        inputs, target = pair_inputs(batch)
        b = len(batch["timestep"])
        rows = torch.cat([k * n + torch.arange(lo, lo + b) for k in range(nb)])
        energy[rows] = (target.float() ** 2).flatten(1).sum(1)
        timestep[rows] = inputs["timestep"].float()
        for r, mask in enumerate(routes):
            keep = torch.tensor(mask, dtype=torch.bool)
            routed.decide = lambda logits, k=keep: k.expand(logits.shape[0], -1)  # this route for every row
            v = routed(**inputs)[0].float()
            err[r, rows] = ((v - target.float()) ** 2).flatten(1).sum(1)
    total = energy.sum()
    names = [",".join(map(str, range(a.always_run))) + "," + ",".join(str(a.always_run + i) for i, m in enumerate(mask) if m)
             for mask in routes]  # fmt: skip
    print(f"{len(routes)} maximal routes at budget {a.budget} on {n} held-out examples x {nb} CFG branch(es)")
    order = (err.sum(1) / total).argsort()
    for r in order.tolist():
        print(f"  blocks {names[r]:<14} error {err[r].sum() / total:.4f}")
    best = int(order[0])
    branch = torch.arange(nb).repeat_interleave(n).float()
    per_t = 0.0
    groups = torch.unique(torch.stack([timestep, branch], 1), dim=0)
    print(f"{nb * n / len(groups):.0f} rows per (timestep, CFG branch)")
    for key in groups:
        rows = (timestep == key[0]) & (branch == key[1])
        per_t += err[:, rows].sum(1).min().item()
    print(f"best static route ({names[best]}): {err[best].sum() / total:.4f}")
    print(f"per-timestep oracle: {per_t / total:.4f}")
    print(f"per-row oracle: {err.min(0).values.sum() / total:.4f}")


if __name__ == "__main__":
    main()
