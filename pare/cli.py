"""`pare` command line: a thin layer over the library. Bad input ends in one line on stderr and exit code 2."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from .errors import PareError, require, require_extras
from .io import check_output_dir, check_writable, read_json_object

app = typer.Typer(
    name="pare",
    help="PARE: prune heads and route blocks of video diffusion transformers (Wan2.1 via diffusers).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: it uses the terminal's width (up to 120), not a fixed 80-column box
    context_settings={"max_content_width": 120},
)

# VBench's custom-input dimensions run by default (pare.evaluation.official_vbench.DEFAULT_DIMENSIONS; kept
# here so that the CLI starts without importing torch)
VBENCH_DIMENSIONS = ("subject_consistency", "background_consistency", "motion_smoothness", "dynamic_degree",
                     "aesthetic_quality", "imaging_quality")  # fmt: skip
MODEL_HELP = "builtin:<name>, wan2.1-t2v-1.3b | wan2.1-t2v-14b | wan2.1-i2v-14b (config only), or a model folder"
# Options several commands share, declared once.
ModelSpec = Annotated[str, typer.Option("--model", help=MODEL_HELP)]  # required: no default
Frames = Annotated[int | None, typer.Option(help="video frames [default: the model's]")]
Height = Annotated[int | None, typer.Option(help="video height in pixels [default: the model's]")]
Width = Annotated[int | None, typer.Option(help="video width in pixels [default: the model's]")]
CalibrationPrompts = Annotated[Path | None, typer.Option("--prompts", help="text file, one prompt per line [default for built-in models: the domain's training prompts]")]
FirstFrames = Annotated[Path | None, typer.Option("--images", help="image-to-video models: folder of first frames "
                       "(PNG, JPEG), image i with prompt i in name order [default for built-in models: frame 0 of a "
                       "render of each prompt]")]  # fmt: skip
Embeds = Annotated[Path | None, typer.Option(help="precomputed prompt embeddings (.safetensors), for a transformer without text encoder")]
Device = Annotated[str, typer.Option(help="cpu | cuda")]
DType = Annotated[str | None, typer.Option("--dtype", help="fp32 | bf16 | fp16 weights [default: bf16 on a GPU, fp32 on a CPU]")]
EXIT_BAD_INPUT = 2
# Options of the memory and time estimates (`--memory-estimate`); the default rate is pare.estimate.DEFAULT_TFLOPS,
# kept here so that the CLI starts without importing torch.
MemoryEstimate = Annotated[bool, typer.Option("--memory-estimate", help="print the estimated peak memory per GPU by component and the time, then exit (no weights are loaded)")]
Tflops = Annotated[float, typer.Option("--tflops", help="with --memory-estimate: sustained TFLOP/s per GPU the time is estimated at")]
Gpus = Annotated[int, typer.Option("--gpus", help="with --memory-estimate: processes (GPUs) it runs on, FSDP when more than one")]
GPUS_ALONE = ("--gpus goes with --memory-estimate; a run's processes are those torchrun or accelerate launch start "
              "(see --help)")
GradientCheckpointing = Annotated[bool, typer.Option("--gradient-checkpointing", help="recompute each block's activations in the backward pass (memory for time)")]
DEFAULT_TFLOPS = 400.0
# Options of the training stages (distill, route).
TrainingData = Annotated[Path | None, typer.Option("--data", help="a `pare data` folder made by the teacher (required unless --memory-estimate: then its shape, else the teacher's)")]
RunFolder = Annotated[Path | None, typer.Option("--out", help="run folder: checkpoint/, log.jsonl, model/; re-running resumes (required unless --memory-estimate)")]
WarmStartSteps = Annotated[int, typer.Option(help="steps of the router alone, before joint training, learning each example's ranking of the blocks (0: none; static router: ignored)")]
TeacherSpec = Annotated[str, typer.Option("--teacher", help="the full model the student was made from (a model spec, as --model)")]  # required
OptimiserSteps = Annotated[int, typer.Option(help="optimiser steps")]
SamplingSteps = Annotated[int | None, typer.Option(help="sampling steps [default: the model's own; the teacher's or reference's where there is one]")]
Guidance = Annotated[float | None, typer.Option(help="CFG scale [default: the model's own; the teacher's or reference's where there is one]")]
HeldOutPrompts = Annotated[Path | None, typer.Option("--prompts", help="prompts, one per line [shapes models: the held-out prompts]")]
PromptCount = Annotated[int, typer.Option("--n", help="prompts to use")]
VideoSeed = Annotated[int, typer.Option(help="seed of the first video (video i: seed + i), the same for every model compared")]
VideoBatch = Annotated[int, typer.Option(help="videos per batch")]
BatchSize = Annotated[int, typer.Option(help="global batch: examples per step over all processes")]
CheckpointEvery = Annotated[int, typer.Option(help="steps between checkpoints")]
ExportCheckpoints = Annotated[bool, typer.Option(help="also write model/ at every checkpoint (else at the end)")]
DataOrderSeed = Annotated[int, typer.Option(help="seed of the data order")]


def _fmt_flops(x: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if abs(x) >= scale:
            return f"{x / scale:.3f} {unit}"
    return f"{x:.0f} FLOP"


@app.command()
def flops(
    model: ModelSpec,
    frames: int = typer.Option(..., help="video frames (pixel space; 81 for Wan2.1)"),
    height: int = typer.Option(..., help="video height in pixels"),
    width: int = typer.Option(..., help="video width in pixels"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
):
    """FLOPs of one denoising forward (one CFG branch, batch 1), counted from the model's structure."""
    from .flops import count_video_flops
    from .loading import load_bundle

    bundle = load_bundle(model, weights=False)
    report = count_video_flops(bundle.transformer, bundle.latent, frames, height, width, bundle.text_tokens,
                               bundle.image_tokens(height, width))  # fmt: skip
    d = report.to_dict()
    config = bundle.transformer.config
    routes = config.step_routes if getattr(config, "route_mode", None) == "steps" else None
    if routes:  # step experts (`pare experts`): a forward runs one group's blocks
        d["per_step"] = [report.total(blocks) for blocks in routes]
    if as_json:
        typer.echo(json.dumps({"model": model, "frames": frames, "height": height, "width": width, **d}, indent=2))
        return
    typer.echo(f"{model}: {frames}x{height}x{width} -> {d['tokens']} tokens {tuple(d['token_grid'])}, "
               f"{d['text_tokens']} text tokens, {len(report.blocks)} blocks")  # fmt: skip
    rows = [("embeddings", d["embed"]), *d["by_part"].items(), ("output head", d["head"])]
    if d["extra"]:
        rows.append(("extra (router)", d["extra"]))
    for name, value in rows:
        if value:
            typer.echo(f"  {name:<14} {_fmt_flops(value):>16}  {100 * value / d['total']:5.1f}%")
    typer.echo(f"  {'total':<14} {_fmt_flops(d['total']):>16}")
    if routes:
        typer.echo(f"step experts: every group's blocks are counted above; a forward runs one group's: "
                   f"{', '.join(_fmt_flops(f).strip() for f in d['per_step'])} at steps 1..{len(routes)}")  # fmt: skip


@app.command()
def generate(
    model: ModelSpec,
    prompt: list[str] = typer.Option(..., "--prompt", help="text prompt; repeat for a batch"),
    out: Path = typer.Option(..., "--out", help="output video, .mp4 or .gif (a batch writes NAME-0.mp4, ...)"),
    image: list[Path] = typer.Option([], "--image", help="first frame (PNG, JPEG) of an image-to-video model; one for "
                                      "every prompt, or one per --prompt in order"),
    steps: int | None = typer.Option(None, help="denoising steps [default: the model's, else 25]"),
    seed: int = typer.Option(0, help="seed of the first video; video i uses seed + i"),
    guidance: float | None = typer.Option(None, help="classifier-free guidance scale, 1 turns it off [default: the model's, else 5]"),
    scheduler: str | None = typer.Option(None, help="unipc | euler [default: the model's, else unipc]"),
    shift: float | None = typer.Option(None, help="flow shift of the scheduler's sigmas [default: the model's, else 3]"),
    negative_prompt: str = typer.Option("", help="prompt of the unconditional branch"),
    frames: Frames = None,
    height: Height = None,
    width: Width = None,
    embeds: Embeds = None,
    vae: Path | None = typer.Option(None, help="AutoencoderKLWan folder, for a latent-space transformer without one"),
    fps: int = typer.Option(8, help="frames per second of the written video"),
    device: Device = "cpu",
    dtype: DType = None,
):
    """Generate videos from prompts and print the compute of every step against the full model's."""
    from .components import EmbeddingsFile, WanVaeDecoder
    from .generate import generate as run_generate
    from .loading import load_bundle
    from .sampling import SamplerConfig
    from .video import VIDEO_SUFFIXES, write_generated

    require(out.suffix.lower() in VIDEO_SUFFIXES, f"--out must end in .mp4 or .gif, got {out.name!r}")
    require(fps >= 1, f"--fps must be at least 1, got {fps}")
    check_writable(out)
    chosen = {k: v for k, v in (("steps", steps), ("guidance_scale", guidance), ("flow_shift", shift),
                                ("scheduler", scheduler)) if v is not None}  # fmt: skip
    SamplerConfig(**chosen).validate()  # bad flags fail before anything is loaded
    bundle = load_bundle(model, device=_device(device), dtype=_dtype(dtype, device))
    config = SamplerConfig(**{**bundle.sampler_defaults, **chosen, "seed": seed})
    if vae is not None:
        require(vae.is_dir(), f"--vae {vae}: expected an AutoencoderKLWan folder")
        bundle.decoder = WanVaeDecoder(vae)
    encoder = EmbeddingsFile(embeds) if embeds is not None else None
    images = _first_frames(image, len(prompt), bundle, height, width) if image else None
    gen = run_generate(bundle, list(prompt), config, frames=frames, height=height, width=width,
                       negative_prompt=negative_prompt, prompt_encoder=encoder, images=images)  # fmt: skip
    paths = [out] if len(prompt) == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(len(prompt))]
    _print_steps(gen.result)
    write_generated(out.with_suffix(".json"), paths, gen.videos, {
        "model": model, "prompts": list(prompt), "sampler": vars(config), "negative_prompt": negative_prompt,
        "flops_per_forward_full": gen.reference_flops, "steps": gen.result.record(),
        **({"images": [str(p.resolve()) for p in image]} if image else {})}, fps=fps)  # fmt: skip
    typer.echo(f"wrote {', '.join(map(str, paths))} (record: {out.with_suffix('.json')})")


