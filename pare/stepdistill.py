"""`pare step-distill`: a few-step student that needs no classifier-free guidance, distilled from the teacher's
guided sampler by trajectory-segment regression.

Method. `pare data` runs the teacher's own sampler with guidance over N prompts and stores every step's input x_t
and each video's final latent. The K-step student samples with plain Euler on K of the teacher's own noise levels
s_0 = 1 > s_1 > ... > s_{K-1} (then 0), picked from the teacher's grid nearest to the few-step schedule at a flow
shift (`segment_boundaries`; `--flow-shift`, by default the teacher's, or the levels of the `--init-from` student a
later sitting starts from). For each video and segment k it learns the velocity that carries the teacher's
trajectory from s_k to s_{k+1} in one Euler step,

    v* = (x(s_{k+1}) - x(s_k)) / (s_{k+1} - s_k),    x(0) = the teacher's final latent,

seeing only the prompt (one forward per step, no unconditional pass), by MSE. A student that fits v* exactly
reproduces the teacher's guided samples in K forwards instead of 2 x 25.

Why this method. The teacher's work is done once, when the data is made, and a training step is one forward and
backward of the student, as in stage-1 distillation: the same data, loop (`pare.training.run`: checkpoints, resume,
several processes), and cost per step. Consistency and shortcut distillation and distribution matching (DMD, behind
CausVid and the rCM-style LoRAs) run the teacher online at every step, and DMD a second "fake" score model too: 3-5x
the compute per step, and DMD needs many steps to settle; it is here as `--method dmd` (`pare.dmd`). Progressive
distillation halves the step count in rounds (25 -> 12 -> 6 -> 3), each a training run of its own. Segment
regression is how CausVid initialises its student ("ODE regression"); its known limit is blur at 1-2 steps, where
one regression averages over several outcomes; at 4 steps each segment's map is close to deterministic.
"""

from __future__ import annotations

import bisect
import copy
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from .artifacts import base_spec
from .distill.data import ShardedData, TrajectoryData
from .errors import require
from .sampling import schedule_sampler
from .training import LoopConfig, run


METHODS = ("segment", "dmd")
SALIENCE_FROM = ("teacher", "both")


