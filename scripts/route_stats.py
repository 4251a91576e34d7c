"""How routes vary: distinct routes over the held-out prompts at each sampling step, and blocks run per step.

    python scripts/route_stats.py --model runs/route-content/model --prompts 64 --out docs/routes_content

Writes OUT.json and OUT.md (a table per step: distinct routes among the prompts' conditional passes, mean
blocks run, and the most common route) and OUT.png (blocks x steps: share of prompts running each block).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from pare.io import atomic_path, save_figure, write_json
from pare.loading import load_bundle
from pare.routing import route_statistics
from pare.shapes.domain import heldout_prompts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    torch.set_grad_enabled(False)
    stats = {"model": a.model, **route_statistics(load_bundle(a.model), heldout_prompts(a.prompts))}
    write_json(a.out.with_suffix(".json"), stats)
    lines = ["| step | distinct routes | blocks run (mean) | most common route (share) |", "|---|---|---|---|"]
    for s in stats["steps"]:
        lines.append(f"| {s['step']} | {s['distinct_routes']} | {s['blocks_run']:.2f} | "
                     f"{s['most_common']} ({s['most_common_share']:.2f}) |")  # fmt: skip
    with atomic_path(a.out.with_suffix(".md")) as tmp:
        tmp.write_text("\n".join(lines) + f"\n\n{stats['distinct_routes_overall']} distinct routes over all steps.\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    share = torch.tensor([s["block_share"] for s in stats["steps"]]).T  # (blocks, steps)
    fig, ax = plt.subplots(figsize=(6, 3))
    im = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xlabel("sampling step")
    ax.set_ylabel("block")
    ax.set_title(f"share of {a.prompts} prompts running each block", fontsize=9)
    fig.colorbar(im, ax=ax)
    save_figure(fig, a.out.with_suffix(".png"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