def _first_frames(paths: list[Path], n: int, bundle, height: int | None, width: int | None):
    """The --image files as (n, 3, H, W) in [-1, 1]: one for every prompt or one per prompt, at the video's size."""
    from .components import images_from_uint8
    from .generate import video_shape
    from .video import read_image

    require(len(paths) in (1, n), f"give one --image for every prompt or one per --prompt ({n}), got {len(paths)}")
    _, h, w = video_shape(bundle, 1, height, width)
    frames = [read_image(p) for p in paths]
    for p, f in zip(paths, frames):
        require(f.shape[:2] == (h, w), f"--image {p} is {f.shape[1]}x{f.shape[0]}: expected {w}x{h}, the video's size")
    import numpy as np

    return images_from_uint8(np.stack(frames * (n if len(paths) == 1 else 1)))


def _print_steps(result) -> None:
    typer.echo(f"{'step':>4} {'t':>7} {'blocks run':>10} {'executed':>14} {'full model':>14} {'ratio':>6}")
    for s in result.steps:
        typer.echo(f"{s.step:>4} {s.timestep:>7.1f} {s.blocks_run:>10.2f} {_fmt_flops(s.flops):>14} "
                   f"{_fmt_flops(s.full_flops):>14} {s.flops / s.full_flops:>6.3f}")  # fmt: skip
    typer.echo(f"total: {_fmt_flops(result.flops)} executed vs {_fmt_flops(result.full_flops)} for the full model "
               f"({result.flops / result.full_flops:.3f})")  # fmt: skip