@dataclass
class StepDistillConfig(LoopConfig):
    """Knobs of `pare step-distill` (and those of every training loop; `steps` are optimiser steps)."""

    STEPS_FLAG: ClassVar[str] = "--train-steps"  # --steps is the student's sampling steps here

    student_steps: int = 4  # K: sampling steps of the student
    lr: float = 1e-4
    weight_decay: float = 0.0
    rollout_weight: float = 0.0  # weight of the rollout loss (see `rollout_loss`); 0: segment regression alone
    rollout_examples: int = 8  # examples of each batch whose rollout is trained (all processes together)
    salience_weight: float = 0.0  # A of `salience_weights`: the video's objects weigh 1 + A x their salience; 0: off
    salience_from: str = "teacher"  # whose objects weigh in the rollout loss: teacher | both (and the student's own)
    init_from: str | None = None  # a step-distilled student of the same teacher and steps to start from
    flow_shift: float | None = None  # shift of the student's K-step schedule (`few_step_levels`); None: the teacher's
    method: str = "segment"  # segment (trajectory-segment regression) | dmd (distribution matching, `pare.dmd`)
    critic_updates: int = 5  # dmd: optimiser steps per student update; the critic learns on every one
    critic_lr: float | None = None  # dmd: the critic's learning rate; None: --lr
    regression_weight: float = 0.0  # dmd: weight of the batch's segment regression beside the DMD loss
    only_steps: tuple[int, ...] | None = None  # train on these of the student's steps (1-based) only; None: all

    def validate(self) -> None:
        super().validate()
        require(self.student_steps >= 1, f"--steps must be at least 1, got {self.student_steps}")
        require(self.lr > 0, f"--lr must be positive, got {self.lr}")
        require(self.flow_shift is None or self.flow_shift > 0, f"--flow-shift must be positive, got {self.flow_shift}")
        require(self.rollout_weight >= 0, f"--rollout-weight must be >= 0, got {self.rollout_weight}")
        require(self.salience_weight >= 0, f"--salience-weight must be >= 0, got {self.salience_weight}")
        require(self.method == "segment" or not self.salience_weight, "--salience-weight belongs to --method segment")
        require(self.salience_from in SALIENCE_FROM, f"--salience-from must be one of {', '.join(SALIENCE_FROM)}, "
                f"got {self.salience_from!r}")  # fmt: skip
        require(self.salience_from == "teacher" or (self.salience_weight and self.rollout_weight),
                "--salience-from both acts on the rollout loss: it needs --salience-weight and --rollout-weight")  # fmt: skip
        require(self.method in METHODS, f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        require(self.method == "dmd" or (self.critic_lr is None and not self.regression_weight),
                "--critic-lr and --regression-weight belong to --method dmd")  # fmt: skip
        require(self.method == "segment" or not self.rollout_weight, "--rollout-weight belongs to --method segment")
        require(self.critic_updates >= 1, f"--critic-updates must be at least 1, got {self.critic_updates}")
        require(self.critic_lr is None or self.critic_lr > 0, f"--critic-lr must be positive, got {self.critic_lr}")
        require(self.regression_weight >= 0, f"--regression-weight must be >= 0, got {self.regression_weight}")
        if self.only_steps is not None:
            require(self.only_steps and len(set(self.only_steps)) == len(self.only_steps)
                    and all(1 <= k <= self.student_steps for k in self.only_steps),
                    f"--only-steps must name distinct steps in 1..{self.student_steps}, got {list(self.only_steps)}")
            # the rollout loss runs, and trains, every step
            require(self.method == "segment" and not self.rollout_weight,
                    "--only-steps trains a step expert by segment regression: leave out --rollout-weight and --method dmd")
        require(not self.rollout_weight or 1 <= self.rollout_examples <= self.batch_size,
                f"--rollout-examples must be in [1, --batch-size], got {self.rollout_examples}")  # fmt: skip


def segment_boundaries(grid: list[float], k: int, flow_shift: float) -> list[int]:
    """Indices into the teacher's grid (the noise levels of its steps' inputs, decreasing from 1) of the K levels
    the student's steps start at: index 0, then the levels nearest to the K-step schedule at `flow_shift`
    (`few_step_levels`), each after the one before and leaving room for the rest."""
    from .sampling import few_step_levels

    return grid_picks(grid, few_step_levels(k, flow_shift))


def grid_picks(grid: list[float], levels: list[float]) -> list[int]:
    """Indices into the teacher's grid of `levels` (decreasing from 1): index 0, then each level's nearest, each
    after the one before and leaving room for the rest."""
    k = len(levels)
    require(1 <= k <= len(grid), f"--steps {k}: the teacher samples in {len(grid)} steps; a student takes 1 to {len(grid)}")
    picks = [0]
    for level in levels[1:]:
        rest = k - len(picks) - 1  # picks still to make after this one
        picks.append(min(range(picks[-1] + 1, len(grid) - rest), key=lambda j: abs(grid[j] - level)))
    return picks


def few_step_lineage(spec: str) -> str | None:
    """The teacher a model folder was step-distilled from: its own `base` for a `pare step-distill` student, the
    student's for one's `pare prune` or `pare distill` output (width cuts, no router), its `pare experts` or a group
    taken from them, followed through the chain of pare.json files. None for anything else."""
    from .artifacts import read_manifest
    from .loading import resolve_base

    folder = Path(spec)
    while folder.is_dir() and (folder / "pare.json").exists():
        manifest = read_manifest(folder)
        if manifest["kind"] == "step-distilled":
            return manifest["base"]
        if manifest["kind"] not in ("pruned", "distilled", "step-experts", "expert-group") or not manifest["base"]:
            return None
        folder = Path(resolve_base(manifest["base"], folder))
    return None


def boundary_rows(data_dir: Path, index: dict, boundaries: list[int]) -> list[int]:
    """Where in the data of `index` (the folder `data_dir`) the examples of the teacher steps `boundaries` are: the
    steps themselves where it holds every step, their places among those `pare data --student-steps` kept."""
    kept = index.get("steps_kept")
    if kept is None:
        return list(boundaries)
    require(set(boundaries) <= set(kept), f"{data_dir} holds only the teacher steps {kept} (`pare data "
            f"--student-steps {len(kept)}`), and this student's steps start at teacher steps {boundaries}: make data "
            "for this student's steps and shift, or without --student-steps")  # fmt: skip
    return [kept.index(b) for b in boundaries]


class SegmentData(ShardedData):
    """Examples (video, segment) of a `pare data` folder for a student whose steps start at the data's steps
    `boundaries` (the teacher's steps, or places among those `pare data --student-steps` kept): the input x_t and
    timestep of the segment's start, the prompt's embedding, and the target velocity v* of the module docstring.
    Rows are read lazily from the shards, as `TrajectoryData` does.
    `segments`: the student's steps (0-based) whose examples it holds (default all)."""

    def __init__(self, folder: Path, boundaries: list[int], shards: list[int] | None = None, more: list[Path] = (),
                 segments: list[int] | None = None):  # fmt: skip
        self.boundaries = list(boundaries)
        self.segments = list(range(len(self.boundaries))) if segments is None else sorted(segments)
        super().__init__(folder, shards, more)
        grid = self.grid()
        require(self.boundaries[-1] < len(grid), f"{folder} holds {len(grid)}-step trajectories: too few for these boundaries")
        self.levels = [grid[b] for b in self.boundaries]  # the student's schedule

    def examples(self, s: int) -> int:
        return self._shard(s)[1] * len(self.segments)

    def _read(self, f, path: Path) -> tuple:
        """(file, videos, steps, the I2V conditioning it holds) of a shard."""
        keys = set(f.keys())
        require("final" in keys, f"{path} has no final latents (data made by an older PARE): run `pare data` "
                "again into a new folder")  # fmt: skip
        n = f.get_slice("final").get_shape()[0]
        return f, n, f.get_slice("sigma").get_shape()[0] // n, [k for k in TrajectoryData.IMAGE if k in keys]

    def grid(self) -> list[float]:
        """The teacher's noise levels, one per step of its sampler (each step's input), as stored."""
        f, n, steps, _ = self._shard(0)
        sigma = f.get_tensor("sigma")
        return [float(sigma[j * n]) for j in range(steps)]

    def image_keys(self) -> list[str]:
        """The I2V conditioning its examples carry (none for a text-to-video teacher's data)."""
        return self._shard(0)[3]

    def null_text(self) -> torch.Tensor | None:
        """(1, L, D) the unconditional branch's embeddings of a teacher sampled with guidance, else None."""
        f = self._shard(0)[0]
        return f.get_tensor("null_text").float() if "null_text" in f.keys() else None

    def locate(self, i: int) -> tuple[int, int, int]:
        """(shard, video row in the shard, segment) of example `i`."""
        s = bisect.bisect_right(self.offsets, i) - 1
        n = self._shard(s)[1]
        k, p = divmod(i - self.offsets[s], n)
        return s, p, self.segments[k]

    def final(self, i: int) -> torch.Tensor:
        """The teacher's final latent of example `i`'s video."""
        s, p, _ = self.locate(i)
        return self._shard(s)[0].get_slice("final")[p : p + 1][0].float()

    def __getitem__(self, i: int) -> dict:
        s, p, k = self.locate(i)
        f, n, _, image = self._shard(s)
        row = lambda name, j: f.get_slice(name)[j : j + 1][0].float()  # one row, read from the file
        b = self.boundaries[k]
        x, sigma = row("x_t", b * n + p), self.levels[k]
        if k + 1 < len(self.boundaries):
            nxt, sigma_next = row("x_t", self.boundaries[k + 1] * n + p), self.levels[k + 1]
        else:
            nxt, sigma_next = row("final", p), 0.0
        prompt = int(f.get_slice("prompt")[b * n + p : b * n + p + 1][0])
        return {"x_t": x, "timestep": torch.tensor(sigma * 1000.0), "text": row("text", prompt),
                "target": (nxt - x) / (sigma_next - sigma), "segment": torch.tensor(k), "final": row("final", p),
                **{key: row(key, prompt) for key in image}}  # fmt: skip


def euler_rollout(model, noise: torch.Tensor, text: torch.Tensor, levels: list[float], image: dict | None = None) -> torch.Tensor:
    """The student's sampler on its own schedule: Euler from `noise` at levels[0] through each level to 0, one
    forward per step (timestep = level x 1000, as diffusers' FlowMatchEulerDiscreteScheduler gives it). `image`:
    an I2V model's `image_embeds` and `latent_condition` rows."""
    from .distill import image_kwargs, model_input

    image = image or {}
    x = noise.float()
    dtype = next(model.parameters()).dtype
    for sigma, sigma_next in zip(levels, [*levels[1:], 0.0]):
        t = torch.full((x.shape[0],), sigma * 1000.0, device=x.device)
        v = model(hidden_states=model_input(image, x).to(dtype), timestep=t, encoder_hidden_states=text.to(dtype),
                  return_dict=False, **{name: value.to(dtype) for name, value in image_kwargs(image).items()})[0]  # fmt: skip
        x = x + (sigma_next - sigma) * v.float()
    return x


@torch.no_grad()
def segment_error_sums(model, data: SegmentData, rows: list[int], device, batch_size: int = 32) -> dict:
    """Sums of the segment velocities' squared error and of the targets' squared norm; and for each video whose
    first segment is among `rows`, the K-step sample from its starting noise against the teacher's final latent."""
    from .distill import stack_examples

    sums = {"error": [0.0, 0.0], "final_error": [0.0, 0.0], "examples": 0, "videos": 0}
    starts: list[dict] = []  # each video's first segment, as read above (x_t: its starting noise; final; conditioning)
    for lo in range(0, len(rows), batch_size):
        chunk = rows[lo : lo + batch_size]
        batch = stack_examples([data[i] for i in chunk], device)
        v = segment_velocity(model, batch).float()
        sums["error"][0] += (v - batch["target"]).pow(2).sum().item()
        sums["error"][1] += batch["target"].pow(2).sum().item()
        sums["examples"] += len(v)
        starts += [{key: batch[key][j] for key in ("x_t", "text", "final", *TrajectoryData.IMAGE) if key in batch}
                   for j, k in enumerate(batch["segment"].tolist()) if k == 0]  # fmt: skip
    for lo in range(0, len(starts), batch_size):
        chunk = starts[lo : lo + batch_size]
        first = {key: torch.stack([c[key] for c in chunk]) for key in chunk[0]}
        final = first["final"]
        image = {k: first[k] for k in TrajectoryData.IMAGE if k in first}
        x = euler_rollout(model, first["x_t"], first["text"], data.levels, image)
        sums["final_error"][0] += (x - final).pow(2).sum().item()
        sums["final_error"][1] += final.pow(2).sum().item()
        sums["videos"] += len(chunk)
    return sums


def salience_weights(final: torch.Tensor, strength: float, also: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 1, F, H, W) loss weights from the teacher's final latents (B, C, F, H, W): 1 + strength x s / mean(s),
    s the distance (over channels) of each position from the video's per-channel median, its background. A video's
    objects then weigh more than its background, a small object as much per position as a large one: a plain mean
    squared error over the whole latent weighs a small object's few positions little, and the students drop exactly
    those (`pare.shapes.evaluate.count_misses`: the dropped object of a two-object video is the smaller one).
    `also`: other latents of the same videos (the student's own rollout), whose distance from the teacher's
    background counts where it is the larger, so that an object the student draws and the teacher does not (a
    second copy, the other way students miss the count) weighs as much as one it leaves out."""
    background = final.flatten(2).median(-1).values[..., None, None, None]
    s = (final - background).norm(dim=1, keepdim=True)
    if also is not None:
        s = torch.maximum(s, (also - background).norm(dim=1, keepdim=True))
    return 1 + strength * s / s.mean((2, 3, 4), keepdim=True).clamp_min(1e-8)


def weighted_mse(a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error, each position's error times `weights` (broadcast over channels) and divided by their
    mean, so the loss keeps a plain MSE's scale (None: the plain MSE)."""
    error = (a - b) ** 2
    return error.mean() if weights is None else (error * weights).mean() / weights.mean()


def rollout_loss(model, batch: dict, levels: list[float], salience: float = 0.0,
                 salience_from: str = "teacher") -> torch.Tensor:
    """MSE of the student's own Euler rollout from each example's x_t (at its segment's level, through the levels
    after it to 0) to the teacher's final latent, backpropagated through every step. Segment regression trains each
    step from the teacher's trajectory; at sampling time a step starts where the student's previous steps left it,
    and their errors compound: this loss trains the steps on their own path (exposure bias). `salience`: weighted
    by `salience_weights` of that strength, from the teacher's final latents or, `salience_from` "both", from them
    and the rollout's own (held fixed: the weights are not a path for the gradient)."""
    errors, total = 0.0, 0.0
    for k in batch["segment"].unique().tolist():
        pick = (batch["segment"] == k).nonzero().flatten()
        sub = {key: value[pick] for key, value in batch.items()}
        image = {key: sub[key] for key in TrajectoryData.IMAGE if key in sub}
        x = euler_rollout(model, sub["x_t"], sub["text"], levels[k:], image)
        also = x.detach() if salience_from == "both" else None
        w = salience_weights(sub["final"], salience, also) if salience else torch.ones_like(sub["final"][:, :1])
        errors = errors + ((x - sub["final"]) ** 2 * w).sum()
        total += w.expand_as(sub["final"]).sum()
    return errors / total


def segment_velocity(model, batch: dict) -> torch.Tensor:
    """The model's velocity on a batch of segment starts (with an I2V teacher's conditioning when it has some)."""
    from .distill import image_kwargs, model_input

    return model(hidden_states=model_input(batch), timestep=batch["timestep"], encoder_hidden_states=batch["text"],
                 return_dict=False, **image_kwargs(batch))[0]  # fmt: skip


class StepDistillStage:
    """The loss, validation and export of step distillation for `pare.training.run`."""

    name = "step-distill"

    def __init__(self, config: StepDistillConfig, base: str, sampler: dict, evaluator=None):
        self.config, self.base, self.sampler, self.evaluator = config, base, sampler, evaluator
        self.levels, self.rank = list(sampler["sigmas"]), 0

    def prepare(self, accelerator) -> None:
        self.rank = accelerator.process_index
        # DDP expects one forward per backward; the rollout's several forwards per step are not verified under it
        require(not self.config.rollout_weight or accelerator.num_processes == 1,
                "--rollout-weight is supported in one process only: run it without torchrun / accelerate launch")  # fmt: skip

    def param_groups(self, model) -> list[dict]:
        from .routing.experts import is_step_experts

        params = list(model.parameters())
        if self.config.only_steps is not None and is_step_experts(model):
            # only the blocks of these steps' groups: the others, and the parts every group shares (embedding,
            # condition embedder, output head), stay as they are, so the other steps compute what they did
            runs = {b for k in self.config.only_steps for b in model.config.step_routes[k - 1]}
            params = [p for i, block in enumerate(model.blocks) if i in runs for p in block.parameters()]
        return [{"params": params, "lr": self.config.lr, "weight_decay": self.config.weight_decay}]

    def loss(self, model, batch, step):
        salience = self.config.salience_weight
        weights = salience_weights(batch["final"], salience) if salience else None
        loss = weighted_mse(segment_velocity(model, batch).float(), batch["target"], weights)
        if not self.config.rollout_weight:
            return loss, {}
        # every stride-th example of the global batch, whatever the number of processes (each holds a slice of it)
        stride, local = max(1, self.config.batch_size // self.config.rollout_examples), len(batch["x_t"])
        pick = torch.tensor([i for i in range(local) if (self.rank * local + i) % stride == 0], dtype=torch.long)
        rollout = rollout_loss(model, {k: v[pick.to(v.device)] for k, v in batch.items()}, self.levels, salience,
                               self.config.salience_from)  # fmt: skip
        return loss + self.config.rollout_weight * rollout, {"segment": loss.detach(), "rollout": rollout.detach()}

    def validate(self, model, data: SegmentData, rows, device, batch_size) -> dict:
        return segment_error_sums(model, data, rows, device, batch_size)

    def summarize(self, sums: dict) -> dict:
        ratio = lambda pair: pair[0] / pair[1] if pair[1] else None
        return {"error": ratio(sums["error"]), "final_error": ratio(sums["final_error"]), "examples": sums["examples"],
                "videos": sums["videos"]}  # fmt: skip

    def evaluate(self, folder: Path, step: int) -> dict | None:
        """The domain's scores of the exported student on held-out prompts (a model with a domain evaluator)."""
        return None if self.evaluator is None else {"samples": step * self.config.batch_size, **self.evaluator(folder)}

    def evaluated(self, eval_file: Path) -> None:
        from .shapes.teacher import CURVE_FILE, plot_eval_curve

        plot_eval_curve(eval_file, eval_file.parent / CURVE_FILE, xlabel="training examples seen (video, step)")

    def export(self, folder, model, weights, record) -> None:
        from .distill import export_model

        export_model(folder, model, weights, self.base, "step-distilled", record, sampler=self.sampler)


def step_distill(teacher_spec: str, data_dir: Path, out: Path, config: StepDistillConfig, command: str = "",
                 progress: bool = True, evaluate=None, prompts: list[str] | None = None,
                 more_data: list[Path] = ()) -> dict:  # fmt: skip
    """Run (or resume) step distillation of the teacher that made `data_dir`; returns the final record. The
    student starts as a copy of the teacher; its exported folder samples with its own K-step schedule, without
    guidance. `evaluate(model_folder)` -> scores runs every `eval_every` steps and at the end (eval.jsonl and its
    curve). `prompts`: --method dmd's pool of prompts (None: those of the data's videos). `more_data`: further
    data folders of the teacher (another `pare data --seed`) whose every shard joins the training examples; the
    held-out shard stays `data_dir`'s last."""
    from .distill.data import read_index
    from .loading import load_bundle
    from .profiling import fingerprint

    config.validate()
    folders = [Path(d).resolve() for d in (data_dir, *more_data)]
    require(len(set(folders)) == len(folders), "--data and --more-data name one folder twice: its videos would count "
            "twice (--more-data takes other `pare data --seed` folders)")  # fmt: skip
    index = read_index(data_dir)
    teacher = load_bundle(teacher_spec)
    require(index["fingerprint"] == fingerprint(teacher.transformer),
            f"{data_dir} was made by another teacher than {teacher_spec}: step distillation regresses that teacher's "
            "samples")  # fmt: skip
    require(len(index["shards"]) >= 2, f"{data_dir} needs at least 2 finished shards: the last one is held out")
    grid = index.get("grid") or SegmentData(data_dir, [0], [0]).grid()  # the levels of all the teacher's steps
    earlier = load_bundle(config.init_from) if config.init_from else None
    own = earlier.sampler_defaults.get("sigmas") if earlier else None
    require(earlier is None or (few_step_lineage(config.init_from) == base_spec(teacher_spec)
                                and len(own or []) == config.student_steps),
            f"--init-from {config.init_from}: expected a `pare step-distill` student of this teacher in "
            f"{config.student_steps} steps, or its `pare prune` / `pare distill` / `pare experts` output")  # fmt: skip
    require(earlier is None or config.flow_shift is None or getattr(earlier.transformer.config, "route_mode", None) != "steps",
            f"--init-from {config.init_from} holds step experts, routed by its own levels: leave out --flow-shift "
            "(or make the experts from a student on the new levels)")  # fmt: skip
    if earlier is not None and config.flow_shift is None:  # a later sitting keeps the student's own levels
        shift, boundaries = None, grid_picks(grid, own)
    else:
        shift = index["sampler"]["flow_shift"] if config.flow_shift is None else config.flow_shift
        boundaries = segment_boundaries(grid, config.student_steps, shift)
    rows = boundary_rows(data_dir, index, boundaries)
    last = len(index["shards"]) - 1
    segments = None if config.only_steps is None else [k - 1 for k in config.only_steps]
    train = SegmentData(data_dir, rows, list(range(last)), more_data, segments)
    val = SegmentData(data_dir, rows, [last], segments=segments)
    sampler = schedule_sampler(train.levels, guidance=1.0)
    record = {"teacher": teacher_spec, "data": str(Path(data_dir).resolve()), "command": command,
              **({"more_data": [str(Path(d).resolve()) for d in more_data]} if more_data else {}),
              "flow_shift": shift, "boundaries": boundaries, "teacher_steps": len(grid), "teacher_guidance": index["sampler"]["guidance_scale"],
              "sampler": sampler}  # fmt: skip
    student = teacher.transformer.float().train()
    if earlier is not None:
        # its levels may differ from this run's (another --flow-shift): the student then learns its new schedule.
        # A pruned student keeps its widths: the run then trains PARE's cut on the teacher's trajectories
        student = earlier.transformer.float().train()
        record["init_from"] = str(Path(config.init_from).resolve())
        record["init_levels"] = own
    from .routing.experts import is_step_experts

    if config.method == "segment":
        stage, model = StepDistillStage(config, base_spec(teacher_spec), sampler, evaluate), student
    else:
        from .dmd import DMDStage, StudentAndCritic

        require(not train.image_keys(), "--method dmd takes a text-to-video teacher (an image-to-video one: --method "
                "segment)")  # fmt: skip
        require(not prompts or teacher.prompt_encoder is not None,
                f"{teacher_spec} comes without a text encoder to encode --prompts: leave --prompts out and --method "
                "dmd trains on the prompts of the data's videos")  # fmt: skip
        # the critic starts as the teacher (what the student's samples look like at first, when it is the teacher)
        frozen = load_bundle(teacher_spec).transformer  # the teacher's weights (the student may hold --init-from's)
        critic = copy.deepcopy(frozen).float().train()
        if prompts:  # every prompt encoded once now: one the encoder refuses stops the run before anything is written
            for lo in range(0, len(prompts), 256):
                teacher.prompt_encoder.encode(prompts[lo : lo + 256], torch.device("cpu"), torch.float32)
            record["prompts"] = {"count": len(prompts), "digest": hashlib.sha256("\n".join(prompts).encode()).hexdigest()}
        stage = DMDStage(config, base_spec(teacher_spec), sampler, evaluate, frozen,
                         train.null_text(), index["sampler"]["guidance_scale"], prompts, teacher.prompt_encoder)  # fmt: skip
        model = StudentAndCritic(student, critic)
    stage.unused_parameters = is_step_experts(student)  # under DDP: a group with no rows in a batch has no gradient
    return run(stage, model, train, val, out, config, record, progress)
