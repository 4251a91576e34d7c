"""A strip of generated frames per prompt, as a PNG for the README.

    python scripts/frames_figure.py --model builtin:shapes-t2v --out docs/teacher_frames.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from pare.generate import generate
from pare.io import atomic_path
from pare.loading import load_bundle
from pare.sampling import SamplerConfig

PROMPTS = ["a red circle moving right slowly", "a blue square bouncing", "a yellow triangle circling",
           "a green circle and a white square moving down quickly"]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:shapes-t2v")
    p.add_argument("--out", type=Path, default=Path("docs/teacher_frames.png"))
    p.add_argument("--scale", type=int, default=3)
    a = p.parse_args()
    torch.set_grad_enabled(False)
    bundle = load_bundle(a.model)
    gen = generate(bundle, PROMPTS, SamplerConfig(**bundle.sampler_defaults), progress=False)
    rows = []
    for video in gen.videos.numpy():  # (F, H, W, 3)
        gap = np.full((video.shape[1], 2, 3), 255, np.uint8)
        rows.append(np.concatenate([x for f in video for x in (f, gap)], axis=1))
    sep = np.full((2, rows[0].shape[1], 3), 255, np.uint8)
    grid = np.concatenate([x for r in rows for x in (r, sep)], axis=0)
    grid = grid.repeat(a.scale, 0).repeat(a.scale, 1)
    import imageio.v2 as imageio

    with atomic_path(a.out) as tmp:
        imageio.imwrite(tmp, grid)
    print("rows, top to bottom:", *PROMPTS, sep="\n  ")


if __name__ == "__main__":
    main()