@app.command("bench-latency")
def bench_latency(
    model: ModelSpec,
    frames: int = typer.Option(..., help="video frames (pixel space)"),
    height: int = typer.Option(..., help="video height in pixels"),
    width: int = typer.Option(..., help="video width in pixels"),
    dtype: str | None = typer.Option(None, help="bf16 | fp16 | fp32 (default: bf16 on a GPU, fp32 on a CPU)"),
    warmup: int = typer.Option(2, help="untimed forwards first"),
    iters: int = typer.Option(5, help="timed forwards; the median is reported"),
    device: str | None = typer.Option(None, help="cuda | cpu (default: cuda when available)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
):
    """Time one forward with random weights: s/step, TFLOP/step, achieved TFLOP/s (CUDA events on a GPU)."""
    from .latency import LatencyConfig, bench_latency as run, result_dict

    r = run(model, LatencyConfig(frames, height, width, dtype, warmup, iters, device))
    if as_json:
        typer.echo(json.dumps(result_dict(r), indent=2))
        return
    if r.note:
        typer.echo(f"note: {r.note}")
    typer.echo(f"{'model':<24} {'device':<8} {'dtype':<5} {'tokens':>7} {'s/step':>9} {'TFLOP/step':>11} {'TFLOP/s':>8}")
    typer.echo(f"{r.model:<24} {r.device:<8} {r.dtype:<5} {r.tokens:>7} {r.seconds_per_step:>9.4f} "
               f"{r.tflop_per_step:>11.4f} {r.achieved_tflops:>8.2f}")  # fmt: skip


@app.command()
def profile(
    model: ModelSpec,
    out: Path | None = typer.Option(None, "--out", help="folder for heads.json and heads.png (required unless --memory-estimate)"),
    prompts: CalibrationPrompts = None,
    videos: int = typer.Option(16, "--videos", help="calibration prompts, one sampling trajectory each"),
    timesteps: str | None = typer.Option(None, help="indices of the sampling steps whose x_t is kept, comma-separated "
                                         "[default: five spread over the steps, 0,6,12,18,24 for 25]"),
    steps: int | None = typer.Option(None, help="sampling steps of the calibration trajectories [default: the model's "
                                     "own (a few-step model's), else 25]"),
    queries: int = typer.Option(64, help="query tokens sampled per forward for exact attention rows"),
    batch_size: int = typer.Option(8, help="calibration inputs per forward"),
    removal: str = typer.Option("block", "--removal", help="each head's removal error: block (change of its "
                                "block's output, about heads + 1 model forwards' worth), model (of the model's "
                                "output, one forward per head), none (rank by Taylor importance)"),
    temporal_multiplier: float = typer.Option(1.0, help="role-aware score: weight of temporal heads (1: the best of a sweep "
                                              "on the embedded teacher, where the temporal floor does the protecting)"),
    min_temporal_share: float = typer.Option(0.5, help="role-aware plans keep at least this share of each block's temporal heads"),
    frames: Frames = None, height: Height = None, width: Width = None, embeds: Embeds = None,  # the video and prompts
    images: FirstFrames = None,
    seed: int = typer.Option(0, help="seed of trajectories and query sampling"),
    device: Device = "cpu", dtype: DType = None, memory_estimate: MemoryEstimate = False, tflops: Tflops = DEFAULT_TFLOPS,
):
    """Profile self-attention heads: spatial/temporal roles, importance of heads and FFN channels."""
    from .components import EmbeddingsFile
    from .generate import video_shape
    from .loading import load_bundle
    from .profiling import ProfileConfig, profile as run_profile, write_profile
    from .profiling.calibration import default_prompts, first_frames

    try:
        kept = tuple(int(t) for t in timesteps.split(",")) if timesteps is not None else None
    except ValueError:
        raise PareError(f"--timesteps must be comma-separated step indices such as 0,6,12, got {timesteps!r}") from None
    config = ProfileConfig(videos, steps, kept, queries, batch_size, removal, temporal_multiplier, min_temporal_share, seed)
    config.validate()
    if memory_estimate:
        return _profile_memory(model, frames, height, width, config, device, dtype, embeds, tflops)
    require(out is not None, "Missing option '--out' (see pare profile --help)")
    check_output_dir(out, "profile")
    bundle = load_bundle(model, device=_device(device), dtype=_dtype(dtype, device))
    shape = video_shape(bundle, frames, height, width)
    encoder = EmbeddingsFile(embeds) if embeds is not None else None
    prompt_list = default_prompts(bundle, prompts, videos, seed, encoder)
    result = run_profile(bundle, config, prompt_list, encoder=encoder, shape=shape,
                         images=first_frames(bundle, prompt_list, images, seed))  # fmt: skip
    json_path, png = write_profile(result, out)
    c = result["role_counts"]
    typer.echo(f"{c['spatial']} spatial, {c['temporal']} temporal, {c['mixed']} mixed heads; wrote {json_path} and {png}")


def _profile_memory(model, frames, height, width, config, device, dtype, embeds, tflops) -> None:
    from . import arch
    from .estimate import estimate_profile, text_encoder_bytes
    from .profiling.roles import probe_extra_bytes

    bundle, grid, image_tokens = _estimate_inputs(model, (frames, height, width))
    config = config.resolved(bundle.sampler_defaults)
    m = bundle.transformer
    attn = arch.self_attention(arch.blocks(m)[0])
    extra = probe_extra_bytes(arch.num_heads(attn), arch.head_dim(attn), grid, config.queries, config.batch_size)
    weights = sum(p.numel() for p in m.parameters()) * 2
    typer.echo(f"{model}: {grid.tokens} tokens, {config.queries} queries, batch {config.batch_size}: the probe adds "
               f"{extra / 2**30:.2f} GiB at its peak (bf16 weights: {weights / 2**30:.1f} GiB)")  # fmt: skip
    est = estimate_profile(m, grid, bundle.text_tokens, config, weight_bytes=_dtype(dtype, device).itemsize,
                           guidance=_sampler(bundle).guidance_scale, text_encoder=0 if embeds else text_encoder_bytes(model),
                           image_tokens=image_tokens)  # fmt: skip
    typer.echo(est.table(tflops))


def _estimate_inputs(model: str, shape):
    """The bundle (meta device), token grid and image tokens per video (0 for T2V) a memory estimate is made at."""
    from . import arch
    from .generate import video_shape
    from .loading import load_bundle

    bundle = load_bundle(model, weights=False)
    frames, height, width = video_shape(bundle, *shape)
    grid = arch.token_grid(bundle.transformer.config, bundle.latent, frames, height, width)
    return bundle, grid, bundle.image_tokens(height, width)


def _sampler(bundle):
    """The sampler settings the model asks for (the library's defaults where it says nothing)."""
    from .sampling import SamplerConfig

    return SamplerConfig(**bundle.sampler_defaults)


@app.command()
def prune(
    model: ModelSpec,
    profile_path: Path | None = typer.Option(None, "--profile", help="heads.json written by `pare profile` on this model (required unless --memory-estimate)"),
    out: Path | None = typer.Option(None, "--out", help="output folder, loadable with --model (required unless --memory-estimate)"),
    heads: float = typer.Option(0.25, "--heads", help="share of attention heads removed, self and cross, in [0, 1)"),
    ffn: float = typer.Option(0.25, "--ffn", help="share of FFN channels removed, in [0, 1)"),
    allocation: str = typer.Option("global", help="global (important blocks keep more) | uniform"),
    heads_multiple_of: int = typer.Option(1, help="keep every block's head count a multiple of K (Ulysses degree)"),
    temporal_multiplier: float | None = typer.Option(None, help="weight of temporal heads' scores (with --min-temporal-share 0, 1 is role-agnostic) [default: the profile's]"),
    min_temporal_share: float | None = typer.Option(None, help="share of each block's temporal heads always kept [default: the profile's]"),
    correct_norms: bool = typer.Option(True, "--correct-norms/--no-correct-norms", help="rescale the kept q/k norm weights from calibration statistics"),
    calibration_videos: int = typer.Option(4, help="trajectories for the norm correction and the error report"),
    prompts: CalibrationPrompts = None,
    embeds: Embeds = None,
    images: FirstFrames = None,
    device: Device = "cpu",
    dtype: DType = None,
    memory_estimate: MemoryEstimate = False,
    tflops: Tflops = DEFAULT_TFLOPS,
):
    """Remove heads and FFN channels for good: plan from a head profile, slice, correct the q/k norms."""
    from .components import EmbeddingsFile
    from .loading import load_bundle
    from .profiling import load_profile
    from .pruning import PruneConfig, prune_to_folder

    config = PruneConfig(heads, ffn, allocation, heads_multiple_of, temporal_multiplier, min_temporal_share,
                         correct_norms, calibration_videos)  # fmt: skip
    config.validate()
    if memory_estimate:
        return _prune_memory(model, profile_path, config, device, dtype, embeds, tflops)
    require(profile_path is not None and out is not None, "Missing option '--profile' or '--out' (see pare prune --help)")
    check_output_dir(out, "prune")
    profile = load_profile(profile_path)
    bundle = load_bundle(model, device=_device(device), dtype=_dtype(dtype, device))
    encoder = EmbeddingsFile(embeds) if embeds is not None else None
    report, shape, before, after = prune_to_folder(bundle, profile, str(profile_path), config, out, prompts, encoder,
                                                   images_dir=images)  # fmt: skip
    typer.echo(f"self-attention heads per block: {report.self_heads}")
    typer.echo(f"cross-attention heads per block: {report.cross_heads}")
    typer.echo(f"FFN width per block: {report.ffn_dims}")
    typer.echo(f"parameters: {report.params_before:,} -> {report.params_after:,} "
               f"({report.params_after / report.params_before:.3f}); FLOPs per forward at {shape}: "
               f"{_fmt_flops(before)} -> {_fmt_flops(after)} ({after / before:.3f})")  # fmt: skip
    if report.error_without_correction is not None:
        typer.echo(f"relative output error on calibration inputs: {report.error_without_correction:.4f} without "
                   f"q/k-norm correction" + (f", {report.error_with_correction:.4f} with it"
                                             if report.error_with_correction is not None else ""))  # fmt: skip
    typer.echo(f"wrote {out}")


def _prune_memory(model, profile_path, config, device, dtype, embeds, tflops) -> None:
    from .estimate import estimate_prune, pruned_structure, text_encoder_bytes
    from .profiling import load_profile

    profile = load_profile(profile_path) if profile_path is not None else None
    settings = profile["settings"] if profile else {"steps": 25, "timesteps": (0, 6, 12, 18, 24)}
    bundle, grid, image_tokens = _estimate_inputs(model, (profile or {}).get("shape") or (None, None, None))
    teacher = bundle.transformer
    student = pruned_structure(teacher, config.heads, config.ffn, config.heads_multiple_of)
    est = estimate_prune(teacher, student, grid, bundle.text_tokens, config, sampling_steps=settings["steps"],
                         kept_steps=len(settings["timesteps"]), weight_bytes=_dtype(dtype, device).itemsize,
                         guidance=_sampler(bundle).guidance_scale, text_encoder=0 if embeds else text_encoder_bytes(model),
                         image_tokens=image_tokens)  # fmt: skip
    est.notes.append("the pruned model is sized by the ratios, the same share in every block")
    typer.echo(est.table(tflops))


@app.command()
def data(
    teacher: str = typer.Option(..., "--teacher", help=MODEL_HELP),
    out: Path | None = typer.Option(None, "--out", help="data folder, re-running resumes (required unless --memory-estimate)"),
    prompts: CalibrationPrompts = None,
    videos: int = typer.Option(64, "--videos", help="trajectories to sample"),
    steps: SamplingSteps = None,
    guidance: Guidance = None,
    shard_videos: int = typer.Option(8, help="trajectories per shard"),
    store: str = typer.Option("fp16", "--store", help="storage dtype of inputs and velocities: fp16 | bf16 | fp32"),
    frames: Frames = None, height: Height = None, width: Width = None, embeds: Embeds = None,  # the video and prompts
    images: FirstFrames = None,
    seed: int = typer.Option(0, help="seed of the first trajectory (trajectory i uses seed + i)"),
    student_steps: int | None = typer.Option(None, "--student-steps", help="keep only the teacher steps an N-step "
                                             "`pare step-distill` student reads, and the final latents (N/steps of "
                                             "the disk; other stages need every step)"),
    student_shift: float | None = typer.Option(None, "--student-shift", help="that student's --flow-shift "
                                               "(default: the teacher's)"),
    device: Device = "cpu", dtype: DType = None, memory_estimate: MemoryEstimate = False, tflops: Tflops = DEFAULT_TFLOPS,
):
    """Sample teacher trajectories (with CFG) into safetensors shards for distillation."""
    from . import arch
    from .components import EmbeddingsFile
    from .distill.data import DataConfig, write_data
    from .generate import video_shape
    from .loading import load_bundle
    from .profiling.calibration import default_prompts, first_frames
    from .sampling import SamplerConfig

    config = DataConfig(videos, shard_videos, store, seed, student_steps, student_shift)
    config.validate()
    if memory_estimate:
        from .estimate import estimate_data, text_encoder_bytes

        bundle, grid, image_tokens = _estimate_inputs(teacher, (frames, height, width))
        est = estimate_data(bundle.transformer, grid, bundle.text_tokens, config,
                            sampling_steps=steps or _sampler(bundle).steps, weight_bytes=_dtype(dtype, device).itemsize,
                            guidance=guidance or _sampler(bundle).guidance_scale, text_encoder=0 if embeds else text_encoder_bytes(teacher),
                            on_cpu=device == "cpu", image_tokens=image_tokens)  # fmt: skip
        return typer.echo(est.table(tflops))
    require(out is not None, "Missing option '--out' (see pare data --help)")
    check_output_dir(out, "data")
    chosen = {k: v for k, v in (("steps", steps), ("guidance_scale", guidance)) if v is not None}
    bundle = load_bundle(teacher, device=_device(device), dtype=_dtype(dtype, device))
    sampler = SamplerConfig(**{**bundle.sampler_defaults, **chosen, "seed": seed})
    sampler.validate()
    encoder = EmbeddingsFile(embeds) if embeds is not None else None
    shape = video_shape(bundle, frames, height, width)
    arch.token_grid(bundle.transformer.config, bundle.latent, *shape)  # a shape the patches do not tile: one line
    prompt_list = default_prompts(bundle, prompts, videos, seed, encoder)
    first = first_frames(bundle, prompt_list[:videos], images, seed)
    index = write_data(out, bundle, prompt_list, sampler, shape, config, encoder, images=first)
    examples = sum(s["examples"] for s in index["shards"])
    typer.echo(f"{len(index['shards'])} shards, {examples} examples in {out}")


@app.command()
def distill(
    teacher: TeacherSpec,
    student: Path = typer.Option(..., "--student", help="a `pare prune` output folder"),
    data_dir: TrainingData = None, out: RunFolder = None,
    steps: OptimiserSteps = 2000,
    batch_size: BatchSize = 32,
    lr: float = typer.Option(2e-4, help="peak learning rate (AdamW, linear warm-up)"),
    warmup_steps: int = typer.Option(50, help="warm-up steps"),
    lr_schedule: str = typer.Option("constant", help="after warm-up: constant | cosine (decays to 0 at --steps)"),
    ema_decay: float = typer.Option(0.0, help="EMA of the weights in model/ (0: off)"),
    align_weight: float = typer.Option(0.0, help="weight of per-block hidden-state alignment (runs the teacher online)"),
    guided_weight: float = typer.Option(0.0, help="weight of the guided velocity's MSE, v_u + g (v_c - v_u) with the data's guidance g"),
    checkpoint_every: CheckpointEvery = 200, export_checkpoints: ExportCheckpoints = False, seed: DataOrderSeed = 0,
    gradient_checkpointing: GradientCheckpointing = False,
    memory_estimate: MemoryEstimate = False, gpus: Gpus = 1, tflops: Tflops = DEFAULT_TFLOPS,
):
    """Stage 1: distil a pruned student from its teacher (velocity MSE); runs under accelerate launch / torchrun."""
    from .distill import DistillConfig, distill as run

    config = DistillConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
                           lr_schedule=lr_schedule, ema_decay=ema_decay, align_weight=align_weight,
                           guided_weight=guided_weight, gradient_checkpointing=gradient_checkpointing,
                           checkpoint_every=checkpoint_every, export_checkpoints=export_checkpoints, seed=seed)  # fmt: skip
    config.validate()
    require(memory_estimate or gpus == 1, GPUS_ALONE)
    if memory_estimate:
        from .estimate import estimate_distill

        t, s, grid, _, branches, image_tokens = _training_estimate_inputs(teacher, student, data_dir, gpus)
        est = estimate_distill(s, t, grid, _text_tokens(teacher), config, processes=gpus, branches=branches,
                               image_tokens=image_tokens)  # fmt: skip
        return typer.echo(est.table(tflops))
    require(data_dir is not None and out is not None, "Missing option '--data' or '--out' (see pare distill --help)")
    check_output_dir(out, "distill")
    record = run(teacher, student, data_dir, out, config, command=_command_line())
    _stopped(record, config.steps)
    a, b = record["val_start"], record["val_end"]
    _echo_once(f"relative error to the teacher on held-out examples: {a['error']:.4f} -> {b['error']:.4f} (branches), "
               f"{a['guided_error']:.4f} -> {b['guided_error']:.4f} (guided); model: {out / 'model'}")  # fmt: skip


