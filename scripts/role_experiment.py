"""Why role-aware pruning: remove the k most important temporal heads, or the k most important spatial heads
(same k, no retraining), and score each model with the shapes evaluator on the held-out prompts.

    python scripts/role_experiment.py --model builtin:shapes-t2v --profile runs/profile/heads.json \
        --k 2 4 --prompts 64 --out docs/role_experiment

Writes OUT.json, OUT.md (the table in the README) and OUT.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pare.gates import Gates, gated
from pare.io import atomic_path, write_json
from pare.loading import load_bundle
from pare.profiling import load_profile
from pare.shapes.domain import heldout_prompts
from pare.shapes.evaluate import evaluate_model

METRICS = ("colour", "shape", "count", "direction", "speed", "motion_smoothness", "subject_consistency", "fd")


def ranked(profile: dict, role: str) -> list[tuple[int, int, float]]:
    """(block, head, importance) of the heads with `role`, most important first."""
    key = profile["rule"]["score"]
    heads = [(b, h["head"], h[key]) for b, blk in enumerate(profile["blocks"]) for h in blk["heads"] if h["role"] == role]
    return sorted(heads, key=lambda x: -x[2])


def run(model: str, profile_path: Path, ks: list[int], n_prompts: int, seed: int) -> dict:
    bundle = load_bundle(model)
    profile = load_profile(profile_path)
    prompts = heldout_prompts(n_prompts)
    rows = {"teacher": {"removed": [], **evaluate_model(bundle, prompts, seed=seed)[0]}}
    for k in ks:
        for role in ("temporal", "spatial"):
            heads = ranked(profile, role)[:k]
            if len(heads) < k:
                rows[f"-{k} {role}"] = {"removed": heads, "note": f"only {len(heads)} {role} heads"}
                continue
            gates = Gates.ones(bundle.transformer)
            for b, h, _ in heads:
                gates.self_heads[b][h] = 0.0
            with gated(bundle.transformer, Gates(self_heads=gates.self_heads)):
                scores, _ = evaluate_model(bundle, prompts, seed=seed)
            rows[f"-{k} {role}"] = {"removed": [[b, h] for b, h, _ in heads], **scores}
    return {"model": model, "profile": str(profile_path), "prompts": n_prompts, "seed": seed, "rows": rows,
            "role_counts": profile["role_counts"]}  # fmt: skip


def markdown(result: dict) -> str:
    lines = ["| model | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for name, row in result["rows"].items():
        cells = [f"{row[m]:.1f}" if m in row and m in ("colour", "shape", "count", "direction", "speed", "fd")
                 else f"{row[m]:.3f}" if m in row else "n/a" for m in METRICS]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, r in result["rows"].items() if "colour" in r]
    metrics = ("colour", "shape", "count", "direction")
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 3.2))
    width = 0.8 / len(metrics)
    for i, m in enumerate(metrics):
        ax.bar([j + i * width for j in range(len(names))], [result["rows"][n][m] for n in names], width, label=m)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names)
    ax.set_ylabel("accuracy on held-out prompts (%)")
    ax.set_title("removing the most important temporal vs spatial heads (no retraining)", fontsize=10)
    ax.legend(fontsize=8, ncols=len(metrics))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:shapes-t2v")
    p.add_argument("--profile", type=Path, required=True, help="heads.json of `pare profile` on the same model")
    p.add_argument("--k", type=int, nargs="+", default=[2, 4])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("docs/role_experiment"))
    a = p.parse_args()
    torch.set_grad_enabled(False)
    result = run(a.model, a.profile, a.k, a.prompts, a.seed)
    write_json(a.out.with_suffix(".json"), result)
    with atomic_path(a.out.with_suffix(".md")) as tmp:
        tmp.write_text(markdown(result))
    plot(result, a.out.with_suffix(".png"))
    print(markdown(result))


if __name__ == "__main__":
    main()
