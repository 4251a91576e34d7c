"""Peak memory per GPU and wall time of every stage of the `wan-14b` recipe (pare.compress.PRESETS) for
Wan2.1-T2V-14B at 480p, 81 frames (32,760 tokens), on 8 GPUs: one markdown table, with the command to run.

    python scripts/wan14b_estimates.py [--gpus 8] [--tflops 400] [--limit-gib 80]

Everything is built on the meta device (no weights, seconds on a CPU) and estimated by `pare.estimate`. Where a
stage at the preset's own settings would not fit in --limit-gib, the command takes the largest setting that
fits (sampling shard, global batch) and says so; a stage that fits at no setting is marked.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

from pare import arch
from pare.compress import PRESETS
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
# Where the profile's Taylor pass does not fit at 480p (without gradient checkpointing it keeps every block's
# activations), the heads are profiled on a shorter, smaller video (5 latent frames, 1,950 tokens).
PROFILE_SHAPE = (17, 240, 416)
SAMPLING_STEPS = 25  # the sampler's default for a Wan pipeline folder (pare.sampling.SamplerConfig)
GUIDANCE = 5.0
WAN, PROMPTS, RUN = "WAN_FOLDER", "prompts.txt", "runs/wan14b"
FSDP = ("accelerate launch --num_processes {gpus} --mixed_precision bf16 --use_fsdp --fsdp_sharding_strategy FULL_SHARD "
        "--fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP --fsdp_transformer_layer_cls_to_wrap WanTransformerBlock "
        "--fsdp_state_dict_type FULL_STATE_DICT --fsdp_use_orig_params true -m pare.cli")  # fmt: skip


@dataclass
class Row:
    stage: str
    estimate: StageEstimate
    command: str
    fits: bool
    note: str = ""


def _largest(make, candidates, limit: int):
    """(estimate, value) for the first of `candidates` whose estimate fits in `limit` bytes, else the last one."""
    for value in candidates:
        est = make(value)
        if est.total <= limit:
            return est, value
    return est, value


def rows(gpus: int = 8, limit_gib: float = 80.0) -> list[Row]:
    preset = PRESETS["wan-14b"]
    limit = int(limit_gib * GIB)
    bundle = load_bundle(MODEL, weights=False)
    teacher, L = bundle.transformer, bundle.text_tokens
    grid = arch.token_grid(teacher.config, bundle.latent, *SHAPE)
    small = arch.token_grid(teacher.config, bundle.latent, *PROFILE_SHAPE)
    student = pruned_structure(teacher, preset["heads"], preset["ffn"], preset["heads_multiple_of"])
    t5 = text_encoder_bytes(MODEL)
    common = f"--prompts {PROMPTS} --device cuda --dtype bf16"
    out: list[Row] = []

    # the heads are profiled at 480p when the Taylor pass (one input per forward) and then prune's calibration
    # (which runs at the profile's shape) fit there, else on a shorter, smaller video
    profile = ProfileConfig(videos=preset["profile_videos"], steps=SAMPLING_STEPS, batch_size=1)
    prune = PruneConfig(preset["heads"], preset["ffn"], heads_multiple_of=preset["heads_multiple_of"])
    at_480p = estimate_profile(teacher, grid, L, profile, guidance=GUIDANCE, text_encoder=t5)
    prune_480p = estimate_prune(teacher, student, grid, L, replace(prune, calibration_videos=1),
                                sampling_steps=SAMPLING_STEPS, kept_steps=len(profile.timesteps), guidance=GUIDANCE,
                                text_encoder=t5)  # fmt: skip
    fits = at_480p.total <= limit and prune_480p.total <= limit
    where, shape = (grid, SHAPE) if fits else (small, PROFILE_SHAPE)
    est = estimate_profile(teacher, where, L, profile, guidance=GUIDANCE, text_encoder=t5)
    f, h, w = shape
    out.append(Row("profile", est, f"pare profile --model {WAN} --videos {profile.videos} --frames {f} --height {h} "
                   f"--width {w} --batch-size 1 {common} --out {RUN}/profile", est.total <= limit,
                   "" if shape == SHAPE else f"at {small.tokens:,} tokens; at 480p: {at_480p.total / GIB:,.0f} GiB, "
                   f"and then prune {prune_480p.total / GIB:,.0f} GiB"))  # fmt: skip

    make = lambda v: estimate_prune(teacher, student, where, L, replace(prune, calibration_videos=v),  # noqa: E731
                                    sampling_steps=SAMPLING_STEPS, kept_steps=len(profile.timesteps), guidance=GUIDANCE,
                                    text_encoder=t5)  # fmt: skip
    est, videos = _largest(make, range(prune.calibration_videos, 0, -1), limit)
    out.append(Row("prune", est, f"pare prune --model {WAN} --profile {RUN}/profile/heads.json --heads {prune.heads} "
                   f"--ffn {prune.ffn} --heads-multiple-of {prune.heads_multiple_of} --calibration-videos {videos} "
                   f"{common} --out {RUN}/prune", est.total <= limit, "calibrates at the profile's shape" + (
                       "" if videos == prune.calibration_videos else f"; the default --calibration-videos "
                       f"{prune.calibration_videos} needs {make(prune.calibration_videos).total / GIB:.0f} GiB")))  # fmt: skip

    videos = preset["data_videos"]
    preset_shard = max(1, min(8, videos // 4))  # what `pare compress` passes
    est, shard = _largest(lambda s: estimate_data(teacher, grid, L, DataConfig(videos, s), sampling_steps=SAMPLING_STEPS,
                                                  guidance=GUIDANCE, text_encoder=t5),
                          range(preset_shard, 0, -1), limit)  # fmt: skip
    out.append(Row("data", est, f"pare data --teacher {WAN} --videos {videos} --shard-videos {shard} {common} "
                   f"--out {RUN}/data", est.total <= limit,
                   "" if shard == preset_shard else f"the preset's --shard-videos {preset_shard} needs "
                   f"{estimate_data(teacher, grid, L, DataConfig(videos, preset_shard), sampling_steps=SAMPLING_STEPS, guidance=GUIDANCE, text_encoder=t5).total / GIB:.0f} GiB"))  # fmt: skip

    batches = range(preset["batch_size"], 0, -gpus)
    launch = FSDP.format(gpus=gpus)
    distill = DistillConfig(steps=preset["distill_steps"], gradient_checkpointing=True, lr_schedule="cosine",
                            guided_weight=1.0)  # fmt: skip
    est, batch = _largest(lambda b: estimate_distill(student, teacher, grid, L, replace(distill, batch_size=b),
                                                     processes=gpus), batches, limit)  # fmt: skip
    out.append(Row("distill", est, f"{launch} distill --teacher {WAN} --student {RUN}/prune --data {RUN}/data "
                   f"--out {RUN}/distill --steps {distill.steps} --batch-size {batch} --gradient-checkpointing "
                   f"--lr-schedule cosine --guided-weight 1.0", est.total <= limit,
                   _batch_note(batch, preset["batch_size"], gpus)))  # fmt: skip

    examples = (videos - preset_shard) * SAMPLING_STEPS  # the last shard is held out
    # `pare route` has no --gradient-checkpointing (RouteConfig has the knob; the command does not pass it)
    route = RouteConfig(steps=preset["route_steps"], budget=preset["budget"])
    est, batch = _largest(lambda b: estimate_route(student, grid, L, replace(route, batch_size=b), processes=gpus,
                                                   train_examples=examples), batches, limit)  # fmt: skip
    ckpt = estimate_route(student, grid, L, replace(route, batch_size=batch, gradient_checkpointing=True),
                          processes=gpus, train_examples=examples)  # fmt: skip
    phases = ", ".join(f"{p.name} {p.total / GIB:.0f} GiB" for p in ckpt.phases)
    out.append(Row("route", est, f"{launch} route --teacher {WAN} --student {RUN}/distill/model --data {RUN}/data "
                   f"--out {RUN}/route --budget {route.budget} --steps {route.steps} --batch-size {batch}",
                   est.total <= limit, f"{_batch_note(batch, preset['batch_size'], gpus)}; the command trains without "
                   f"gradient checkpointing; with it (RouteConfig.gradient_checkpointing): {phases}".lstrip("; ")))  # fmt: skip
    return out


def _batch_note(batch: int, preset: int, gpus: int) -> str:
    if batch == preset:
        return ""
    return f"global batch {batch} ({batch // gpus} example(s), {2 * batch // gpus} sequences per GPU), not the preset's {preset}"


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
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--tflops", type=float, default=DEFAULT_TFLOPS)
    p.add_argument("--limit-gib", type=float, default=80.0)
    p.add_argument("--components", action="store_true", help="also print every stage's components")
    a = p.parse_args()
    table = rows(a.gpus, a.limit_gib)
    print(markdown(table, a.tflops, a.gpus, a.limit_gib))
    if a.components:
        for r in table:
            print("\n" + r.estimate.table(a.tflops))


if __name__ == "__main__":
    main()