DMD_PROMPTS = 4096  # step-distill --method dmd: a built-in model's training prompts in the student's pool


@app.command("step-distill")
def step_distill_(
    teacher: str = typer.Option(..., "--teacher", help="the model to distil (a model spec, as --model)"),
    data_dir: Path = typer.Option(..., "--data", help="a `pare data` folder made by the teacher (with guidance)"),
    more_data: list[Path] = typer.Option([], "--more-data", metavar="DIR",
                                         help="a further `pare data` folder of the teacher, made with another --seed "
                                         "(repeatable): its shards join the training examples; the held-out shard "
                                         "stays --data's last"),
    out: Path = typer.Option(..., "--out", help="run folder: checkpoint/, log.jsonl, model/; re-running resumes"),
    steps: int = typer.Option(4, "--steps", help="sampling steps of the student (its own schedule, no guidance)"),
    train_steps: int = typer.Option(2000, "--train-steps", help="optimiser steps"),
    batch_size: BatchSize = 32,
    lr: float = typer.Option(1e-4, help="peak learning rate (AdamW, linear warm-up)"),
    warmup_steps: int = typer.Option(50, help="warm-up steps"),
    lr_schedule: str = typer.Option("cosine", help="after warm-up: constant | cosine (decays to 0 at --train-steps)"),
    ema_decay: float = typer.Option(0.0, help="EMA of the weights in model/ (0: off)"),
    eval_every: int = typer.Option(0, help="steps between domain evaluations of model/ (a model with a domain "
                                   "evaluator, such as the built-in one; 0: at the end only)"),
    eval_prompts: int = typer.Option(64, help="held-out prompts of each domain evaluation"),
    checkpoint_every: CheckpointEvery = 200, export_checkpoints: ExportCheckpoints = False, seed: DataOrderSeed = 0,
    gradient_checkpointing: GradientCheckpointing = False,
    rollout_weight: float = typer.Option(0.0, help="weight of the rollout loss: the student's own Euler steps from "
                                         "an example's x_t to the end, against the teacher's final latent (0: off)"),
    rollout_examples: int = typer.Option(8, help="examples of each batch whose rollout is trained"),
    salience_weight: float = typer.Option(0.0, help="weigh each latent position's error by 1 + X x its salience "
                                          "(its distance from the teacher's video's background, over the video's "
                                          "mean): a small object counts as much per position as a large one (0: "
                                          "the plain mean squared error)"),
    salience_from: str = typer.Option("teacher", help="whose objects weigh more in the rollout loss: teacher | both "
                                      "(the teacher's and those of the student's own rollout, so that drawing an "
                                      "object twice costs as much as dropping one; needs --salience-weight and "
                                      "--rollout-weight)"),
    init_from: str | None = typer.Option(None, "--init-from", help="a `pare step-distill` student of this teacher "
                                         "and --steps to start from (a later sitting with other losses or "
                                         "another --flow-shift), or its `pare prune`/`pare distill` output "
                                         "(trains the cut student on the teacher's trajectories), or its `pare "
                                         "experts` (trains each group of steps on its own)"),
    flow_shift: float | None = typer.Option(None, "--flow-shift", help="shift of the student's own K-step schedule "
                                            "(levels 1, (K-1)/K, ..., 1/K shifted, each taken from the teacher's "
                                            "nearest; lower puts more steps near the end) [default: --init-from's "
                                            "levels, else the teacher's]"),
    method: str = typer.Option("segment", help="segment: regress the teacher's trajectories segment by segment; "
                               "dmd: distribution matching (a critic learns the student's samples; the student "
                               "follows the teacher's guided score against it)"),
    critic_updates: int | None = typer.Option(None, help="dmd: optimiser steps per student update (the critic "
                                              "learns on each) [default: 5]"),
    critic_lr: float | None = typer.Option(None, help="dmd: the critic's learning rate [default: --lr]"),
    regression_weight: float = typer.Option(0.0, help="dmd: weight of the segment regression loss beside it (0: off)"),
    only_steps: str | None = typer.Option(None, "--only-steps", metavar="K,...", help="train on these of the "
                                          "student's steps only (1-based, e.g. 3,4); with --init-from a `pare "
                                          "experts` folder, only these steps' blocks train, and the other steps "
                                          "compute what they did [default: all]"),
    prompts_file: Path | None = typer.Option(None, "--prompts", help="dmd: the student's prompts, one per line "
                                             "[default: 4,096 of a built-in model's training prompts, else those of "
                                             "the data's videos]"),
):
    """A few-step student that needs no guidance: it regresses the teacher's guided trajectories segment by segment
    (--method segment) or matches their distribution (--method dmd)."""
    from .loading import load_bundle
    from .stepdistill import StepDistillConfig, step_distill

    require(critic_updates is None or method == "dmd", "--critic-updates belongs to --method dmd")
    picked = None
    if only_steps is not None:
        parts = only_steps.split(",")
        require(all(p.strip().isdigit() for p in parts), f"--only-steps takes step numbers such as 3,4, got {only_steps!r}")
        picked = tuple(int(p) for p in parts)
    config = StepDistillConfig(steps=train_steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
                               lr_schedule=lr_schedule, ema_decay=ema_decay, student_steps=steps,
                               gradient_checkpointing=gradient_checkpointing, checkpoint_every=checkpoint_every,
                               export_checkpoints=export_checkpoints, eval_every=eval_every, seed=seed,
                               rollout_weight=rollout_weight, rollout_examples=rollout_examples, init_from=init_from,
                               salience_weight=salience_weight, salience_from=salience_from,
                               flow_shift=flow_shift, method=method, critic_lr=critic_lr,
                               regression_weight=regression_weight, only_steps=picked,
                               **({} if critic_updates is None else {"critic_updates": critic_updates}))  # fmt: skip
    config.validate()
    require(eval_prompts >= 2, f"--eval-prompts must be at least 2, got {eval_prompts}")
    check_output_dir(out, "step-distill")
    encoder = load_bundle(teacher, weights=False).prompt_encoder
    prompts = encoder.own_prompts(eval_prompts, "heldout") if encoder is not None else None
    evaluate = None
    if prompts is not None:  # a model with a domain evaluator: its scores on held-out prompts, as training goes
        require_extras("pare step-distill (it evaluates its student on held-out prompts)", "cv2", "matplotlib")

        def evaluate(model_dir: Path) -> dict:
            from .evaluation import EvalConfig, paired_sampler, run_model

            bundle = load_bundle(str(model_dir))
            videos = run_model(bundle, prompts, paired_sampler(bundle, EvalConfig()), 16)["videos"]
            return bundle.prompt_encoder.domain_scores(videos, prompts)

    pool = None
    if method == "dmd":
        from .profiling.calibration import read_prompt_file

        pool = read_prompt_file(prompts_file) if prompts_file else encoder.own_prompts(DMD_PROMPTS) if encoder else None
    else:
        require(prompts_file is None, "--prompts belongs to --method dmd (segment regression trains on the data's videos)")
    record = step_distill(teacher, data_dir, out, config, command=_command_line(), evaluate=evaluate, prompts=pool,
                          more_data=more_data)
    _stopped(record, config.steps)
    a, b = record["val_start"], record["val_end"]
    final = (f", final latents {a['final_error']:.4f} -> {b['final_error']:.4f}" if b["final_error"] is not None
             else f" (of steps {only_steps} only: no final latents)")  # fmt: skip
    _echo_once(f"{steps}-step student, relative error to the teacher on held-out videos: segment velocities "
               f"{a['error']:.4f} -> {b['error']:.4f}{final}; model: {out / 'model'} (samples in {steps} steps "
               "without guidance)")  # fmt: skip


