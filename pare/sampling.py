"""Flow-matching sampling through diffusers schedulers, with classifier-free guidance and a per-step record of
the compute each step really executed.

The loop is the one of diffusers' `WanPipeline.__call__` (latents in fp32, input cast to the model's dtype,
`timestep = t.expand(B)`, `noise_uncond + g * (noise_cond - noise_uncond)`, `scheduler.step`), written out so
that it takes any transformer the loader returns (full, pruned, routed) and can record, after every forward,
which blocks ran. Models that route around blocks expose `last_route`: a (N, num_blocks) bool tensor for
the N samples of the last forward; others run every block.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from torch import nn
from tqdm.auto import tqdm

from . import arch
from .errors import require
from .flops import FlopReport

# Schedulers by CLI name: factory(flow_shift) -> a diffusers scheduler. UniPC with flow sigmas is what the
# Wan2.1 pipelines ship with; FlowMatchEuler is the plain first-order solver.
SCHEDULERS: dict[str, Callable] = {
    "unipc": lambda shift: UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=shift
    ),
    "euler": lambda shift: FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift),
}


@dataclass
class SamplerConfig:
    """Knobs of the sampler."""

    steps: int = 25
    guidance_scale: float = 5.0  # classifier-free guidance; <= 1 turns the unconditional branch off
    scheduler: str = "unipc"
    flow_shift: float = 3.0  # Wan2.1 uses 3.0 at 480p and 5.0 at 720p
    seed: int = 0  # sample i of a batch uses seed + i, so a video does not depend on its batch
    batch_cfg: bool = True  # cond and uncond in one forward of 2B; False mirrors WanPipeline's two passes
    # a few-step model's own schedule: the noise level of each step's input, decreasing in (0, 1], then 0 (Euler,
    # flow_shift not applied); None: the scheduler's `steps` levels at `flow_shift`
    sigmas: list[float] | None = None

    def validate(self) -> None:
        require(self.steps >= 1, f"--steps must be at least 1, got {self.steps}")
        require(self.scheduler in SCHEDULERS, f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        require(math.isfinite(self.guidance_scale), f"--guidance must be a finite number, got {self.guidance_scale}")
        require(0 < self.flow_shift < math.inf, f"--shift must be a positive number, got {self.flow_shift}")
        if self.sigmas is not None:
            s = list(self.sigmas)
            require(len(s) == self.steps, f"this model samples on its own {len(s)}-step schedule: --steps must be "
                    f"{len(s)}, got {self.steps}")  # fmt: skip
            require(all(0 < x <= 1 for x in s) and all(b < a for a, b in zip(s, s[1:])),
                    f"a schedule's noise levels must decrease in (0, 1], got {s}")  # fmt: skip
            require(self.scheduler == "euler", f"a model's own schedule is sampled with euler, not {self.scheduler!r}")

    @property
    def uses_cfg(self) -> bool:
        return self.guidance_scale > 1.0


def few_step_levels(steps: int, flow_shift: float) -> list[float]:
    """The noise levels a few-step model's steps start at: 1, (K-1)/K, ..., 1/K, flow-shifted (s' = shift s /
    (1 + (shift - 1) s)); the schedule of the 4-step Wan distillations (timesteps 1000, 750, 500, 250 at shift 5).
    diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps(K) ends near 0 instead, a many-step schedule's end."""
    return [flow_shift * s / (1 + (flow_shift - 1) * s) for s in (1 - k / steps for k in range(steps))]


def scheduler_for(config: SamplerConfig, device=None):
    """The diffusers scheduler `config` samples with, its timesteps set for `config.steps` steps."""
    if config.sigmas is not None:  # the model's own levels, as they are (shift 1 leaves them unchanged)
        scheduler = SCHEDULERS[config.scheduler](1.0)
        scheduler.set_timesteps(sigmas=list(config.sigmas), device=device)
    else:
        scheduler = SCHEDULERS[config.scheduler](config.flow_shift)
        scheduler.set_timesteps(config.steps, device=device)
    scheduler.set_begin_index(0)
    return scheduler


def sampler_levels(config: SamplerConfig) -> list[float]:
    """The noise level of each step's input under `config` (what `StepView.sigma` reports), from 1 down."""
    return [float(s) for s in scheduler_for(config).sigmas[: config.steps]]


def schedule_sampler(sigmas: list[float], guidance: float) -> dict:
    """A few-step model's sampler as its pare.json records it: Euler on its own noise levels `sigmas`."""
    return {"steps": len(sigmas), "guidance_scale": guidance, "scheduler": "euler", "flow_shift": 1.0,
            "sigmas": list(sigmas)}  # fmt: skip


@dataclass
class Conditioning:
    """Everything a forward is conditioned on besides x_t and t."""

    prompt_embeds: torch.Tensor  # (B, L, text_dim)
    negative_embeds: torch.Tensor | None = None  # (B, L, text_dim): CFG's unconditional branch
    image_embeds: torch.Tensor | None = None  # (B, 257, image_dim): CLIP tokens of the first frame (I2V)
    latent_condition: torch.Tensor | None = None  # (B, 20, F', H', W'): mask + first-frame latents (I2V)

    @property
    def batch(self) -> int:
        return self.prompt_embeds.shape[0]


