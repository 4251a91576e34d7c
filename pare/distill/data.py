"""Teacher-trajectory data: the teacher's own sampler (with CFG) run over prompts, every step stored as a
training example (x_t, timestep, conditioning, the teacher's cond and uncond velocities; for a guidance-free teacher,
such as a step-distilled one, the cond velocity alone) in safetensors shards, with each video's final latent (what
step distillation regresses onto).

Layout of DIR:
    index.json               settings, teacher, and the list of finished shards
    shard-00000.safetensors  one shard = `shard_videos` trajectories = shard_videos x steps examples
With `student_steps` K (`pare data --student-steps`) a shard keeps only the K teacher steps a K-step student's
segments start at (`pare.stepdistill.segment_boundaries`), and the final latents: all that `pare step-distill`
reads, K/steps of the disk (and of the trajectory held while a shard is sampled). The index then names the
teacher steps kept (`steps_kept`) and the levels of all of them (`grid`).
Each shard is written under a temporary name and renamed when complete, and index.json is rewritten
atomically after it, so a killed run leaves no shard that is later read as whole; re-running skips the
finished shards. Text embeddings are computed once per prompt and stored once per shard.
"""

from __future__ import annotations

import bisect

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .. import arch
from ..errors import PareError, require
from ..io import atomic_path, tensor_digest, write_json
from ..loading import ModelBundle, dtype_named
from ..sampling import Conditioning, SamplerConfig, StepView, sample, sampler_levels

DATA_FORMAT, DATA_VERSION = "pare-trajectories", 2  # 2: each shard also holds its videos' final latents


@dataclass
class DataConfig:
    """Knobs of `pare data`."""

    videos: int = 64
    shard_videos: int = 8
    store: str = "fp16"  # --store: storage dtype of x_t and velocities
    seed: int = 0
    student_steps: int | None = None  # --student-steps: keep only the teacher steps a K-step student reads
    student_shift: float | None = None  # --student-shift: that student's flow shift (None: the teacher's)

    def validate(self) -> None:
        require(self.videos >= 1 and self.shard_videos >= 1, "--videos and --shard-videos must be at least 1")
        dtype_named(self.store, "--store")
        require(self.student_steps is None or self.student_steps >= 1,
                f"--student-steps must be at least 1, got {self.student_steps}")  # fmt: skip
        require(self.student_shift is None or (self.student_steps is not None and self.student_shift > 0),
                "--student-shift needs --student-steps, and must be positive")  # fmt: skip