@app.command("fuse-lora")
def fuse_lora_(
    model: ModelSpec,
    lora: Path = typer.Option(..., "--lora", help="LoRA .safetensors (diffusers or original Wan format, e.g. LightX2V's)"),
    out: Path = typer.Option(..., "--out", help="output folder, loadable with --model"),
    scale: float = typer.Option(1.0, help="LoRA scale the weights are fused at"),
    steps: int | None = typer.Option(None, help="sampling steps the LoRA was distilled for (Euler on the "
                                     "flow-shifted schedule) [default: the model's own sampler]"),
    guidance: float | None = typer.Option(None, help="with --steps: the CFG scale it samples at [default: 1, none]"),
    shift: float | None = typer.Option(None, help="with --steps: flow shift of the schedule [default: 5]"),
    device: Device = "cpu", dtype: DType = None,
):
    """Fuse a LoRA (a step-distillation LoRA) into a model's transformer: a folder every PARE stage takes."""
    from .loading import load_bundle
    from .lora import few_step_sampler, fuse_lora, save_fused
    from .sampling import SamplerConfig

    require(steps is None or steps >= 1, f"--steps must be at least 1, got {steps}")
    require(steps is not None or (guidance is None and shift is None), "--guidance and --shift set the sampler of "
            "--steps: give --steps too (without it the folder keeps the model's own sampler)")  # fmt: skip
    guidance, shift = 1.0 if guidance is None else guidance, 5.0 if shift is None else shift
    SamplerConfig(guidance_scale=guidance, flow_shift=shift).validate()  # finite guidance, a positive shift
    check_output_dir(out, "fuse-lora")
    bundle = load_bundle(model, device=_device(device), dtype=_dtype(dtype, device))
    layers = fuse_lora(bundle, lora, scale)
    sampler = few_step_sampler(steps, guidance, shift) if steps else None
    save_fused(bundle, out, {"lora": str(lora.resolve()), "scale": scale}, sampler)
    how = f"; samples in {steps} Euler steps at guidance {guidance:g}" if steps else ""
    typer.echo(f"fused {layers} LoRA layers of {lora} at scale {scale:g} into {model}{how}: wrote {out}")


@app.command("experts")
def experts_(
    models: list[str] = typer.Option(..., "--model", help="the few-step model, copied for every group; or one per "
                                     "group, in the order of --groups (cuts of one model at different widths, so "
                                     "that each group has the width its steps need); with --take, the experts"),
    groups: str = typer.Option(None, "--groups", metavar="K,.../K,...", help="the model's steps (1-based) by group, "
                               "groups split by '/', e.g. 1,2/3,4: each group gets its own copy of the blocks"),
    take: int = typer.Option(None, "--take", metavar="G", help="instead: write group G (1-based) of a `pare experts` "
                             "model as a plain model, to prune it (`pare prune`) and stack the cut again"),
    shared_from: int = typer.Option(None, "--shared-from", metavar="G", help="take the parts the groups share "
                                    "(patch embedding, condition embedder, output head) from group G's model (1-based), "
                                    "when the models are trained cuts that differ there: group G's steps then compute "
                                    "exactly what its model does, and the other groups are to be trained again "
                                    "(`pare step-distill --only-steps`) [default: they must be equal]"),
    out: Path = typer.Option(..., "--out", help="output folder, loadable with --model; train it with `pare "
                             "step-distill --init-from`"),
    device: Device = "cpu",
    dtype: DType = None,
):
    """Step experts of a few-step model: each group of its steps runs its own copy of the blocks (FLOPs per step
    unchanged, block weights x groups). At first every group computes what the model does; `pare step-distill
    --init-from OUT` then trains each group on its own steps. `--take G` undoes it for one group: its blocks as a
    plain model, which computes at the group's steps what the experts do. The folder holds the weights in --dtype
    (bf16 on a GPU: two groups of Wan2.1-14B are then 57 GB to hold, and the cuts' blocks are not copied)."""
    from .loading import load_bundle
    from .routing.experts import experts_to_folder, group_to_folder, is_step_experts

    require((groups is None) != (take is None), "give one of --groups (build step experts) and --take G (take a group "
            "out of them)" + (", not both" if groups is not None else ""))  # fmt: skip
    require(take is None or len(models) == 1, "--take reads one --model: a `pare experts` folder")
    require(take is None or shared_from is None, "--shared-from builds step experts (with --groups), not --take")
    n_groups = len(groups.split("/")) if groups else 0
    require(shared_from is None or 1 <= shared_from <= n_groups,  # before loading any weights
            f"--shared-from names one of the {n_groups} groups of --groups (1..{n_groups}), got {shared_from}")
    check_output_dir(out, "experts")
    weights = {"device": _device(device), "dtype": _dtype(dtype, device)}
    if take is not None:
        require(is_step_experts(load_bundle(models[0], weights=False).transformer),  # before loading any weights
                "--take takes a `pare experts` folder (a model whose steps run groups of blocks)")  # fmt: skip
        steps = group_to_folder(load_bundle(models[0], **weights), take - 1, out)
        typer.echo(f"group {take} of {models[0]} (steps {','.join(map(str, steps))}) as a plain model: wrote {out}")
        return
    bundles = [load_bundle(m, **weights) for m in models]
    split = experts_to_folder(bundles, groups, out, None if shared_from is None else shared_from - 1)
    source = f"{len(split)} copies of {models[0]}'s blocks" if len(models) == 1 else f"the blocks of {', '.join(models)}"
    typer.echo(f"{len(split)} groups of steps ({groups}), {source}: wrote {out}")


def _stopped(record: dict, steps: int) -> None:
    """A training run that a signal stopped early: say where, and exit as interrupted (130)."""
    from accelerate import PartialState

    if record.get("stopped"):
        if PartialState().is_main_process:
            typer.echo(f"pare: stopped by {record['stopped']} at step {record['steps']} of {steps}; checkpoint and "
                       "model/ are written: the same command resumes", err=True)  # fmt: skip
        raise typer.Exit(130)


def _echo_once(text: str) -> None:
    """A training stage's summary, printed by the main process only (under accelerate launch every process has it)."""
    from accelerate import PartialState

    if PartialState().is_main_process:
        typer.echo(text)


def _training_estimate_inputs(teacher: str, student: Path, data_dir: Path | None, gpus: int):
    """Teacher and student structures (meta device), the token grid of the data (else the teacher's default
    video), the data's training examples (None without data), the branches per example (2 where the data, else
    the teacher's own sampler, is guided; 1 for a guidance-free, few-step teacher) and the image tokens per video
    (0 for T2V) of a training stage's estimate."""
    from . import arch
    from .distill.data import read_index
    from .loading import load_bundle

    require(gpus >= 1, f"--gpus must be at least 1, got {gpus}")
    t = load_bundle(teacher, weights=False)
    s = load_bundle(str(student), weights=False).transformer
    examples = None
    guidance = t.sampler_defaults.get("guidance_scale", 2.0)
    if data_dir is not None:
        index = read_index(data_dir)
        grid = arch.token_grid(t.transformer.config, t.latent, *index["shape"])
        image_tokens = t.image_tokens(*index["shape"][1:])
        examples = sum(e["examples"] for e in index["shards"][:-1])  # the last shard is held out
        guidance = index["sampler"]["guidance_scale"]
    else:
        _, grid, image_tokens = _estimate_inputs(teacher, (None, None, None))
    return t.transformer, s, grid, examples, 2 if guidance > 1 else 1, image_tokens


def _text_tokens(spec: str) -> int:
    from .loading import load_bundle

    return load_bundle(spec, weights=False).text_tokens


