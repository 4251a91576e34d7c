"""The two head-removal measures of `pare profile`, side by side on the same calibration inputs: time and ranking.

    python scripts/removal_timing.py --model builtin:shapes-t2v

Prints one table: seconds of each measure (timed in this one run, in turn), their ratio, and how alike they rank
the heads (Spearman over all heads and within blocks; overlap of the heads a 25% and a 40% cut would remove by
the measure alone).
"""

from __future__ import annotations

import argparse
import time

import torch

from pare.loading import load_bundle
from pare.profiling import ProfileConfig
from pare.profiling.calibration import calibrate, default_prompts
from pare.profiling.importance import block_removal_error, removal_error
from pare.sampling import SamplerConfig


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:shapes-t2v")
    a = p.parse_args()
    torch.set_grad_enabled(False)
    bundle = load_bundle(a.model)
    # the profile command's defaults: 16 trajectories, 5 kept steps, batch 8
    config = ProfileConfig().resolved(bundle.sampler_defaults)
    sampler = SamplerConfig(**{**bundle.sampler_defaults, "steps": config.steps, "seed": config.seed})
    prompts = default_prompts(bundle, None, config.videos, config.seed)
    calib = calibrate(bundle, prompts, sampler, config.timesteps, bundle.default_shape, batch_size=config.batch_size)
    model = bundle.transformer
    seconds, errors = {}, {}
    for name, measure in (("block", block_removal_error), ("model", removal_error)):
        start = time.perf_counter()
        errors[name] = measure(model, calib, config.batch_size)
        seconds[name] = time.perf_counter() - start
    blk, mdl = errors["block"], errors["model"]
    within = sum(spearman(x, y) for x, y in zip(blk, mdl)) / len(blk)
    print(f"{a.model}: {len(calib)} calibration inputs, {blk.shape[0]} blocks x {blk.shape[1]} heads")
    print("| measure | seconds |\n|---|---|")
    for name in seconds:
        print(f"| --removal {name} | {seconds[name]:.1f} |")
    print(f"model / block time: {seconds['model'] / seconds['block']:.2f}x")
    print(f"Spearman over all heads {spearman(blk.flatten(), mdl.flatten()):.2f}, within blocks {within:.2f}")
    for share in (0.25, 0.4):
        k = round(share * blk.numel())
        same = len(set(blk.flatten().argsort()[:k].tolist()) & set(mdl.flatten().argsort()[:k].tolist()))
        print(f"lowest {share:.0%} of heads ({k}): {same} the same")


if __name__ == "__main__":
    main()
