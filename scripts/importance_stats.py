"""What routes the block importance asks for: the best blocks within the budget, per training row and timestep.

    python scripts/importance_stats.py --data runs/data --routed runs/route-content/model --budget 0.55

Reads the importance `pare route` cached in the data folder (for the student the routed model was made from)
and prints: distinct best routes over all training rows (cond and uncond), the three most common routes per
timestep (cond rows), and the cross-entropy of predicting each block's average rate (the floor a router that
ignores its input reaches).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file

from pare.routing import importance_targets
from pare.training import split_data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--routed", type=Path, required=True, help="a `pare route` output model (for its block FLOPs)")
    p.add_argument("--budget", type=float, required=True)
    a = p.parse_args()
    config = json.loads((a.routed / "transformer" / "config.json").read_text())
    flops, always = config["block_flops"], config["always_run"]
    files = sorted(a.data.glob("block_importance-*.safetensors"))
    importance = load_file(str(files[0]))["importance"]  # (N, 2, blocks)
    train, _ = split_data(a.data)
    timesteps = [int(train[i]["timestep"]) for i in range(len(train))]
    targets = importance_targets(importance, flops, always, a.budget)  # (2N, routable): cond rows, then uncond

    def name(row) -> str:
        return ",".join(str(i) for i in range(always)) + "," + ",".join(str(always + int(j)) for j in row.nonzero().flatten())

    every = Counter(name(r) for r in targets)
    print(f"{len(every)} distinct best routes over {len(targets)} training rows: {every.most_common()}")
    per: dict[int, Counter] = {}
    for t, r in zip(timesteps, targets[: len(timesteps)]):
        per.setdefault(t, Counter())[name(r)] += 1
    for t in sorted(per):
        print(f"timestep {t:4d}: {sum(per[t].values())} rows, {len(per[t])} routes, {per[t].most_common(3)}")
    rate = targets.mean(0).clamp(1e-6, 1 - 1e-6)
    floor = -(rate * rate.log() + (1 - rate) * (1 - rate).log()).mean()
    print(f"cross-entropy of predicting each block's average rate: {floor:.3f}")


if __name__ == "__main__":
    main()
