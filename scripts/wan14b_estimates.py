"""Peak memory per GPU and wall time of every stage of `pare compress --preset wan-14b` (pare.compress.PRESETS)
for Wan2.1-T2V-14B at 480p, 81 frames (32,760 tokens), on 8 GPUs: one markdown table, with each stage's command
exactly as `pare compress` runs it.

    python scripts/wan14b_estimates.py [--tflops 400] [--limit-gib 80] [--components]

Everything is built on the meta device (no weights, seconds on a CPU) and estimated by `pare.estimate` at the
preset's own settings (profile shape, sampling shard, global batch, FSDP, gradient checkpointing); a stage over
--limit-gib is marked "(over)".
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from pare import arch
from pare.compress import CompressConfig, plan
from pare.distill import DistillConfig
from pare.distill.data import DataConfig
from pare.estimate import (DEFAULT_TFLOPS, GIB, StageEstimate, estimate_data, estimate_distill, estimate_profile,
                           estimate_prune, estimate_route, format_hours, pruned_structure, text_encoder_bytes)  # fmt: skip
from pare.loading import load_bundle
from pare.profiling import ProfileConfig
from pare.pruning import PruneConfig
from pare.routing import RouteConfig

MODEL = "wan2.1-t2v-14b"
SHAPE = (81, 480, 832)  # frames, height, width
SAMPLING_STEPS = 25  # the sampler's default for a Wan pipeline folder (pare.sampling.SamplerConfig)
GUIDANCE = 5.0
WAN, PROMPTS, RUN = "WAN_FOLDER", "prompts.txt", "runs/wan14b"


@dataclass
class Row:
    stage: str
    estimate: StageEstimate
    command: str
    fits: bool
    note: str = ""


def commands(c: CompressConfig) -> dict[str, str]:
    """The stage commands `pare compress --preset wan-14b --model WAN_FOLDER --prompts prompts.txt --out
    runs/wan14b` runs, with the folders as typed."""
    stages = plan(WAN, Path(RUN), c, SAMPLING_STEPS)
    here = str(Path.cwd()) + os.sep
    return {s.name: s.command().replace(here, "") for s in stages if s.argv}


def rows(limit_gib: float = 80.0) -> list[Row]:
    c = CompressConfig(preset="wan-14b").resolved()
    cmd = commands(CompressConfig(**{**c.__dict__, "prompts": Path(PROMPTS)}))
    gpus, limit = c.processes, int(limit_gib * GIB)
    bundle = load_bundle(MODEL, weights=False)
    teacher, L = bundle.transformer, bundle.text_tokens
    grid = arch.token_grid(teacher.config, bundle.latent, *SHAPE)
    small = arch.token_grid(teacher.config, bundle.latent, *(c.profile_shape or SHAPE))
    student = pruned_structure(teacher, c.heads, c.ffn, c.heads_multiple_of)
    t5 = text_encoder_bytes(MODEL)
    out: list[Row] = []

    def add(name: str, est: StageEstimate, note: str = "") -> None:
        out.append(Row(name, est, cmd[name], est.total <= limit, note))

    profile = ProfileConfig(videos=c.profile_videos, steps=SAMPLING_STEPS, batch_size=1).resolved({})
    prune = PruneConfig(c.heads, c.ffn, heads_multiple_of=c.heads_multiple_of)
    at_480p = estimate_profile(teacher, grid, L, profile, guidance=GUIDANCE, text_encoder=t5)
    shape_note = "" if small == grid else f"at {small.tokens:,} tokens (at 480p: {at_480p.total / GIB:,.0f} GiB)"
    add("profile", estimate_profile(teacher, small, L, profile, guidance=GUIDANCE, text_encoder=t5), shape_note)
    add("prune", estimate_prune(teacher, student, small, L, prune, sampling_steps=SAMPLING_STEPS,
                                kept_steps=len(profile.timesteps), guidance=GUIDANCE, text_encoder=t5),
        "calibrates at the profile's shape")  # fmt: skip
    add("data", estimate_data(teacher, grid, L, DataConfig(c.data_videos, c.shard_videos),
                              sampling_steps=SAMPLING_STEPS, guidance=GUIDANCE, text_encoder=t5))  # fmt: skip
    per_gpu = f"global batch {c.batch_size}: {c.batch_size // gpus} example(s), {2 * c.batch_size // gpus} sequences per GPU"
    distill = DistillConfig(steps=c.distill_steps, batch_size=c.batch_size, gradient_checkpointing=c.gradient_checkpointing)
    add("distill", estimate_distill(student, teacher, grid, L, distill, processes=gpus, fsdp=c.fsdp), per_gpu)
    examples = (c.data_videos - c.shard_videos) * SAMPLING_STEPS  # the last shard is held out
    route = RouteConfig(steps=c.route_steps, batch_size=c.batch_size, budget=c.budget,
                        gradient_checkpointing=c.gradient_checkpointing)  # fmt: skip
    add("route", estimate_route(student, grid, L, route, processes=gpus, fsdp=c.fsdp, train_examples=examples), per_gpu)
    return out


def markdown(table: list[Row], tflops: float, gpus: int, limit_gib: float) -> str:
    lines = [f"Wan2.1-T2V-14B, 480p 81 frames ({SHAPE[1]}x{SHAPE[2]}, 32,760 tokens), `wan-14b` preset, {gpus} GPUs of "
             f"{limit_gib:g} GB; time at {tflops:g} TFLOP/s sustained per GPU (`python scripts/wan14b_estimates.py`):",
             "", "| stage | GPUs | peak GiB per GPU | phase at the peak | estimated wall time | command |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in table:
        mark = "" if r.fits else " (over)"
        lines.append(f"| {r.stage} | {r.estimate.processes} | {r.estimate.total / GIB:.1f}{mark} | {r.estimate.peak.name} "
                     f"| {format_hours(r.estimate.hours(tflops))} | `{r.command}` |")  # fmt: skip
    notes = [f"- {r.stage}: {r.note}" for r in table if r.note]
    return "\n".join(lines + ([""] + notes if notes else []))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tflops", type=float, default=DEFAULT_TFLOPS)
    p.add_argument("--limit-gib", type=float, default=80.0)
    p.add_argument("--components", action="store_true", help="also print every stage's components")
    a = p.parse_args()
    table = rows(a.limit_gib)
    print(markdown(table, a.tflops, table[-1].estimate.processes, a.limit_gib))
    if a.components:
        for r in table:
            print("\n" + r.estimate.table(a.tflops))


if __name__ == "__main__":
    main()
