"""Which steps of a few-step model a cut of it can take: sample held-out prompts with the model at some of its steps
and the cut at the others (each its whole model), and score each pattern with the domain evaluator.

    python scripts/step_hybrid.py --student RUNS/student/model --cut RUNS/cut/model --pattern SSSC --pattern CSSS

A pattern has one letter per step of the student's schedule: S runs the student, C the cut. Both must sample on
the same levels. Videos use the seeds of `scripts/compare_models.py` (video i: seed + i), so the patterns SSSS and
CCCC reproduce its rows for the two models. Prints a table; --out writes it as JSON. With the all-S pattern among
them, `weakest` in the JSON (and the last line printed) names the steps of the pattern that loses the most against
it: the lowest worst score, ties broken by the lowest mean (the group a further `pare step-distill --only-steps`
sitting trains).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pare import PareError, load_bundle
from pare.arch import is_image_to_video
from pare.errors import require
from pare.io import write_json
from pare.sampling import Conditioning, SamplerConfig, sample

SCORES = ("colour", "shape", "count", "direction", "speed")
BATCH = 64


class StepHybrid(nn.Module):
    """Runs `student` at the steps `pattern` marks S and `cut` at those it marks C, found by the timestep."""

    def __init__(self, student: nn.Module, cut: nn.Module, levels: list[float], pattern: str):
        super().__init__()
        self.student, self.cut, self.levels, self.pattern = student, cut, levels, pattern
        self.config, self.blocks = student.config, student.blocks  # what the sampler reads

    def forward(self, hidden_states, timestep, **kwargs):
        t = float(timestep[0].max())  # with a timestep per token: that of the tokens being denoised
        step = int(np.argmin([abs(t - level * 1000.0) for level in self.levels]))
        model = self.student if self.pattern[step] == "S" else self.cut
        return model(hidden_states=hidden_states, timestep=timestep, **kwargs)


def hybrid_videos(student, cut, pattern: str, prompts: list[str], seed: int = 0) -> np.ndarray:
    """The videos of `prompts` sampled on the student's schedule with `pattern`'s model at each step."""
    levels = student.sampler_defaults["sigmas"]
    model = StepHybrid(student.transformer, cut.transformer, levels, pattern)
    shape = (student.transformer.config.out_channels, *student.latent.latent_shape(*student.default_shape))
    videos = []
    for lo in range(0, len(prompts), BATCH):
        chunk = prompts[lo : lo + BATCH]
        text = student.prompt_encoder.encode(chunk, "cpu", torch.float32)
        config = SamplerConfig(**{**student.sampler_defaults, "seed": seed + lo})
        with torch.no_grad():
            latents = sample(model, Conditioning(text), shape, config, progress=False).latents
        videos.append(np.asarray(student.decoder.decode(latents)))
    return np.concatenate(videos)


def weakest(rows: dict[str, dict[str, float]]) -> str:
    """The steps (1-based, comma-separated) the cut runs in the pattern whose scores fall furthest below the
    all-student pattern's: the lowest worst change, ties broken by the lowest mean change."""
    base = rows["S" * len(next(iter(rows)))]
    changes = {p: [r[k] - base[k] for k in SCORES] for p, r in rows.items() if "C" in p}
    require(changes, "the weakest pattern needs patterns with C beside the all-S one")
    p = min(changes, key=lambda q: (min(changes[q]), sum(changes[q]) / len(SCORES)))
    return ",".join(str(i + 1) for i, c in enumerate(p) if c == "C")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", required=True, help="the few-step model (a PARE folder)")
    parser.add_argument("--cut", required=True, help="its cut, sampling on the same levels")
    parser.add_argument("--pattern", action="append", required=True, help="S or C per step, e.g. SSSC (repeatable)")
    parser.add_argument("--prompts", type=int, default=256, help="held-out prompts (the verdict set: 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first video; video i uses seed + i")
    parser.add_argument("--out", type=Path, help="write the table as JSON here")
    args = parser.parse_args(argv)
    try:
        from pare.shapes.domain import heldout_prompts
        from pare.shapes.evaluate import evaluate_videos

        student, cut = load_bundle(args.student), load_bundle(args.cut)
        levels = student.sampler_defaults.get("sigmas")
        require(levels, f"{args.student} samples on no schedule of its own: expected a few-step model")
        require(cut.sampler_defaults.get("sigmas") == levels, f"{args.cut} samples on other levels than {args.student}")
        require(not is_image_to_video(student.transformer), f"{args.student} is an image-to-video model: this script samples "
                "text-to-video models only")  # fmt: skip
        for p in args.pattern:
            require(len(p) == len(levels) and set(p) <= {"S", "C"},
                    f"--pattern takes S or C for each of the {len(levels)} steps, got {p!r}")  # fmt: skip
        prompts = heldout_prompts(args.prompts)
        rows = {}
        print("| pattern | " + " | ".join(SCORES) + " |\n|---|" + "---|" * len(SCORES))
        for p in args.pattern:
            scores = evaluate_videos(hybrid_videos(student, cut, p, prompts, args.seed), prompts)
            rows[p] = {k: scores[k] for k in SCORES}
            print(f"| {p} | " + " | ".join(f"{rows[p][k]:.1f}" for k in SCORES) + " |", flush=True)
        weak = weakest(rows) if "S" * len(levels) in rows and any("C" in p for p in rows) else None
    except PareError as e:
        print(f"step_hybrid.py: error: {e}", file=sys.stderr)
        return 2
    if args.out:
        write_json(args.out, {"student": args.student, "cut": args.cut, "prompts": args.prompts, "seed": args.seed,
                              "patterns": rows, **({"weakest": weak} if weak else {})})  # fmt: skip
    if weak:
        print(f"weakest: steps {weak}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