@app.command()
def route(
    teacher: TeacherSpec,
    student: Path = typer.Option(..., "--student", help="a `pare distill` (or `pare prune`) output folder"),
    data_dir: TrainingData = None, out: RunFolder = None,
    budget: float = typer.Option(0.6, help="share of block FLOPs executed, in (0, 1]"),
    router: str = typer.Option("content", "--router", help="content (timestep + content) | timestep | static"),
    mode: str = typer.Option("topk", help="inference: topk (per sample, the router's best blocks that fit the budget) | threshold"),
    steps: OptimiserSteps = 1000,
    batch_size: BatchSize = 32,
    router_lr: float = typer.Option(1e-3, help="learning rate of the router"),
    student_lr: float = typer.Option(5e-5, help="learning rate of the student"),
    lr_schedule: str = typer.Option("constant", help="after 50 warm-up steps: constant | cosine (to 0 at --steps)"),
    compute_weight: float = typer.Option(10.0, help="--mode threshold: weight of (executed share - budget)^2 (topk routes fill the budget by construction)"),
    importance_weight: float = typer.Option(1.0, help="weight of the router's cross-entropy to each example's "
                                            "most important blocks (what makes routes depend on the input)"),
    importance_examples: int = typer.Option(4096, help="training examples whose block importance is measured "
                                            "(a seeded sample; 0: all)"),
    warm_start_steps: WarmStartSteps = 500,
    always_run: int = typer.Option(1, help="leading blocks that always run (the router reads their output)"),
    checkpoint_every: CheckpointEvery = 200, export_checkpoints: ExportCheckpoints = False, seed: DataOrderSeed = 0,
    gradient_checkpointing: GradientCheckpointing = False,
    memory_estimate: MemoryEstimate = False, gpus: Gpus = 1, tflops: Tflops = DEFAULT_TFLOPS,
):
    """Stage 2: train a block router jointly with the student, at a compute budget."""
    from .routing import RouteConfig, route as run

    config = RouteConfig(steps=steps, batch_size=batch_size, checkpoint_every=checkpoint_every, seed=seed,
                         export_checkpoints=export_checkpoints, gradient_checkpointing=gradient_checkpointing,
                         budget=budget, router=router, mode=mode, always_run=always_run, router_lr=router_lr,
                         student_lr=student_lr, lr_schedule=lr_schedule, compute_weight=compute_weight,
                         importance_weight=importance_weight, importance_examples=importance_examples,
                         warm_start_steps=warm_start_steps)  # fmt: skip
    config.validate()
    require(memory_estimate or gpus == 1, GPUS_ALONE)
    if memory_estimate:
        from .estimate import estimate_route

        _, s, grid, examples, branches, image_tokens = _training_estimate_inputs(teacher, student, data_dir, gpus)
        est = estimate_route(s, grid, _text_tokens(teacher), config, processes=gpus, train_examples=examples,
                             branches=branches, image_tokens=image_tokens)  # fmt: skip
        return typer.echo(est.table(tflops))
    require(data_dir is not None and out is not None, "Missing option '--data' or '--out' (see pare route --help)")
    check_output_dir(out, "route")
    record = run(teacher, student, data_dir, out, config, command=_command_line())
    _stopped(record, config.steps)
    warm = record.get("notes", {}).get("warm_start")
    if warm and warm["held_out_before"]:
        w0, w1 = warm["held_out_before"], warm["held_out_after"]
        _echo_once(f"router warm start ({warm['steps']} steps): held-out ranking error {w0['error']:.3f} -> "
                   f"{w1['error']:.3f}, distinct routes {w0['distinct_routes']} -> {w1['distinct_routes']}")  # fmt: skip
    a, b = record["val_start"], record["val_end"]
    _echo_once(f"held-out examples: error to the teacher {a['error']:.4f} -> {b['error']:.4f}, executed share of "
               f"block FLOPs {a['executed']:.3f} -> {b['executed']:.3f}, {b['distinct_routes']} distinct routes; "
               f"model: {out / 'model'}")  # fmt: skip


@app.command()
def compress(
    model: ModelSpec,
    out: Path = typer.Option(..., "--out", help="run folder: one sub-folder per stage, model/, report.html (re-running resumes)"),
    preset: str = typer.Option("quick", "--preset", help="quick (a first look on a CPU, minutes) | default (the embedded "
                               "teacher's full recipe, with cache baselines) | wan-14b (8 GPUs)"),
    heads: float | None = typer.Option(None, "--heads", help="share of attention heads removed [default: the preset's]"),
    ffn: float | None = typer.Option(None, "--ffn", help="share of FFN channels removed [default: the preset's]"),
    budget: float | None = typer.Option(None, "--budget", help="share of block FLOPs the router runs, in (0, 1] [default: the preset's]"),
    router: str = typer.Option("content", "--router", help="content (timestep + content) | timestep | static"),
    profile_videos: int | None = typer.Option(None, help="calibration trajectories of the profile stage"),
    data_videos: int | None = typer.Option(None, help="teacher trajectories for distillation and routing"),
    distill_steps: int | None = typer.Option(None, help="optimiser steps of stage 1 (distillation)"),
    guided_weight: float | None = typer.Option(None, help="stage 1's weight of the guided velocity's MSE, as `pare "
                                               "distill --guided-weight` [default: the preset's]"),
    route_steps: int | None = typer.Option(None, help="optimiser steps of stage 2 (router + student)"),
    batch_size: int | None = typer.Option(None, help="global batch of the training stages"),
    eval_n: int | None = typer.Option(None, help="prompts of the eval (and bench) stage"),
    sample_steps: int | None = typer.Option(None, help="sampling steps of every stage [default: the model's]"),
    baselines: bool | None = typer.Option(None, "--baselines/--no-baselines", help="also run `pare bench` with "
                                          "diffusers' caches (the report's Pareto plot) [default: the preset's]"),
    processes: int | None = typer.Option(None, help="processes of the training stages (accelerate launch) [default: the preset's]"),
    prompts: Path | None = typer.Option(None, "--prompts", help="prompts, one per line (required for Wan models)"),
    embeds: Embeds = None,
    images: FirstFrames = None,
    eval_prompts: Path | None = typer.Option(None, "--eval-prompts", help="held-out prompts of the eval, bench and "
                                             "report stages [default: --prompts; built-in models: their held-out ones]"),
    eval_images: Path | None = typer.Option(None, "--eval-images", help="image-to-video: held-out first frames, image "
                                            "i with eval prompt i [default: --images]"),
    seed: int = typer.Option(0, help="seed of every stage"),
    device: str | None = typer.Option(None, help="cpu | cuda [default: the preset's]"),
    dtype: DType = None,
):
    """The whole method in one command: profile, prune, data, distill, route, eval (and bench), then report.html."""
    from .compress import CompressConfig, compress as run

    config = CompressConfig(preset=preset, heads=heads, ffn=ffn, budget=budget, router=router,
                            profile_videos=profile_videos, data_videos=data_videos, distill_steps=distill_steps,
                            guided_weight=guided_weight, route_steps=route_steps, batch_size=batch_size,
                            eval_n=eval_n, sample_steps=sample_steps, baselines=baselines, processes=processes, device=device, dtype=dtype, prompts=prompts,
                            embeds=embeds, images=images, eval_prompts=eval_prompts, eval_images=eval_images,
                            seed=seed)  # fmt: skip
    run(model, out, config, command=_command_line())
    typer.echo(f"compressed model: {out / 'model'}; report: {out / 'report.html'}")


teacher_app = typer.Typer(help="The embedded default's teacher (builtin:shapes-t2v): training and shipping.", no_args_is_help=True)
app.add_typer(teacher_app, name="teacher")


@teacher_app.command("train")
def teacher_train(
    out: Path = typer.Option(..., "--out", help="run folder: checkpoint, logs, and model/ (loadable with --model)"),
    preset: str = typer.Option("shapes-t2v", help="model config: shapes-t2v (the shipped design), shapes-i2v (image-to-video, "
                               "--init-from a T2V teacher), tiny | tiny-i2v, or an earlier design: shapes-t2v-p144 | "
                               "shapes-t2v-p244 | shapes-t2v-p222-h24"),  # fmt: skip
    samples: int = typer.Option(100_000, help="total training videos (raise and re-run to train further)"),
    batch_size: int = typer.Option(32, help="videos per step"),
    lr: float = typer.Option(1e-3, help="peak learning rate (AdamW, linear warm-up)"),
    warmup_steps: int = typer.Option(200, help="warm-up steps"),
    lr_schedule: str = typer.Option("cosine", help="after warm-up: constant | cosine (to 0 at the last step)"),
    ema_decay: float = typer.Option(0.999, help="cap of the EMA decay (it warms up as 1 - (1 + step)^-2/3); model/ holds the EMA"),
    prompt_dropout: float = typer.Option(0.1, help="share of empty prompts, for classifier-free guidance"),
    timestep_shift: float = typer.Option(3.0, help="shift of the training noise levels, s -> k s / (1 + (k - 1) s), "
                                         "as the sampler's flow shift (1: plain logit-normal)"),
    qk_gain: float = typer.Option(2.0, help="initial weight of the attention q/k norms (sharper attention for small "
                                  "heads; ignored with --init-from)"),
    frame_noise: float = typer.Option(0.5, help="share of training videos with their own noise level in every frame "
                                      "(rewards binding frames together; 0: one level per video)"),
    context_frames: float = typer.Option(0.0, help="share of training videos whose first 1-3 frames are almost clean "
                                         "(rewards moving what is seen as the prompt says)"),
    two_objects: float = typer.Option(0.5, help="share of training scenes with two objects (each object's colour, "
                                      "shape and motion bound to its own words)"),
    circling: float | None = typer.Option(None, help="share of training scenes that circle [default: 1 in 11, as "
                                          "every motion]; the other motions share the rest alike"),
    object_tokens: bool = typer.Option(False, "--object-tokens/--no-object-tokens", help="give every word of an object "
                                       "phrase its phrase's words (binds each colour to its shape; fixed for a run)"),
    eval_every: int = typer.Option(500, help="steps between evaluations on held-out prompts (0: at the end only)"),
    eval_prompts: int = typer.Option(32, help="held-out prompts per evaluation"),
    checkpoint_every: int = typer.Option(250, help="steps between checkpoints (model/ is rewritten with each)"),
    stop_at_step: int = typer.Option(0, metavar="N", help="end this sitting after step N, its learning rate and data "
                                     "those of the whole --samples schedule; run again without it (or with a later N) "
                                     "to carry on as one run (0: at the last step)"),
    device: str | None = typer.Option(None, help="cuda | cpu (default: cuda when available)"),
    bf16: bool | None = typer.Option(None, "--bf16/--no-bf16", help="bf16 autocast (default: on for CUDA)"),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the transformer"),
    seed: int = typer.Option(0, help="seed of the model and the data stream"),
    init_from: str | None = typer.Option(None, "--init-from", help="a teacher model folder (or builtin:shapes-t2v) "
                                         "to continue training from in a later sitting; the optimiser is re-warmed"),
    first_frame_weight: float = typer.Option(1.0, help="image-to-video presets: weight of frame 0's velocity error "
                                             "against 1 for every other frame (the given frame must come out exact)"),
):
    """Train the shapes teacher by flow matching; re-running the same command resumes from the last checkpoint."""
    from .shapes.teacher import TeacherTrainConfig, train_teacher

    if device is not None:
        _device(device)
    cfg = TeacherTrainConfig(preset=preset, samples=samples, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
                             lr_schedule=lr_schedule, ema_decay=ema_decay, prompt_dropout=prompt_dropout,
                             timestep_shift=timestep_shift, qk_gain=qk_gain, frame_noise=frame_noise,
                             context_frames=context_frames, two_objects=two_objects, circling=circling,
                             object_tokens=object_tokens, eval_every=eval_every, eval_prompts=eval_prompts,
                             checkpoint_every=checkpoint_every, device=device, bf16=bf16, compile=compile, seed=seed,
                             init_from=init_from, first_frame_weight=first_frame_weight,
                             stop_at_step=stop_at_step)  # fmt: skip
    cfg.validate()
    check_output_dir(out, "teacher train")
    # before hours of training: the evaluation (OpenCV) and its curve (matplotlib) run at the end at least
    require_extras("pare teacher train (it evaluates its model on held-out prompts)", "cv2", "matplotlib")

    def evaluate(model_dir: Path) -> dict:
        from .loading import load_bundle
        from .shapes.domain import heldout_prompts
        from .shapes.evaluate import evaluate_model

        bundle = load_bundle(str(model_dir), device=_device(cfg.device or ("cuda" if _cuda() else "cpu")))
        scores, _ = evaluate_model(bundle, heldout_prompts(cfg.eval_prompts), progress=False)
        return scores

    record = train_teacher(cfg, out, command=_command_line(), evaluate=evaluate)
    _stopped(record, cfg.steps)
    _echo_once(f"{record['steps']} steps, {record['samples_seen']} samples, {record['train_seconds']:.0f} s; "
               f"model: {out / 'model'}")  # fmt: skip


