"""Where models of the shapes domain lose the object count against a reference, from the videos that
`scripts/compare_models.py` keeps in its --work folder (one NAME-HASH.npz per model, the same held-out prompts and
seeds for all):

    python scripts/count_misses.py --prompts 256 --reference teacher=runs/cmp/teacher-19f659416a.npz \
        --model "4-step=runs/cmp/4-step-e87f04122e.npz" --model "other=runs/cmp/other-2f26dbff9d.npz" --out runs/misses

For each model, the videos it counts wrong and the reference right (lost) and the other way round (won); of the
lost, those with fewer objects than the prompt asks and those with more; of the two-object videos that lack one of
the prompt's colours, how often the dropped object is the smaller of the two in the reference's video and how often
it is the prompt's second (beside how often the second is the smaller in the reference's two-object videos that it
counts right, so that order can be told from size); and how many lost videos the models share. Writes OUT.json,
OUT.md and OUT.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from compare_models import named

from pare.errors import require, script_exit
from pare.io import save_figure, write_result
from pare.shapes import domain
from pare.shapes.domain import heldout_prompts
from pare.shapes.evaluate import colour_area, count_misses, score_video, to_frames01


def load_videos(path: str, n: int) -> np.ndarray:
    require(Path(path).is_file(), f"{path}: no such file (expected a video .npz of scripts/compare_models.py's --work)")
    with np.load(path) as f:
        require("videos" in f.files, f"{path}: expected a .npz with a `videos` array (compare_models.py's --work)")
        videos = f["videos"]
    require(videos.ndim == 5 and len(videos) >= n, f"{path}: expected at least {n} videos (B, F, H, W, 3), got "
            f"shape {videos.shape}")  # fmt: skip
    return videos[:n]


def run(reference: tuple[str, str], models: list[tuple[str, str]], n: int) -> dict:
    prompts = heldout_prompts(n)
    ref = load_videos(reference[1], n)
    ref_scores = [score_video(video, prompt) for video, prompt in zip(to_frames01(ref), prompts)]
    rows = []
    for name, path in models:
        m = count_misses(ref, load_videos(path, n), prompts, ref_scores)
        rows.append({"model": name, "lost": m["lost"], "won": m["won"], "fewer": m["fewer"], "more": m["more"],
                     "dropped": [[i, c, bool(s), bool(second)] for i, c, s, second in m["dropped"]],
                     "dropped_smaller": sum(d[2] for d in m["dropped"]),
                     "dropped_second": sum(d[3] for d in m["dropped"])})  # fmt: skip
    lost = [set(r["lost"]) for r in rows]
    shared = {"all": sorted(set.intersection(*lost)), "two_or_more": sorted(i for i in set.union(*lost)
              if sum(i in s for s in lost) >= 2), "any": sorted(set.union(*lost))}  # fmt: skip
    return {"prompts": n, "reference": reference[0], "rows": rows, "shared": shared,
            "reference_second_smaller": second_smaller(ref, prompts, ref_scores)}


def second_smaller(videos, prompts: list[str], scores: list[dict] | None = None) -> list[int]:
    """[k, n]: of the n two-object videos whose count is right, the k in which the prompt's second object is drawn
    smaller than its first (the base rate for "the dropped object is the second"); `videos` as `count_misses` takes,
    `scores` their `score_video` rows if the caller has them."""
    k = n = 0
    for i, (video, prompt) in enumerate(zip(to_frames01(videos), prompts)):
        colours = [w for w in prompt.split() if w in domain.COLOURS]
        if len(colours) == 2 and (scores[i] if scores is not None else score_video(video, prompt))["count"]:
            n += 1
            k += colour_area(video, colours[1]) < colour_area(video, colours[0])
    return [k, n]


def markdown(result: dict) -> str:
    lines = [f"Object count against {result['reference']} on {result['prompts']} held-out prompts (same seeds).", "",
             "| model | lost | won | lost: fewer objects | lost: more objects | dropped one of two colours | of those, "
             "the smaller in the reference | of those, the prompt's second |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {len(r['lost'])} | {len(r['won'])} | {r['fewer']} | {r['more']} | "
                     f"{len(r['dropped'])} | {r['dropped_smaller']} | {r['dropped_second']} |")  # fmt: skip
    s = result["shared"]
    k, n = result["reference_second_smaller"]
    lines += ["", f"Lost videos shared: by every model {len(s['all'])}, by two or more {len(s['two_or_more'])}, by any "
              f"{len(s['any'])}.", "", f"In the {n} two-object videos that {result['reference']} counts right, the "
              f"prompt's second object is the smaller in {k}."]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(rows), 3.6))
    fewer = np.array([r["fewer"] for r in rows])
    ax.bar(x - 0.2, fewer, 0.4, label="lost: fewer objects")
    ax.bar(x - 0.2, [r["more"] for r in rows], 0.4, bottom=fewer, label="lost: more objects")
    ax.bar(x + 0.2, [len(r["won"]) for r in rows], 0.4, label="won")
    ax.set_xticks(x, [r["model"] for r in rows], fontsize=7, rotation=15)
    ax.set_ylabel(f"videos of {result['prompts']}")
    ax.set_title(f"object count against {result['reference']}", fontsize=9)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", required=True, help="NAME=VIDEOS.npz")
    p.add_argument("--model", action="append", required=True, help="NAME=VIDEOS.npz (repeatable)")
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--out", type=Path, required=True, help="OUT.json, OUT.md, OUT.png")
    a = p.parse_args()

    def body():
        result = run(named(a.reference, "--reference"), [named(m, "--model") for m in a.model], a.prompts)
        write_result(a.out, result, markdown(result), plot)

    return script_exit(body)


if __name__ == "__main__":
    sys.exit(main())
