"""Is model B's score on the shapes domain really different from model A's? A paired comparison.

    python scripts/compare_scores.py runs/eval256-teacher/scores.json runs/eval256-student/scores.json

Both files come from `pare eval-shapes --model ... --n N --out DIR` with the same --n and --seed (same prompts,
same starting noise). Prints, per metric, A, B, B - A in points and a 95% paired bootstrap interval of B - A
(videos resampled together), so a difference can be told from what another set of prompts would change.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pare.errors import require, script_exit
from pare.shapes.evaluate import paired_difference


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path, help="scores.json of the reference (e.g. the teacher)")
    parser.add_argument("b", type=Path, help="scores.json of the model compared with it")
    parser.add_argument("--resamples", type=int, default=2000)
    args = parser.parse_args()
    runs = []
    for path in (args.a, args.b):
        data = json.loads(path.read_text()) if path.is_file() else {}
        require("per_video" in data,
                f"{path}: expected a scores.json written by `pare eval-shapes --out` (with per_video)")  # fmt: skip
        runs.append(data["per_video"])
    result = paired_difference(*runs, resamples=args.resamples)
    print(f"{len(runs[0])} paired videos; A = {args.a}, B = {args.b}")
    print(f"{'metric':<10} {'A':>6} {'B':>6} {'B - A':>7}   95% interval of B - A")
    for metric, r in result.items():
        f = ".3f" if metric == "motion_smoothness" else ".1f"  # a score in [0, 1]; the others in percent
        print(f"{metric[:10]:<10} {r['a']:>6{f}} {r['b']:>6{f}} {r['diff']:>+7{f}}   [{r['low']:+{f}}, {r['high']:+{f}}]")
    return 0


if __name__ == "__main__":
    sys.exit(script_exit(main))