@teacher_app.command("ship")
def teacher_ship(
    run: Path = typer.Option(..., "--run", help="a `pare teacher train` run folder"),
    dest: Path = typer.Option(Path(__file__).parent / "builtin" / "shapes-t2v", help="where the built-in model lives"),
    scores: Path | None = typer.Option(None, help="scores.json of `pare eval-shapes --n 64 --out` on the run's model"),
    guidance: float | None = typer.Option(None, help="the shipped model's default CFG scale, the one --scores were "
                                          "measured at [default: the run's]"),
):
    """Copy a run's model into the package as the built-in teacher, with its evaluator scores; it is marked
    provisional unless they meet the bar (colour, shape, direction, count, FD; see docs/teacher.md)."""
    from .shapes.teacher import ship

    check_output_dir(dest, "teacher ship", "--dest")
    require((run / "model").is_dir(), f"--run {run}: expected a `pare teacher train` folder with model/")
    evaluation = None
    if scores is not None:
        require(scores.is_file(), f"--scores {scores}: expected the scores.json of `pare eval-shapes --out`")
        evaluation = read_json_object(scores)
        require({"prompts", "scores", "real"} <= set(evaluation), f"--scores {scores} is not a `pare eval-shapes` scores.json")
    require(guidance is None or 1 <= guidance < float("inf"), f"--guidance must be a finite number of at least 1, got {guidance}")
    missing = ship(run / "model", dest, evaluation, guidance)
    typer.echo(f"shipped {run / 'model'} to {dest}" + (f" (provisional: {', '.join(missing)})" if missing else " (final)"))


@app.command("eval")
def eval_(
    model: ModelSpec,
    reference: str = typer.Option(..., "--reference", help="the model to compare against (e.g. the teacher)"),
    out: Path = typer.Option(..., "--out", help="folder for results.json and results.md"),
    prompts: HeldOutPrompts = None, n: PromptCount = 64, steps: SamplingSteps = None, guidance: Guidance = None,
    seed: VideoSeed = 0, batch_size: VideoBatch = 16, device: Device = "cpu", dtype: DType = None,  # the videos
    images: FirstFrames = None,
    vbench: bool = typer.Option(False, "--vbench", help="also score both models' videos with the official VBench "
                                "(custom-input mode, in its own environment; needs a CUDA GPU and its weights)"),
    vbench_cache: Path | None = typer.Option(None, "--vbench-cache", help="VBench's checkpoint folder (its "
                                             "VBENCH_CACHE_DIR); checked before anything is generated"),
    vbench_dimensions: str | None = typer.Option(None, "--vbench-dimensions", help="VBench dimensions, comma "
                                                 f"separated [default: {','.join(VBENCH_DIMENSIONS)}]"),
    vbench_env: Path = typer.Option(Path("~/.cache/pare/vbench-env"), "--vbench-env",
                                    help="the virtual environment VBench runs in"),
    vbench_setup: bool = typer.Option(False, "--vbench-setup", help="create --vbench-env first and install "
                                      "VBench there (a CUDA torch: several GB)"),
    vbench_python: str | None = typer.Option(None, "--vbench-python", help="interpreter for --vbench-setup "
                                             "(VBench needs 3.10 or 3.11) [default: python3.11 if found]"),
):
    """Compare a model with a reference on the same prompts and seeds: fidelity, VBench proxies, compute."""
    from .evaluation import EvalConfig, evaluate_to_folder
    from .loading import load_bundle

    require(n >= 1 and batch_size >= 1, "--n and --batch-size must be at least 1")
    check_output_dir(out, "eval")
    official = None
    if vbench:  # everything VBench needs is checked before anything is generated
        from .evaluation import official_vbench as ov

        dims = ov.parse_dimensions(vbench_dimensions or ",".join(VBENCH_DIMENSIONS))
        cache = ov.check_cache(vbench_cache, dims)
        if vbench_setup:
            ov.setup_environment(vbench_env, vbench_python or ov.main_python())
        official = (ov.check_environment(vbench_env), cache, dims)
    else:
        require(vbench_cache is None and not vbench_setup and vbench_dimensions is None,
                "--vbench-cache, --vbench-dimensions and --vbench-setup go with --vbench")  # fmt: skip
    kwargs = {"device": _device(device), "dtype": _dtype(dtype, device)}
    a, b = load_bundle(model, **kwargs), load_bundle(reference, **kwargs)
    a.images_dir = b.images_dir = images
    prompt_list = _eval_prompts(b, prompts, n, seed)
    table = evaluate_to_folder(a, b, prompt_list, EvalConfig(steps, guidance, seed, batch_size), out, official)
    typer.echo(table)
    typer.echo(f"wrote {out / 'results.json'} and {out / 'results.md'}")


def _eval_prompts(bundle, prompts: Path | None, n: int, seed: int) -> list[str]:
    """The prompts of `pare eval` and `pare bench`: from --prompts, or the held-out prompts of a shapes model."""
    from .profiling.calibration import default_prompts

    if prompts is not None:
        return default_prompts(bundle, prompts, n, seed)
    own = bundle.prompt_encoder.own_prompts(n, "heldout") if bundle.prompt_encoder is not None else None
    require(own is not None, "pass --prompts FILE (one prompt per line)")
    return own


