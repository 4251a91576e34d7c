"""Do head roles matter? Remove the k most important temporal heads, or the k most important spatial heads (same
k, no retraining), score each model with the shapes evaluator on the same held-out prompts and seeds, and test
the claim with 95% paired bootstrap intervals: removing temporal heads hurts direction, speed and motion
smoothness more than removing spatial heads does, and removing spatial heads hurts shape more.

    python scripts/role_experiment.py --model builtin:shapes-t2v --profile runs/profile/heads.json \
        --k 2 4 8 --prompts 256 --work runs/role_experiment --out docs/role_experiment

Each model's scores are kept in WORK/NAME.json as they finish; a re-run skips them. Writes OUT.json, OUT.md (the
tables) and OUT.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pare.errors import require, script_exit
from pare.gates import Gates, gated
from pare.io import save_figure, write_json, write_result
from pare.loading import load_bundle
from pare.profiling import load_profile
from pare.shapes.domain import heldout_prompts
from pare.shapes.evaluate import evaluate_model, paired_difference, verdict

METRICS = ("colour", "shape", "count", "direction", "speed", "motion_smoothness", "subject_consistency", "fd")
# The claim, metric by metric: the sign that (temporal removal) - (spatial removal) should have
PREDICTED = {"direction": -1, "speed": -1, "motion_smoothness": -1, "shape": +1}


def ranked(profile: dict, role: str) -> list[tuple[int, int, float]]:
    """(block, head, importance) of the heads with `role`, most important first."""
    key = profile["rule"]["score"]
    heads = [(b, h["head"], h[key]) for b, blk in enumerate(profile["blocks"]) for h in blk["heads"] if h["role"] == role]
    return sorted(heads, key=lambda x: -x[2])


def run(model: str, profile_path: Path, ks: list[int], n_prompts: int, seed: int, work: Path) -> dict:
    bundle = load_bundle(model)
    profile = load_profile(profile_path)
    prompts = heldout_prompts(n_prompts)
    plan = {"teacher": []}
    for k in ks:
        for role in ("temporal", "spatial"):
            heads = ranked(profile, role)[:k]
            require(len(heads) == k, f"--k {k}: the profile has only {len(heads)} {role} heads")
            plan[f"-{k} {role}"] = [(b, h) for b, h, _ in heads]
    settings = {"model": model, "profile": str(profile_path), "prompts": n_prompts, "seed": seed}
    rows = {}
    for name, heads in tqdm(plan.items(), desc="models", unit="model"):
        path = work / (name.replace(" ", "_") + ".json")
        if path.is_file() and json.loads(path.read_text())["settings"] == settings:
            rows[name] = json.loads(path.read_text())["row"]
            continue
        gates = Gates.ones(bundle.transformer)
        for b, h in heads:
            gates.self_heads[b][h] = 0.0
        with gated(bundle.transformer, Gates(self_heads=gates.self_heads)):
            scores, _ = evaluate_model(bundle, prompts, seed=seed, per_video=True, progress=False)
        rows[name] = {"removed": [list(x) for x in heads], **scores}
        write_json(path, {"settings": settings, "row": rows[name]})
    tests = {}
    for k in ks:
        # paired over the same prompts and seeds: (temporal removal) - (spatial removal)
        diff = paired_difference(rows[f"-{k} spatial"]["per_video"], rows[f"-{k} temporal"]["per_video"])
        tests[str(k)] = {m: {**diff[m], "verdict": verdict(diff[m], sign)} for m, sign in PREDICTED.items() if m in diff}
    drops = {name: paired_difference(rows["teacher"]["per_video"], row["per_video"])
             for name, row in rows.items() if name != "teacher"}  # fmt: skip
    for row in rows.values():
        row.pop("per_video")
    return {**settings, "rows": rows, "tests": tests, "drops": drops, "role_counts": profile["role_counts"]}


def _cell(m: str, v: float) -> str:
    return f"{v:.1f}" if m in ("colour", "shape", "count", "direction", "speed", "fd") else f"{v:.3f}"


def markdown(result: dict) -> str:
    lines = [f"Held-out prompts: {result['prompts']} (seed {result['seed']}); model {result['model']}; roles "
             f"{result['role_counts']}.", "", "| model | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]  # fmt: skip
    for name, row in result["rows"].items():
        cells = []
        for m in METRICS:
            d = result["drops"].get(name, {}).get(m)
            cells.append(_cell(m, row[m]) + (f" ({_cell(m, d['diff'])} [{_cell(m, d['low'])}, {_cell(m, d['high'])}])" if d else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "In brackets: the change from the teacher with its 95% paired bootstrap interval.", "",
              "Claim: removing temporal heads hurts direction, speed and motion smoothness more than removing as many "
              "spatial heads; removing spatial heads hurts shape more. Difference (temporal removal) - (spatial "
              "removal), paired, with its 95% interval:", "",
              "| k | " + " | ".join(PREDICTED) + " |", "|---|" + "---|" * len(PREDICTED)]  # fmt: skip
    for k, test in result["tests"].items():
        cells = [f"{_cell(m, t['diff'])} [{_cell(m, t['low'])}, {_cell(m, t['high'])}] {t['verdict']}"
                 for m, t in test.items()]  # fmt: skip
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["rows"])
    metrics = ("colour", "shape", "count", "direction", "speed")
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2, 3.4))
    width = 0.8 / len(metrics)
    for i, m in enumerate(metrics):
        xs = [j + i * width for j in range(len(names))]
        ys = [result["rows"][n][m] for n in names]
        d = [result["drops"].get(n, {}).get(m) for n in names]
        err = [[(r["diff"] - r["low"]) if r else 0 for r in d], [(r["high"] - r["diff"]) if r else 0 for r in d]]
        ax.bar(xs, ys, width, label=m, yerr=err, capsize=1.5, error_kw={"lw": 0.6})
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, fontsize=8)
    ax.set_ylabel("accuracy on held-out prompts (%)")
    ax.set_ylim(0, 105)
    ax.set_title("removing the k most important temporal vs spatial heads (no retraining; bars: 95% paired "
                 "interval of the change)", fontsize=9)  # fmt: skip
    ax.legend(fontsize=8, ncols=len(metrics), loc="lower left")
    save_figure(fig, path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:shapes-t2v")
    p.add_argument("--profile", type=Path, required=True, help="heads.json of `pare profile` on the same model")
    p.add_argument("--k", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, required=True, help="folder of the per-model scores (a re-run skips them)")
    p.add_argument("--out", type=Path, default=Path("docs/role_experiment"))
    a = p.parse_args()
    torch.set_grad_enabled(False)
    require(a.profile.is_file(), f"--profile {a.profile}: expected the heads.json of `pare profile`")
    result = run(a.model, a.profile, a.k, a.prompts, a.seed, a.work)
    write_result(a.out, result, markdown(result), plot)
    return 0


if __name__ == "__main__":
    sys.exit(script_exit(main))