@dataclass
class StepRecord:
    """Compute of one denoising step, summed over the batch and the CFG branches."""

    step: int
    timestep: float
    forwards: int  # sample-forwards: batch x CFG branches
    blocks_run: float  # mean blocks run per sample-forward
    flops: int  # executed
    full_flops: int  # what the full (unpruned, unrouted) model would have executed


@dataclass
class StepView:
    """What `on_step` sees of one denoising step."""

    index: int
    timestep: float
    sigma: float
    x_t: torch.Tensor  # (B, C, F', H', W') fp32, the step's input
    velocity: torch.Tensor  # (B, C, F', H', W') guided velocity the step used
    cond: torch.Tensor | None = None  # the conditional branch's velocity (with CFG)
    uncond: torch.Tensor | None = None  # the unconditional branch's velocity (with CFG)


@dataclass
class SampleResult:
    latents: torch.Tensor  # (B, C, F', H', W') final, fp32
    steps: list[StepRecord] = field(default_factory=list)

    @property
    def flops(self) -> int:
        return sum(s.flops for s in self.steps)

    @property
    def full_flops(self) -> int:
        return sum(s.full_flops for s in self.steps)

    def record(self) -> list[dict]:
        return [asdict(s) for s in self.steps]


def initial_noise(shape: Sequence[int], seeds: Sequence[int]) -> torch.Tensor:
    """(B, *shape) standard normal noise, sample i drawn on the CPU from `seeds[i]` (device-independent)."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(s)) for s in seeds])


def _blocks_run(model: nn.Module, n: int) -> list[list[int]]:
    """Indices of the blocks each of the `n` samples of the last forward ran."""
    route = getattr(model, "last_route", None)
    if route is None:
        return [list(range(len(arch.blocks(model))))] * n
    return [torch.nonzero(r).flatten().tolist() for r in route.cpu()]


@torch.no_grad()
def sample(
    model: nn.Module,
    cond: Conditioning,
    latent_shape: tuple[int, int, int, int],
    config: SamplerConfig = SamplerConfig(),
    *,
    flop_report: FlopReport | None = None,
    reference_flops: int | None = None,
    noise: torch.Tensor | None = None,
    progress: bool = True,
    on_step: Callable[[StepView], None] | None = None,
) -> SampleResult:
    """Denoise from noise to a clean latent of `latent_shape` = (C, F', H', W') for each row of `cond`.

    `flop_report` (from `pare.flops.count_flops`) turns the blocks each forward ran into FLOPs; without it the
    record keeps blocks only. `reference_flops`: FLOPs of one forward of the model to compare against (the
    unpruned one, for a pruned model); default: this model with every block. `on_step(StepView)` sees every step's input and guided velocity.
    """
    config.validate()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    B = cond.batch
    cfg = config.uses_cfg
    require(not cfg or cond.negative_embeds is not None, "guidance > 1 needs negative prompt embeddings")

    scheduler = scheduler_for(config, device)
    latents = (noise if noise is not None else initial_noise(latent_shape, [config.seed + i for i in range(B)]))
    latents = latents.to(device, torch.float32)  # (B, C, F', H', W')

    def to_model(t):
        return None if t is None else t.to(device, dtype)

    pos, neg = to_model(cond.prompt_embeds), to_model(cond.negative_embeds)
    img, extra = to_model(cond.image_embeds), to_model(cond.latent_condition)
    full_per_forward = reference_flops if reference_flops is not None else flop_report.total() if flop_report else 0
    result = SampleResult(latents)

    def forward(x, t, text, image, branch, step_kwargs):
        ctx = model.cache_context(branch, **step_kwargs) if hasattr(model, "cache_context") else contextlib.nullcontext()
        with ctx:
            out = model(hidden_states=x, timestep=t.expand(x.shape[0]), encoder_hidden_states=text,
                        encoder_hidden_states_image=image, return_dict=False)[0]  # fmt: skip
        runs = _blocks_run(model, x.shape[0])
        flops = sum(flop_report.total(r) for r in runs) if flop_report else 0
        return out.float(), runs, flops

    for i, t in enumerate(tqdm(scheduler.timesteps, desc="sampling", disable=not progress, leave=False)):
        x = latents.to(dtype)
        if extra is not None:
            x = torch.cat([x, extra], dim=1)  # (B, C + 20, F', H', W') for I2V
        step_kwargs = {"step_index": i, "sigma": float(scheduler.sigmas[i]), "num_inference_steps": config.steps}
        if cfg and config.batch_cfg:
            both = torch.cat([pos, neg])
            image = None if img is None else torch.cat([img, img])
            out, runs, flops = forward(torch.cat([x, x]), t, both, image, "cond_uncond", step_kwargs)
            cond_v, uncond_v = out.chunk(2)
        else:
            cond_v, runs, flops = forward(x, t, pos, img, "cond", step_kwargs)
            if cfg:
                uncond_v, runs_u, flops_u = forward(x, t, neg, img, "uncond", step_kwargs)
                runs, flops = runs + runs_u, flops + flops_u
        velocity = uncond_v + config.guidance_scale * (cond_v - uncond_v) if cfg else cond_v
        if on_step is not None:
            on_step(StepView(i, float(t), float(scheduler.sigmas[i]), latents, velocity, cond_v if cfg else None,
                             uncond_v if cfg else None))  # fmt: skip
        latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
        result.steps.append(
            StepRecord(i, float(t), len(runs), sum(map(len, runs)) / len(runs), flops, full_per_forward * len(runs))
        )
    result.latents = latents
    return result
