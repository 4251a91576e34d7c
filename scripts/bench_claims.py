"""Paired tests of claims between the rows of a finished `pare bench` run, from the videos it keeps.

    python scripts/bench_claims.py --bench runs/claims/bench --out docs/claims/bench_claims --equal-flops \
        [--claim "width + depth 0.55>First Block Cache threshold 0.2" ...]

A row is named as `results.md` shows it: its method, then its setting if it has one ("TaylorSeer interval 2,
order 1", "width 25%+25%"). Every row of a bench samples the same prompts from the same seeds, and the bench
keeps each one's videos (BENCH/methods/*.npz), so two rows can be compared video by video: each named row is
scored per video and each claim "A>B" tested as `compare_models.py` tests it (95% paired bootstrap per metric;
supported / refuted / inconclusive / mixed on the domain's accuracies), against the teacher too, with each row's
FLOPs per step beside it. `--equal-flops` adds the claims "PARE beats the caches at equal FLOPs": each PARE row
against the cache row nearest to it in FLOPs per step, and each PARE + cache row against the nearest cache row
and the nearest PARE row. Writes OUT.json, OUT.md and OUT.png (the table and plot of compare_models.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from compare_models import METRICS, markdown, parse_claim, plot, summarize

from pare.errors import PareError, require, script_exit
from pare.evaluation.bench import store_slug
from pare.generate import heldout_images
from pare.io import write_result
from pare.loading import load_bundle
from pare.shapes.evaluate import evaluate_videos


def row_name(row: dict) -> str:
    return f"{row['method']} {row['setting']}".strip()


def stored_videos(bench: Path, row: dict, key: dict) -> np.ndarray:
    """The videos of `row` kept by the bench: the file named after its method and setting whose key holds the
    bench's prompts and sampler (a run of other prompts may have left another)."""
    for path in sorted((bench / "methods").glob(f"{store_slug(row['method'], row['setting'])}-*.npz")):
        with np.load(path) as f:
            stored = json.loads(str(f["key"]))
            if stored["prompts"] == key["prompts"] and stored["sampler"] == key["sampler"]:
                return f["videos"]
    raise PareError(f"{bench}/methods holds no videos of {row_name(row)!r} for this bench's prompts: re-run the bench")


def equal_flops_claims(rows: list[dict]) -> list[tuple[str, str]]:
    """(A, B) pairs: each PARE row against the cache row nearest in FLOPs per step; each PARE + cache row against
    the nearest cache row and the nearest PARE row (ties: the cheaper row)."""

    def nearest(row, family):
        pool = [r for r in rows if r["family"] == family]
        return [min(pool, key=lambda r: (abs(r["flops_ratio"] - row["flops_ratio"]), r["flops_ratio"]))] if pool else []

    pairs = []
    for row in rows:
        others = {"PARE": nearest(row, "cache"), "PARE + cache": nearest(row, "cache") + nearest(row, "PARE")}
        pairs += [(row_name(row), row_name(other)) for other in others.get(row["family"], [])]
    return pairs


def run(bench: Path, claims: list[tuple[str, str]], equal_flops: bool = False) -> dict:
    path = bench / "results.json"
    require(path.is_file(), f"--bench {bench}: expected the --out folder of a finished `pare bench` (results.json)")
    result = json.loads(path.read_text())
    rows = {row_name(r): r for r in result["rows"] if "why_not" not in r}
    if equal_flops:
        claims = claims + [c for c in equal_flops_claims(list(rows.values())) if c not in claims]
    require(claims, "no claim to test: pass --claim A>B or --equal-flops (a bench with PARE and cache rows)")
    teacher = result["rows"][0]
    names = [row_name(teacher)] + list(dict.fromkeys(n for c in claims for n in c if n != row_name(teacher)))
    for name in names:
        require(name in rows, f"--claim: {name!r} is not a row of {path}; the rows are: {', '.join(rows)}")
    prompts, sampler = result["prompts"], result["sampler"]
    images = heldout_images(load_bundle(teacher["model"]), prompts)  # an I2V bench's first frames
    # a row's own sampling cost where the bench recorded it (a few-step model's), else the shared sampler's
    steps, passes = sampler["steps"], 2 if sampler["guidance_scale"] > 1 else 1
    scored = {}
    for name in names:
        row = rows[name]
        scores = evaluate_videos(stored_videos(bench, row, result), prompts, per_video=True, images=images)
        scored[name] = {"model": row["model"], "flops_ratio": row["flops_ratio"],
                        "video_flops_ratio": row.get("video_flops_ratio", row["flops_ratio"]),
                        "seconds_per_video": row["seconds_per_video"], "steps": row.get("steps", steps),
                        "passes": row.get("passes", passes),
                        "psnr_to_reference": row["psnr"] if name != names[0] else None, "held_out_error": None,
                        **{m: scores[m] for m in (*METRICS, "subject_consistency", "first_frame_psnr") if m in scores},
                        "per_video": scores["per_video"]}  # fmt: skip
    return {"prompts": len(prompts), "seed": sampler["seed"], "sampler": sampler, "bench": str(bench),
            **summarize(scored, claims, [])}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", type=Path, required=True, help="the --out folder of a finished `pare bench`")
    p.add_argument("--claim", action="append", default=[], help="A>B: row A scores higher than row B")
    p.add_argument("--equal-flops", action="store_true", help="each PARE row against the nearest cache row in "
                   "FLOPs (and each PARE + cache row against the nearest cache and PARE rows)")
    p.add_argument("--out", type=Path, required=True, help="OUT.json, OUT.md, OUT.png")
    a = p.parse_args()
    torch.set_grad_enabled(False)

    def body():
        result = run(a.bench, [parse_claim(c) for c in a.claim], a.equal_flops)
        write_result(a.out, result, markdown(result), plot)

    return script_exit(body)


if __name__ == "__main__":
    sys.exit(main())
