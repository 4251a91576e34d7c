"""Does a step-distilled student generalise, or has it memorised its training videos?

    python scripts/step_memorisation.py --model runs/steps4/model --data runs/data-steps --train-shards 0 1

The student's errors to the teacher (relative squared error, as `pare step-distill` validates: the segment
velocities, and its K-step samples from each video's starting noise against the teacher's final latent) on a
few training shards and on the held-out shard (the last). Samples far closer to the teacher on training videos
than on held-out ones mean the student learnt those videos' noise-to-video map, not the teacher's: more teacher
videos (`pare data --videos`) is then the lever, not more steps.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from pare.errors import require
from pare.loading import load_bundle
from pare.stepdistill import SegmentData, StepDistillStage


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a `pare step-distill` model folder")
    p.add_argument("--data", type=Path, required=True, help="the `pare data` folder it was distilled on")
    p.add_argument("--train-shards", type=int, nargs="+", default=[0, 1], help="training shards to score")
    p.add_argument("--batch-size", type=int, default=32)
    a = p.parse_args()
    bundle = load_bundle(a.model)
    training = bundle.manifest.get("training") or {}
    require("boundaries" in training, f"{a.model}: expected a `pare step-distill` model (its pare.json names the "
            "teacher steps its segments start at)")  # fmt: skip
    model = bundle.transformer.eval()
    held_out = len(SegmentData(a.data, training["boundaries"]).entries) - 1
    require(all(0 <= s < held_out for s in a.train_shards), f"--train-shards: expected shards 0..{held_out - 1}")
    print(f"{'shards':<22} {'examples':>8} {'videos':>6} {'segment error':>14} {'sample error':>13}")
    for name, shards in (("training " + ",".join(map(str, a.train_shards)), a.train_shards),
                         (f"held-out {held_out}", [held_out])):  # fmt: skip
        data = SegmentData(a.data, training["boundaries"], shards)
        # the stage's own validation, without the rest of the stage (it needs no settings to score)
        sums = StepDistillStage.validate(None, model, data, list(range(len(data))), "cpu", a.batch_size)
        print(f"{name:<22} {sums['examples']:>8} {sums['videos']:>6} {sums['error'][0] / sums['error'][1]:>14.4f} "
              f"{sums['final_error'][0] / sums['final_error'][1]:>13.4f}")


if __name__ == "__main__":
    main()