def kept_steps(grid: list[float], sampler: SamplerConfig, config: DataConfig) -> list[int] | None:
    """The teacher steps (0-based) whose examples `config` keeps: None (all), or with `student_steps` K the K a
    K-step student's segments start at, at `student_shift` (default the teacher's own flow shift). `grid`: the
    levels of the teacher's steps (`sampler_levels(sampler)`)."""
    from ..stepdistill import segment_boundaries

    if config.student_steps is None:
        return None
    require(config.student_steps <= sampler.steps, f"--student-steps {config.student_steps}: the teacher samples "
            f"in {sampler.steps} steps, so a student takes 1 to {sampler.steps}")  # fmt: skip
    shift = sampler.flow_shift if config.student_shift is None else config.student_shift
    return segment_boundaries(grid, config.student_steps, shift)


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def write_data(out: Path, bundle: ModelBundle, prompts: list[str], sampler: SamplerConfig, shape, config: DataConfig,
               encoder=None, progress: bool = True, images: torch.Tensor | None = None) -> dict:  # fmt: skip
    """Generate (or finish generating) the data set in `out`; returns the index. An image-to-video teacher
    continues `images` (one first frame per prompt), else its own first frames of the prompts."""
    from ..profiling import fingerprint
    from ..profiling.calibration import encode_images, first_frames

    config.validate()
    model = bundle.transformer
    encoder = encoder or bundle.prompt_encoder
    if images is None:  # an I2V model's own first frames (rendered for the whole list: a resumed run draws the same)
        images = first_frames(bundle, prompts[: config.videos], None, sampler.seed)
    require(encoder is not None, f"{bundle.spec} comes without a text encoder: pass --embeds FILE.safetensors")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    grid = sampler_levels(sampler)
    keep = kept_steps(grid, sampler, config)
    settings = {"teacher": bundle.spec, "fingerprint": fingerprint(model), "sampler": vars(sampler),
                "shape": list(shape), "config": asdict(config), "prompts": prompts[: config.videos],
                **({"first_frames": tensor_digest(images[: config.videos])} if images is not None else {}),
                **({"steps_kept": keep, "grid": grid} if keep is not None else {})}  # fmt: skip
    index = _read_or_start_index(out, settings)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    store = dtype_named(config.store, "--store")
    latent_shape = (model.config.out_channels, *bundle.latent.latent_shape(*shape))
    # (1, L, D) the unconditional branch's embeddings, computed once; a guidance-free model has no such branch
    null = encoder.encode([""], device, dtype) if sampler.uses_cfg else None
    n_shards = -(-config.videos // config.shard_videos)
    done = {s["file"] for s in index["shards"]}
    bar = tqdm(total=config.videos * len(keep or range(sampler.steps)), initial=sum(s["examples"] for s in index["shards"]),
               desc="data", unit="video-step", disable=not progress)  # fmt: skip  # an example is a video-step
    for k in range(n_shards):
        name = _shard_name(k)
        if name in done:
            continue
        if (out / name).is_file():  # renamed into place, then killed before the index was written
            index["shards"].append(_shard_entry(out / name))
            bar.update(index["shards"][-1]["examples"])
        else:
            lo, hi = k * config.shard_videos, min(config.videos, (k + 1) * config.shard_videos)
            text = encoder.encode(prompts[lo:hi], device, dtype)  # once per prompt, never per step
            # I2V: the first frames' image tokens and latent condition
            image, condition = encode_images(bundle, None if images is None else images[lo:hi], prompts[lo:hi],
                                             shape, device, dtype)  # fmt: skip
            steps: list[StepView] = []
            chunk = SamplerConfig(**{**vars(sampler), "seed": sampler.seed + lo})
            cond = Conditioning(text, null.expand(hi - lo, -1, -1) if null is not None else None, image, condition)
            def on_step(view: StepView, n=hi - lo) -> None:
                if keep is None or view.index in keep:
                    steps.append(view)
                    bar.update(n)

            final = sample(model, cond, latent_shape, chunk, progress=False, on_step=on_step).latents
            tensors = _pack(steps, final, text, null, store, lo)
            if condition is not None:  # per video, as the text: examples find theirs by their `prompt` row
                tensors |= {"latent_condition": condition.to(store).cpu().contiguous(),
                            "image_embeds": image.float().cpu().contiguous()}  # fmt: skip
            with atomic_path(out / name) as tmp:
                save_file(tensors, str(tmp), metadata={"shard": str(k), "videos": f"{lo}:{hi}"})
            index["shards"].append(_shard_entry(out / name))
        index["shards"].sort(key=lambda s: s["file"])
        write_json(out / "index.json", index)
    bar.close()
    return index


def _pack(steps: list[StepView], final, text, null, store, first_video: int) -> dict:
    """A shard's tensors; without `null` (a guidance-free teacher) the conditional branch alone: its velocity is
    what the sampler integrated, and there is no v_uncond or null_text."""
    n = text.shape[0]
    x_t = torch.cat([s.x_t for s in steps])  # (steps * n, C, F', H', W'), step-major
    v_cond = torch.cat([s.cond if null is not None else s.velocity for s in steps])
    branches = {}
    if null is not None:
        branches = {"v_uncond": torch.cat([s.uncond for s in steps]).to(store).cpu().contiguous(),
                    "null_text": null.float().cpu().contiguous()}  # fmt: skip
    return {
        "x_t": x_t.to(store).cpu().contiguous(),
        "v_cond": v_cond.to(store).cpu().contiguous(),
        **branches,
        "final": final.to(store).cpu().contiguous(),  # (n, C, F', H', W') each video's sampled latent
        "timestep": torch.cat([torch.full((n,), s.timestep) for s in steps]).float(),
        "sigma": torch.cat([torch.full((n,), s.sigma) for s in steps]).float(),
        "prompt": torch.arange(n).repeat(len(steps)),  # row of `text`
        "video": (torch.arange(n) + first_video).repeat(len(steps)),
        "step": torch.tensor([s.index for s in steps]).repeat_interleave(n),  # the teacher's step
        "text": text.float().cpu().contiguous(),
    }


def _shard_entry(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        examples = f.get_slice("timestep").get_shape()[0]
    return {"file": path.name, "examples": examples}


def _read_or_start_index(out: Path, settings: dict) -> dict:
    path = out / "index.json"
    if not path.is_file():
        return {"format": DATA_FORMAT, "format_version": DATA_VERSION, **settings, "shards": []}
    index = read_index(out)
    index["config"] = {**asdict(DataConfig()), **index["config"]}  # knobs added since it was written: their defaults
    for key in ("fingerprint", "sampler", "shape", "config", "first_frames"):
        require(index.get(key) == settings.get(key),
                f"{out} holds data made with another {key}; resume with the same settings or pick a new --out")  # fmt: skip
    return index


def read_index(folder: Path) -> dict:
    path = Path(folder) / "index.json"
    try:
        index = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PareError(f"no trajectory data in {folder}: cannot read {path} ({exc})") from None
    require(index.get("format") == DATA_FORMAT, f"{path} is not a PARE trajectory data index")
    require(index.get("format_version", 0) <= DATA_VERSION, f"{folder} was written by a newer PARE: upgrade pare")
    return index


def pooled_shards(index: dict, extra: Path) -> list[dict]:
    """The finished shards of data folder `extra`, checked to pool with those of the folder whose index is `index`:
    the same teacher (fingerprint), video shape and sampler, but for its seed (another `pare data --seed`)."""
    other = read_index(extra)
    same = lambda i: (i["fingerprint"], i["shape"], {k: v for k, v in i["sampler"].items() if k != "seed"},  # noqa: E731
                      i.get("steps_kept"))  # fmt: skip
    require(same(other) == same(index), f"{extra} was made by another teacher, sampler, video shape or "
            "--student-steps than the first data folder: pooled folders differ only in `pare data --seed`")  # fmt: skip
    require(other["shards"], f"{extra} has no finished shards yet: run `pare data` first")
    return other["shards"]


class ShardedData(torch.utils.data.Dataset):
    """Examples read lazily from the finished shards of a data folder (all, or those numbered `shards`): each
    shard's file stays open, and `_read(file, path)` says what else of it to keep; `examples(s)` counts shard `s`'s
    examples, which are numbered after those of the shards before it. `more`: further data folders of the same
    teacher, sampler (but for its seed) and video shape, all of whose finished shards follow."""

    def __init__(self, folder: Path, shards: list[int] | None = None, more: list[Path] = ()):
        self.folder = Path(folder)
        self.index = read_index(self.folder)
        entries = self.index["shards"]
        require(entries, f"{folder} has no finished shards yet: run `pare data` first")
        self.entries = [entries[i] for i in shards] if shards is not None else list(entries)
        for extra in more:
            self.entries += [{**e, "folder": str(extra)} for e in pooled_shards(self.index, Path(extra))]
        self._open: dict[int, tuple] = {}
        self.offsets = [0]
        for s in range(len(self.entries)):
            self.offsets.append(self.offsets[-1] + self.examples(s))

    def examples(self, s: int) -> int:
        return self.entries[s]["examples"]

    def _read(self, f, path: Path) -> tuple:
        return (f,)

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getstate__(self) -> dict:  # data-loader workers open their own file handles
        return {**self.__dict__, "_open": {}}

    def _shard(self, s: int) -> tuple:
        """(open safetensors file, what `_read` keeps of it) of shard `s`."""
        if s not in self._open:
            path = Path(self.entries[s].get("folder", self.folder)) / self.entries[s]["file"]
            self._open[s] = self._read(safe_open(str(path), framework="pt"), path)
        return self._open[s]


class TrajectoryData(ShardedData):
    """Examples of the finished shards in a data folder, read lazily: each example's rows are safetensors slices
    of the shard files (kept open), so memory holds one example, not whole shards, whatever the access order
    (at Wan2.1-14B 480p, 81 frames, fp16, one shard of 8 trajectories x 50 steps is about 5 GB)."""

    SMALL = ("timestep", "sigma", "prompt", "null_text")  # read whole once per shard: a few values per example
    IMAGE = ("image_embeds", "latent_condition")  # an I2V teacher's, one row per video

    def _read(self, f, path: Path) -> tuple:
        keys = set(f.keys())
        return f, {k: f.get_tensor(k) for k in self.SMALL if k in keys}, [k for k in self.IMAGE if k in keys]

    def __getitem__(self, i: int) -> dict:
        s = bisect.bisect_right(self.offsets, i) - 1
        f, small, image = self._shard(s)
        j = i - self.offsets[s]
        row = lambda name, k: f.get_slice(name)[k : k + 1][0]  # noqa: E731  (one row, read from the file)
        example = {"x_t": row("x_t", j).float(), "timestep": small["timestep"][j], "sigma": small["sigma"][j],
                   "text": row("text", int(small["prompt"][j])), "v_cond": row("v_cond", j).float(),
                   **{k: row(k, int(small["prompt"][j])).float() for k in image}}  # fmt: skip
        if "null_text" in small:  # the unconditional branch of a teacher sampled with guidance
            example |= {"null_text": small["null_text"][0], "v_uncond": row("v_uncond", j).float()}
        return example
