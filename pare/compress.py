"""`pare compress`: the whole method in one command, profile -> prune -> data -> distill -> route -> eval
(-> bench) -> report, each stage the very `pare` command a user would type by hand, in its own sub-folder.

    DIR/stages.json    each stage's command and whether it finished (what makes a re-run skip or resume it)
    DIR/profile/ prune/ data/ distill/ route/ eval/ [bench/]    the stage commands' own outputs
    DIR/model/         the compressed model (loadable everywhere --model is taken)
    DIR/report.html    one self-contained page (see `pare.report`)

A stage whose recorded command equals the one it would run now and that finished is skipped; one that was
interrupted is run again with the same command, which resumes it (data, distill and route continue from their
checkpoints; the others are minutes at most and start over). A finished stage recorded with other settings is
refused before anything runs: a compressed model is the output of one recipe.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .errors import PareError, require, require_extras
from .io import atomic_dir, check_output_dir, write_json

STAGES_FILE = "stages.json"
INTERNAL = {"model": "copy route/model to model/", "report": "write report.html"}  # stages without a command
ROUTERS = ("content", "timestep", "static")

# Recipes by target. quick: a first look on a 2-core CPU in about 9 minutes (measured in docs/results.md);
# default: the embedded teacher's full recipe, with the cache baselines; wan-14b: Wan2.1-14B on 8 GPUs (the
# training stages run under `accelerate launch`, the sampling stages on one GPU). The CPU presets route at budget
# 0.9: on the embedded teacher a router at 0.55 loses 25-78 points where one at 0.9 loses nothing beyond the width
# cut's (docs/results.md, "The default preset's router budget").
PRESETS: dict[str, dict] = {
    # the CPU presets distil on the guided velocity too, at no compute: on the embedded teacher, paired at 400 steps,
    # the width cut's worst score 6.6 points below the teacher against 9.8 without it (docs/results.md, "The width
    # cut's distillation recipe")
    "quick": dict(profile_videos=8, heads=0.25, ffn=0.25, data_videos=32, distill_steps=150, guided_weight=1.0,
                  route_steps=80, batch_size=16, budget=0.9, eval_n=16, baselines=False),
    "default": dict(profile_videos=16, heads=0.25, ffn=0.25, data_videos=128, distill_steps=400, guided_weight=1.0,
                    route_steps=200, batch_size=16, budget=0.9, eval_n=64, baselines=True),
    # the settings at which every stage fits 8 GPUs of 80 GB at 480p (scripts/wan14b_estimates.py): heads profiled on
    # a shorter, smaller video, 5 videos per sampling shard, FSDP with gradient checkpointing at one example per GPU
    "wan-14b": dict(profile_videos=64, profile_shape=(17, 240, 416), heads=0.25, ffn=0.25, data_videos=2048,
                    shard_videos=5, distill_steps=4000, route_steps=2000, batch_size=8, budget=0.6, eval_n=64,
                    baselines=False, processes=8, fsdp=True, gradient_checkpointing=True, device="cuda",
                    dtype="bf16", heads_multiple_of=8),
}  # fmt: skip
# `accelerate launch` for the training stages under FSDP: full sharding of every Wan block, bf16 compute over fp32
# master weights, the original parameters kept (route gives router and student their own learning rates)
# FSDP2 (`fully_shard`): per-parameter sharding, mixed frozen and trained parameters without use_orig_params, and
# the version whose sharded checkpoints tests/fsdp_cpu.py runs on CPU processes (FSDP1 needs an accelerator).
# cpu_ram_efficient_loading off: accelerate 1.15's broadcast loading finds each parameter through a transformers-only
# method and fails on a diffusers model's top-level parameters (WanTransformer3DModel.scale_shift_table); every
# process loads the weights itself (tensor by tensor into a meta-built model, `loading`), then shards them.
FSDP_LAUNCH = ["--mixed_precision", "bf16", "--use_fsdp", "--fsdp_version", "2", "--fsdp_reshard_after_forward", "true",
               "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP", "--fsdp_transformer_layer_cls_to_wrap",
               "WanTransformerBlock", "--fsdp_state_dict_type", "SHARDED_STATE_DICT",
               "--fsdp_cpu_ram_efficient_loading", "false"]  # fmt: skip


def launch_argv(processes: int, fsdp: bool) -> list[str]:
    """`accelerate launch` arguments (after the program) running `pare.cli` on `processes` processes."""
    return ["--num_processes", str(processes), *(FSDP_LAUNCH if fsdp else []), "-m", "pare.cli"]


@dataclass
class CompressConfig:
    """The recipe. Fields left None come from the preset (then from these defaults)."""

    preset: str = "quick"
    heads: float | None = None  # share of attention heads removed
    ffn: float | None = None  # share of FFN channels removed
    budget: float | None = None  # share of block FLOPs the router may execute
    router: str = "content"
    profile_videos: int | None = None
    data_videos: int | None = None
    distill_steps: int | None = None
    guided_weight: float | None = None  # stage 1's weight of the guided velocity's MSE (`pare distill --guided-weight`)
    route_steps: int | None = None
    batch_size: int | None = None
    eval_n: int | None = None
    sample_steps: int | None = None  # sampling steps of every stage [default: the model's]
    baselines: bool | None = None  # also run `pare bench` with diffusers' caches (the Pareto plot)
    processes: int | None = None  # processes of the training stages (accelerate launch); 1 runs them in-process
    fsdp: bool | None = None  # the training stages under FSDP (full sharding) rather than data-parallel
    gradient_checkpointing: bool | None = None  # of the training stages
    profile_shape: tuple[int, int, int] | None = None  # frames, height, width of the profile [default: the model's]
    shard_videos: int | None = None  # videos per sampling shard of the data stage [default: data_videos / 4, at most 8]
    heads_multiple_of: int | None = None
    device: str | None = None
    dtype: str | None = None
    prompts: Path | None = None
    embeds: Path | None = None
    images: Path | None = None  # an I2V model's first frames, image i with prompt i (a folder)
    # the eval, bench and report stages' prompts and first frames, held out from the ones the model is compressed on
    # [default: --prompts and --images; a built-in model without --prompts: its own held-out prompts]
    eval_prompts: Path | None = None
    eval_images: Path | None = None
    seed: int = 0
    report_prompts: int = 4

    def resolved(self) -> CompressConfig:
        """A copy with every None taken from the preset, validated."""
        require(self.preset in PRESETS, f"--preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        base = {"processes": 1, "heads_multiple_of": 1, "device": "cpu", "dtype": None, "fsdp": False,
                "gradient_checkpointing": False, "guided_weight": 0.0, **PRESETS[self.preset]}  # fmt: skip
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update({k: v for k, v in base.items() if values.get(k) is None})
        c = CompressConfig(**values)
        require(0 < c.budget <= 1, f"--budget must be in (0, 1], got {c.budget}")
        require(0 <= c.heads < 1 and 0 <= c.ffn < 1, f"--heads and --ffn must be in [0, 1), got {c.heads} and {c.ffn}")
        require(c.router in ROUTERS, f"--router must be one of {', '.join(ROUTERS)}, got {c.router!r}")
        for name in ("profile_videos", "data_videos", "distill_steps", "route_steps", "batch_size", "eval_n",
                     "processes", "report_prompts"):  # fmt: skip
            require(getattr(c, name) >= 1, f"--{name.replace('_', '-')} must be at least 1, got {getattr(c, name)}")
        require(c.guided_weight >= 0, f"--guided-weight must be >= 0, got {c.guided_weight}")
        require(c.shard_videos is None or c.shard_videos >= 1, f"--shard-videos must be at least 1, got {c.shard_videos}")
        require(not c.fsdp or c.processes > 1, "FSDP needs more than one process (--processes)")
        require(c.eval_n >= 2, f"--eval-n must be at least 2 (a Frechet distance needs a spread), got {c.eval_n}")
        require(c.sample_steps is None or c.sample_steps >= 2, f"--sample-steps must be at least 2, got {c.sample_steps}")
        for name in ("prompts", "embeds", "eval_prompts"):
            path = getattr(c, name)
            require(path is None or Path(path).is_file(), f"--{name.replace('_', '-')} {path}: no such file")
        from .loading import dtype_named, parse_device
        from .profiling.calibration import read_prompt_file

        for name in ("prompts", "eval_prompts"):  # the stages' own checks, before any of them runs
            if getattr(c, name) is not None:
                read_prompt_file(getattr(c, name), f"--{name.replace('_', '-')}")
        parse_device(c.device)
        if c.dtype is not None:
            dtype_named(c.dtype)
        for name in ("images", "eval_images"):
            path = getattr(c, name)
            require(path is None or Path(path).is_dir(),
                    f"--{name.replace('_', '-')} {path}: expected a folder of first frames")  # fmt: skip
        require(c.eval_images is None or c.images is not None,
                "--eval-images is for image-to-video models: pass --images too (the frames to compress on)")  # fmt: skip
        return c

    @property
    def held_out(self) -> tuple[Path | None, Path | None]:
        """The prompts and first frames of the eval, bench and report stages."""
        return self.eval_prompts or self.prompts, self.eval_images or self.images


@dataclass
class Stage:
    name: str
    argv: list[str]  # the `pare` command of the stage (without the leading "pare")
    work: float  # relative cost, in forwards of one video through the full model (for the time estimate; the
    # factors of the training stages, forward + backward of the student and the router's block importance, are
    # from the stage times of the quick preset on the embedded teacher, in docs/results.md)
    processes: int = 1
    fsdp: bool = False

    def command(self) -> str:
        """The command to type for this stage ("" for the two steps of compress's own: model/ and the report)."""
        import shlex

        if not self.argv:
            return ""
        launch = ["accelerate", "launch", *launch_argv(self.processes, self.fsdp)]
        return shlex.join((launch if self.processes > 1 else ["pare"]) + self.argv)


def _timesteps(steps: int) -> str:
    """Five kept sampling steps spread over `steps` (0,6,12,18,24 for 25: the profile's default)."""
    from .profiling import spread_steps

    return ",".join(map(str, spread_steps(steps)))


def plan(model: str, out: Path, c: CompressConfig, sampling_steps: int) -> list[Stage]:
    """The stage commands of a resolved recipe, in order. `sampling_steps` is the steps the stages will use
    (the model's default unless --sample-steps), for the time estimate."""
    d = Path(out).resolve()
    S = sampling_steps
    common = ["--device", c.device] + (["--dtype", c.dtype] if c.dtype else [])
    steps = ["--steps", str(c.sample_steps)] if c.sample_steps else []
    def flag(name: str, path) -> list[str]:
        return [name, str(Path(path).resolve())] if path else []

    prompts, embeds, images = flag("--prompts", c.prompts), flag("--embeds", c.embeds), flag("--images", c.images)
    held_prompts, held_images = flag("--prompts", c.held_out[0]), flag("--images", c.held_out[1])  # eval, bench
    heads_json = str(d / "profile" / "heads.json")
    shard = c.shard_videos or max(1, min(8, c.data_videos // 4))  # at least 4 shards: training holds the last one out
    shape = [] if c.profile_shape is None else [a for k, v in zip(("--frames", "--height", "--width"), c.profile_shape)
                                                for a in (k, str(v))]  # fmt: skip
    training = ["--gradient-checkpointing"] if c.gradient_checkpointing else []
    guided = ["--guided-weight", str(c.guided_weight)] if c.guided_weight else []
    stages = [
        Stage("profile", ["profile", "--model", model, "--out", str(d / "profile"), "--videos", str(c.profile_videos),
                          "--seed", str(c.seed), *steps, *shape,
                          *(["--timesteps", _timesteps(c.sample_steps)] if c.sample_steps else []),
                          *prompts, *embeds, *images, *common], c.profile_videos * S * 6),
        Stage("prune", ["prune", "--model", model, "--profile", heads_json, "--heads", str(c.heads), "--ffn", str(c.ffn),
                        "--heads-multiple-of", str(c.heads_multiple_of), "--out", str(d / "prune"), *prompts, *embeds,
                        *images, *common], 4 * S * 3 + 20),
        Stage("data", ["data", "--teacher", model, "--out", str(d / "data"), "--videos", str(c.data_videos),
                       "--shard-videos", str(shard), "--seed", str(c.seed), *steps, *prompts, *embeds, *images,
                       *common], c.data_videos * S * 2),
        Stage("distill", ["distill", "--teacher", model, "--student", str(d / "prune"), "--data", str(d / "data"),
                          "--out", str(d / "distill"), "--steps", str(c.distill_steps), "--batch-size", str(c.batch_size),
                          "--seed", str(c.seed), *guided, *training], c.distill_steps * c.batch_size * 5, c.processes, c.fsdp),
        Stage("route", ["route", "--teacher", model, "--student", str(d / "distill" / "model"), "--data", str(d / "data"),
                        "--out", str(d / "route"), "--budget", str(c.budget), "--router", c.router, "--steps",
                        str(c.route_steps), "--batch-size", str(c.batch_size), "--seed", str(c.seed), *training],
              c.route_steps * c.batch_size * 6 + c.data_videos * S * 2, c.processes, c.fsdp),
        Stage("model", [], 1),  # route/model copied to model/
        Stage("eval", ["eval", "--model", str(d / "model"), "--reference", model, "--n", str(c.eval_n), "--out",
                       str(d / "eval"), "--seed", str(c.seed), *steps, *held_prompts, *held_images, *common],
              c.eval_n * S * 2 * 2),
    ]  # fmt: skip
    if c.baselines:
        stages.append(Stage("bench", ["bench", "--model", model, "--out", str(d / "bench"), "--n", str(c.eval_n),
                                      "--seed", str(c.seed), *steps, *held_prompts, *held_images, *common,
                                      "--variant", f"width (pruned + distilled)={d / 'distill' / 'model'}",
                                      "--variant", f"width + depth (PARE)={d / 'model'}",
                                      "--baseline", f"width, pruned only={d / 'prune'}"],
                            c.eval_n * S * 2 * 6))  # fmt: skip
    stages.append(Stage("report", [], c.report_prompts * S * 2 * 2 + 30))  # report.html
    return stages


def _read_stages(out: Path) -> dict:
    path = out / STAGES_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())["stages"]
    except (ValueError, KeyError, TypeError):
        raise PareError(f"{path} is not a `pare compress` record (unreadable JSON): pick a new --out") from None


def check_resumable(out: Path, stages: list[Stage]) -> dict:
    """The record of an earlier run into `out`, refused when a finished stage ran with other settings."""
    done = _read_stages(out)
    for s in stages:
        old = done.get(s.name)
        if old and old.get("finished") and old.get("argv") != s.argv:
            raise PareError(f"{out} holds a finished {s.name} stage made with other settings ({old.get('command')}): "
                            "pick a new --out, or re-run with the settings it was made with")  # fmt: skip
    return done


def to_run(stages: list[Stage], done: dict) -> list[Stage]:
    """The first stage not finished with the same command, and every stage after it (their inputs change when it
    runs: a bench stage added to a finished run gets its report redone)."""
    for i, s in enumerate(stages):
        if not (done.get(s.name, {}).get("finished") and done[s.name].get("argv") == s.argv):
            return stages[i:]
    return []


def _run_cli(stage: Stage) -> None:
    """Run one stage command: in this process (exactly `pare ARGV`), or under `accelerate launch`."""
    if stage.processes > 1:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch_argv(stage.processes, stage.fsdp),
               *stage.argv]  # fmt: skip
        code = subprocess.call(cmd)
        require(code == 0, f"the {stage.name} stage stopped (exit code {code}); re-run the same command to resume it")
        return
    from . import cli

    saved = list(cli._ARGV)
    cli._ARGV[:] = stage.argv  # the stage's records name the stage command, as if typed by hand
    try:
        code = cli._click_app().main(args=stage.argv, standalone_mode=False, prog_name="pare")
        if code == 130:  # Ctrl-C inside the stage: typer returns it as Exit(130); the stage did not finish
            raise KeyboardInterrupt
    finally:
        cli._ARGV[:] = saved


def _export_model(out: Path) -> None:
    """DIR/model: the routed model, copied whole (its weights are complete; its base is the teacher's spec)."""
    with atomic_dir(out / "model") as tmp:
        shutil.copytree(out / "route" / "model", tmp, dirs_exist_ok=True)


def compress(model: str, out: Path, config: CompressConfig, command: str = "", progress: bool = True) -> dict:
    """Run (or resume) the recipe into `out`; returns the stages record. Bad input fails before any stage."""
    from tqdm.auto import tqdm

    from .loading import load_bundle

    c = config.resolved()
    out = Path(out)
    check_output_dir(out, "compress")
    require_extras("pare compress (its eval stage and report.html)", "cv2", "matplotlib")  # before hours of stages
    meta = load_bundle(model, weights=False)  # a model the loader refuses fails here, before any stage
    require(meta.has_weights or not model.lower().startswith("wan2.1"), f"{model} is a config without weights: "
            "pass the folder of a Wan2.1 diffusers checkpoint")  # fmt: skip
    require(meta.prompt_encoder is not None, f"{model} comes without a text encoder: `pare compress` needs one for "
            "its eval stage and report (a Wan pipeline folder has it); with --embeds, run the stages by hand")  # fmt: skip
    if meta.prompt_encoder.own_prompts(1) is None:
        require(c.prompts is not None, f"{model} has no prompts of its own: pass --prompts FILE (one prompt per line)")
    steps = c.sample_steps or int(meta.sampler_defaults.get("steps", 25))
    stages = plan(model, out, c, steps)
    done = check_resumable(out, stages)
    out.mkdir(parents=True, exist_ok=True)
    record = {"model": model, "command": command, "config": {k: (str(v) if isinstance(v, Path) else v)
                                                              for k, v in asdict(c).items()}, "stages": done}  # fmt: skip

    def save() -> None:
        write_json(out / STAGES_FILE, record)

    save()
    todo = to_run(stages, done)
    bar = tqdm(total=round(sum(s.work for s in todo)), desc="compress", unit="work", disable=not progress,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed} elapsed, about {remaining} left]")  # fmt: skip
    if c.prompts is not None and c.eval_prompts is None:
        bar.write("note: eval, bench and report use --prompts, the prompts the model is compressed on; "
                  "--eval-prompts FILE scores it on held-out ones")  # fmt: skip
    for i, s in enumerate(stages, 1):
        if s not in todo:
            bar.write(f"[{i}/{len(stages)}] {s.name}: finished earlier with the same settings, skipped")
            continue
        bar.set_description_str(f"compress, stage {i}/{len(stages)} ({s.name})")
        bar.write(f"[{i}/{len(stages)}] {s.name}: {s.command() or INTERNAL[s.name]}")
        record["stages"][s.name] = {"argv": s.argv, "command": s.command(), "finished": False}
        save()
        start = time.perf_counter()
        if s.name == "model":
            _export_model(out)
        elif s.name == "report":
            from .report import write_report

            write_report(out, model, c, progress=progress)
        else:
            _run_cli(s)
        record["stages"][s.name].update(finished=True, seconds=round(time.perf_counter() - start, 1))
        save()
        bar.update(round(s.work))
    bar.close()
    return record
