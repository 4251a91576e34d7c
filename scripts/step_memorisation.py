"""Does a distilled student generalise, or has it memorised its training videos?

    python scripts/step_memorisation.py --model runs/steps4/model --data runs/data-steps --train-shards 0 1
    python scripts/step_memorisation.py --model runs/distill/model --data runs/data

The student's errors to the teacher on a few training shards and on the held-out shard (the last), as its
training run validates: for a `pare step-distill` student the segment velocities and its K-step samples from each
video's starting noise against the teacher's final latent; for a `pare distill` student the velocities (relative
squared error). Errors far smaller on training videos than on held-out ones mean the student learnt those videos
rather than the teacher: more teacher videos (`pare data --videos`) is then the lever, not more steps.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from pare.distill import velocity_error_sums
from pare.distill.data import TrajectoryData, read_index
from pare.errors import require
from pare.loading import load_bundle
from pare.stepdistill import SegmentData, boundary_rows, segment_error_sums


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a `pare step-distill` or `pare distill` model folder")
    p.add_argument("--data", type=Path, required=True, help="the `pare data` folder it was distilled on")
    p.add_argument("--train-shards", type=int, nargs="+", default=[0, 1], help="training shards to score")
    p.add_argument("--batch-size", type=int, default=32)
    a = p.parse_args()
    bundle = load_bundle(a.model)
    training = bundle.manifest.get("training") or {}
    model = bundle.transformer.eval()
    step = "boundaries" in training  # a step-distilled student: its segments start at the teacher's steps listed
    if step:
        places = boundary_rows(a.data, read_index(a.data), training["boundaries"])
        dataset = lambda shards: SegmentData(a.data, places, shards)  # noqa: E731
    else:
        dataset = lambda shards: TrajectoryData(a.data, shards)  # noqa: E731
    held_out = len(dataset(None).entries) - 1
    require(held_out >= 1, f"{a.data}: expected at least two shards (the last is held out)")
    require(all(0 <= s < held_out for s in a.train_shards), f"--train-shards: expected shards 0..{held_out - 1}")
    ratio = lambda pair: pair[0] / pair[1]  # noqa: E731
    if step:
        print(f"{'shards':<22} {'examples':>8} {'videos':>6} {'segment error':>14} {'sample error':>13}")
    else:
        print(f"{'shards':<22} {'examples':>8} {'velocity error':>15}")
    for name, shards in (("training " + ",".join(map(str, a.train_shards)), a.train_shards),
                         (f"held-out {held_out}", [held_out])):  # fmt: skip
        data = dataset(shards)
        rows = list(range(len(data)))
        if step:  # as `pare step-distill` validates
            sums = segment_error_sums(model, data, rows, "cpu", a.batch_size)
            print(f"{name:<22} {sums['examples']:>8} {sums['videos']:>6} {ratio(sums['error']):>14.4f} "
                  f"{ratio(sums['final_error']):>13.4f}")  # fmt: skip
        else:  # both branches' velocities, as `pare distill` validates
            sums = velocity_error_sums(model, data, rows, "cpu", 1.0, a.batch_size)
            print(f"{name:<22} {sums['examples']:>8} {ratio(sums['error']):>15.4f}")

if __name__ == "__main__":
    main()