@app.command("bench")
def bench_(
    model: str = typer.Option(..., "--model", help="the teacher: " + MODEL_HELP),
    out: Path = typer.Option(..., "--out", help="folder for results.json, results.md, pareto.png and methods/ (each "
                             "finished method, reused when the benchmark is run again)"),
    variant: list[str] = typer.Option([], "--variant", help="LABEL=FOLDER: a PARE model made from --model (repeat)"),
    baseline: list[str] = typer.Option([], "--baseline", help="LABEL=FOLDER: a model to compare as a baseline, e.g. "
                                       "static block removal or role-agnostic pruning (repeat)"),
    caches: str = typer.Option("fbc,pab,taylorseer,magcache", help="diffusers caches to run on the teacher, comma "
                               "separated, from fbc | pab | taylorseer | magcache; 'none' for none"),
    combine: list[str] = typer.Option([], "--combine", help="LABEL=CACHE: also run the --variant LABEL (a width-only "
                                      "model) with that cache, at each of its settings (repeat)"),
    prompts: HeldOutPrompts = None, n: PromptCount = 32, steps: SamplingSteps = None, guidance: Guidance = None,
    seed: VideoSeed = 0, batch_size: VideoBatch = 16, device: Device = "cpu", dtype: DType = None,  # the videos
    images: FirstFrames = None,
    timing_rounds: int = typer.Option(0, "--timing-rounds", help="time every method side by side: R rounds of one "
                                      "batch each, methods in turn, the median reported (0: each method's own run, "
                                      "stored ones included)"),
):
    """Quality vs compute of PARE models, baselines and diffusers' caches on one teacher: table and Pareto plot."""
    from .evaluation import EvalConfig
    from .evaluation.bench import Method, bench, cache_methods, write_bench
    from .loading import load_bundle

    require(n >= 1 and batch_size >= 1, "--n and --batch-size must be at least 1")
    require(timing_rounds >= 0, f"--timing-rounds must be >= 0, got {timing_rounds}")
    check_output_dir(out, "bench")
    known = {"fbc", "pab", "taylorseer", "magcache"}
    cache_names = [] if caches.strip() == "none" else [c.strip() for c in caches.split(",") if c.strip()]
    bad = [c for c in cache_names if c not in known]
    require(not bad, f"--caches takes {', '.join(sorted(known))} or none, got {', '.join(bad)}")
    pairs = []
    for family, items in (("PARE", variant), ("baseline", baseline)):
        for item in items:
            label, sep, folder = item.partition("=")
            require(sep and label and folder, f"--{'variant' if family == 'PARE' else 'baseline'} takes LABEL=FOLDER, got {item!r}")
            require(label not in {p[1] for p in pairs}, f"the label {label!r} is given twice: each row needs its own")
            pairs.append((family, label, folder))
    combined = [item.partition("=")[::2] for item in combine]  # (LABEL, CACHE), checked before anything loads
    labels = {label for family, label, _ in pairs if family == "PARE"}
    for item, (label, cache) in zip(combine, combined):
        require(label in labels and cache in known, f"--combine takes LABEL=CACHE with LABEL a --variant's and CACHE "
                f"one of {', '.join(sorted(known))}, got {item!r}")  # fmt: skip
    kwargs = {"device": _device(device), "dtype": _dtype(dtype, device)}
    teacher = load_bundle(model, **kwargs)
    methods = [Method(label, family, "", load_bundle(folder, **kwargs)) for family, label, folder in pairs]
    methods += cache_methods(teacher, cache_names)
    variants = {m.name: m.bundle for m in methods if m.family == "PARE"}
    for label, cache in combined:
        methods += cache_methods(teacher, [cache], on=(label, variants[label]))
    for bundle in {id(b): b for b in [teacher, *(m.bundle for m in methods)]}.values():
        bundle.images_dir = images
    prompt_list = _eval_prompts(teacher, prompts, n, seed)
    # finished methods are kept in OUT/methods/: an interrupted benchmark, or one with a method added, resumes
    result = bench(teacher, methods, prompt_list, EvalConfig(steps, guidance, seed, batch_size), store=out / "methods",
                   timing_rounds=timing_rounds)  # fmt: skip
    typer.echo(write_bench(result, out))
    typer.echo(f"wrote {out / 'results.json'}, {out / 'results.md'} and {out / 'pareto.png'}")


@app.command("eval-shapes")
def eval_shapes(
    model: str | None = typer.Option(None, "--model", help="a model of the shapes domain to generate with"),
    videos: Path | None = typer.Option(None, "--videos", help="score videos written by `pare generate` (their .json records name the prompts)"),
    n: int = typer.Option(64, "--n", help="held-out prompts to generate for (with --model)"),
    steps: SamplingSteps = None,
    guidance: Guidance = None,
    seed: VideoSeed = 0,
    out: Path | None = typer.Option(None, "--out", help="folder for scores.json and the generated videos"),
    device: Device = "cpu",
    dtype: DType = None,
):
    """Score videos of the shapes domain against the ground truth their prompts state."""
    from .shapes.evaluate import score_folder_or_model

    require((model is None) != (videos is None), "give exactly one of --model and --videos")
    if out is not None:
        check_output_dir(out, "eval-shapes")
    if model is not None:
        require(n >= 2, f"--n must be at least 2 (a Frechet distance needs a spread), got {n}")
    overrides = {k: v for k, v in (("steps", steps), ("guidance_scale", guidance)) if v is not None}
    result = score_folder_or_model(model, videos, n, overrides, seed, out, device=_device(device),
                                   dtype=_dtype(dtype, device))  # fmt: skip
    _print_scores(result["scores"], result["real"])
    if out is not None:
        typer.echo(f"wrote {out / 'scores.json'}" + (f" and {n} videos in {out / 'videos'}" if model else ""))


_ARGV: list[str] = []  # this process's arguments, as `main` received them


def _command_line() -> str:
    """The command as it was typed (recorded in outputs beside the resolved settings, which the records hold
    as "config"): `pare` and the arguments, quoted for a POSIX shell, so pasting it re-runs the same run."""
    return shlex.join(["pare", *_ARGV])


def _print_scores(scores: dict, reference: dict) -> None:
    typer.echo(f"{'metric':<22} {'generated':>10} {'real videos':>12}")
    for key in ("colour", "shape", "direction", "speed", "count", "motion_smoothness", "subject_consistency",
                "temporal_flickering", "fd"):  # fmt: skip
        if key in scores:
            unit = "%" if key in ("colour", "shape", "direction", "speed", "count") else ""
            typer.echo(f"{key:<22} {scores[key]:>9.2f}{unit or ' '} {reference.get(key, float('nan')):>11.2f}{unit or ' '}")
    typer.echo(f"({scores['videos']} videos; accuracies in percent; fd: Frechet distance on the domain classifier's "
               "features, 'real videos' is real vs real)")  # fmt: skip
    for k, part in scores.get("by_objects", {}).items():
        typer.echo(f"prompts with {k} object{'s' if k != '1' else ''} ({part['videos']} videos): "
                   + ", ".join(f"{key} {part[key]:.1f}%" for key in ("colour", "shape", "direction", "speed", "count")))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _dtype(name: str | None, device: str):
    from .loading import weights_dtype

    return weights_dtype(name, device)


def _device(name: str):
    import torch

    from .loading import parse_device

    device = parse_device(name)
    require(device.type != "cuda" or torch.cuda.is_available(), "--device cuda asked for, but no CUDA device is visible")
    return device


_METAVARS = {"int": "N", "float": "X", "path": "PATH", "str": "TEXT", "list[str]": "TEXT", "list[path]": "PATH"}


def _click_app():
    """The app as a click group, with a plain name for each option's value (N, X, PATH, TEXT) in --help where
    none is given, instead of typer's `<int>`-style type tags."""
    group = typer.main.get_command(app)

    def name_values(command) -> None:
        for param in command.params:  # typer's vendored click: options are told by their type name
            if param.param_type_name == "option" and param.metavar is None and not param.is_flag:
                kind = param.bare_type() if hasattr(param, "bare_type") else "str"
                param.metavar = _METAVARS.get(kind, kind.upper())
        for sub in getattr(command, "commands", {}).values():
            name_values(sub)

    name_values(group)
    return group


def main(argv: list[str] | None = None) -> int:
    """Console entry point: runs the app and turns bad input into one line on stderr and exit code 2."""
    _ARGV[:] = sys.argv[1:] if argv is None else list(argv)
    try:
        code = _click_app().main(args=argv, standalone_mode=False, prog_name="pare")
        if code == 130:  # typer turns Ctrl-C into Exit(130), returned (not raised) outside standalone mode
            raise KeyboardInterrupt
    except PareError as exc:
        typer.echo(f"pare: error: {exc}", err=True)
        return EXIT_BAD_INPUT
    except typer.TyperException as exc:  # usage errors of typer's (vendored) click: missing or malformed options
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `pare` or `pare teacher`: the help
            typer.echo(exc.ctx.get_help())
            return 0
        ctx = getattr(exc, "ctx", None)
        see = f" (see pare {ctx.info_name} --help)" if ctx is not None and ctx.parent is not None else ""
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        typer.echo(f"pare: error: {message}{see}", err=True)
        return EXIT_BAD_INPUT
    except OSError as exc:  # a path the file system refuses mid-run (disk full, a file removed): one line
        typer.echo(f"pare: error: {exc}", err=True)
        return EXIT_BAD_INPUT
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("pare: interrupted", err=True)
        return 130
    finally:
        end_processes()
    return 0


def end_processes() -> None:
    """Tear down the process group a multi-process command (torchrun, accelerate launch) set up, while the
    interpreter is whole: left to the exit, gloo's worker threads can die holding Python objects, and the process
    aborts ("terminate called without an active exception", SIGABRT) after its work is done; `entry` then leaves
    through os._exit."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        _WORKER[0] = True


_WORKER = [False]  # this process was one of a multi-process launch


def entry(argv: list[str] | None = None) -> None:
    """The `pare` console script and `python -m pare.cli`: `main`, then exit with its code. A worker of a
    multi-process launch leaves through `os._exit` once its output is flushed: objects that outlive the process group
    (FSDP's device mesh holds its gloo group) are destroyed at the interpreter's exit, where torch 2.13's gloo can
    still abort the finished worker (SIGABRT, "terminate called without an active exception"; CI saw it after an
    FSDP run). Every file a command writes is closed and renamed into place before `main` returns."""
    code = main(argv)
    if _WORKER[0]:
        import logging
        import os

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
