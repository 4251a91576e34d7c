"""Distribution matching for `pare step-distill --method dmd`: the few-step student's samples are pushed toward
the teacher's guided distribution, not toward the teacher's sample from the same noise.

Method (DMD2, Yin et al. 2024, the recipe behind CausVid's and the rCM-style few-step Wan models). Two models are
trained: the K-step student G and a critic ("fake score") that tracks the distribution of G's samples; the teacher
stays frozen. Each optimiser step:

1. G makes x0 = G's clean-video estimate at one of its K levels s_k, from fresh noise carried by G's own Euler
   steps through s_0 .. s_{k-1} without gradient (backward simulation: G is trained on the inputs it meets when it
   samples);
2. the critic learns the velocity of noised, detached x0: flow matching, x_t = (1 - t) x0 + t eps, target eps - x0;
3. every `critic_updates`-th step also G: x0 is noised to a random t, the teacher's guided velocity and the
   critic's give two clean estimates, real and fake, and G's x0 moves along fake - real (normalised per video by
   mean |x0 - real|): the gradient of the KL divergence from the teacher's distribution to G's (DMD's surrogate
   loss 0.5 ||x0 - stopgrad(x0 - grad)||^2 has exactly that gradient).

Why it is here beside segment regression: regression fits each noise to the teacher's sample from that noise, an
average over what a few steps cannot tell apart (blur, lost detail in shape and motion), and a student that misses
a target by a little compounds it over its steps. Distribution matching asks only that the student's samples look
like the teacher's. It costs more per step (the critic's update and, on G's steps, two teacher forwards and one
critic forward, plus the backward-simulation forwards), and it needs no teacher videos: the data folder gives the
unconditional embedding, the levels and the held-out validation, and the prompts unless a pool is given
(`--prompts`, by default a model's own training prompts: 4,096 of the built-in domain's, far more than its data
has videos). `--regression-weight` adds the segment loss of the batch (DMD's original regulariser), and
`--init-from` starts from a segment-regression student, the usual start. The loop's EMA (`--ema-decay`) counts
optimiser steps, of which the student changes on one in `critic_updates`: a decay d is d^critic_updates per
student update.

Written here rather than taken from a library: diffusers ships DMD only as research examples tied to their
pipelines; this is the loss and the update schedule, on PARE's shared loop (checkpoints, resume, EMA, evaluation).
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import require
from .stepdistill import StepDistillStage, segment_velocity

T_MIN, T_MAX = 0.02, 0.98  # noise levels of the distribution-matching gradient (DMD2: timesteps 20 to 980)


class StudentAndCritic(nn.Module):
    """DMD's two trained models as one module, so that the shared loop's one model, optimiser, checkpoint and EMA
    carry both. Its forward is not used: the stage calls `student` and `critic`."""

    def __init__(self, student: nn.Module, critic: nn.Module):
        super().__init__()
        self.student, self.critic = student, critic

    def forward(self, *args, **kwargs):
        raise TypeError("StudentAndCritic is called through .student and .critic")

    def enable_gradient_checkpointing(self) -> None:  # what the loop calls for --gradient-checkpointing
        self.student.enable_gradient_checkpointing()
        self.critic.enable_gradient_checkpointing()


def velocity(model, x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """`model`'s velocity (fp32) at x of noise level `sigma` (one per row), timestep = sigma x 1000."""
    dtype = next(model.parameters()).dtype
    return model(hidden_states=x.to(dtype), timestep=sigma * 1000.0, encoder_hidden_states=text.to(dtype),
                 return_dict=False)[0].float()  # fmt: skip


def per_row(t: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1, 1), to scale video latents row by row."""
    return t.view(-1, *[1] * 4)


def student_sample(student, noise: torch.Tensor, text: torch.Tensor, levels: list[float], k: int, grad: bool) -> torch.Tensor:
    """The student's clean estimate x0 = x - s_k v at its k-th level, x reached from `noise` by its own Euler
    steps through levels[0 .. k-1] without gradient; the last forward with gradient when `grad`."""
    x, rows = noise.float(), noise.shape[0]
    level = lambda s: torch.full((rows,), s, device=x.device)
    with torch.no_grad():
        for s, s_next in zip(levels[:k], levels[1 : k + 1]):
            x = x + (s_next - s) * velocity(student, x, level(s), text)
    with torch.set_grad_enabled(grad):
        return x - levels[k] * velocity(student, x, level(levels[k]), text)


def dmd_surrogate(x0: torch.Tensor, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """0.5 mean((x0 - stopgrad(x0 - g))^2) with g = (fake - real) / mean|x0 - real| per video: its gradient in x0 is
    g / numel, the distribution-matching direction (DMD2's normalised form)."""
    dims = tuple(range(1, x0.dim()))
    scale = (x0.detach() - real).abs().mean(dim=dims, keepdim=True).clamp_min(1e-8)
    g = (fake - real) / scale
    return 0.5 * torch.nn.functional.mse_loss(x0, (x0 - g).detach())


class DMDStage(StepDistillStage):
    """The losses and update schedule of distribution matching on the shared loop; validation, evaluation and
    export are those of segment regression (the student alone is exported)."""

    def __init__(self, config, base: str, sampler: dict, evaluate, teacher, null_text: torch.Tensor | None,
                 guidance: float, prompts: list[str] | None = None, encoder=None):  # fmt: skip
        super().__init__(config, base, sampler, evaluate)
        self.teacher, self.null_text, self.guidance = teacher, null_text, guidance
        self.prompts, self.encoder = prompts, encoder  # the student's prompts (None: those of the batch's videos)

    def prepare(self, accelerator) -> None:
        super().prepare(accelerator)
        # the student's and the critic's losses use several forwards per backward, which DDP does not verify
        require(accelerator.num_processes == 1,
                "--method dmd runs in one process: run it without torchrun / accelerate launch")  # fmt: skip
        dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32
        self.teacher = self.teacher.to(accelerator.device, dtype).eval().requires_grad_(False)
        if self.null_text is not None:
            self.null_text = self.null_text.to(accelerator.device)

    def param_groups(self, model) -> list[dict]:
        c = self.config
        return [{"params": list(model.student.parameters()), "lr": c.lr, "weight_decay": c.weight_decay},
                {"params": list(model.critic.parameters()), "lr": c.critic_lr or c.lr, "weight_decay": c.weight_decay}]  # fmt: skip

    def clip_groups(self, model) -> list[list]:
        """Each model's gradient is clipped on its own (their losses have nothing in common)."""
        return [list(model.student.parameters()), list(model.critic.parameters())]

    def student_step(self, step: int) -> bool:
        """Whether step `step` (0-based) also updates the student: the last of every `critic_updates` steps."""
        return step % self.config.critic_updates == self.config.critic_updates - 1

    def real_velocity(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The teacher's velocity as its sampler uses it: guided, cond and uncond in one forward of 2B."""
        if self.null_text is None or self.guidance == 1.0:
            return velocity(self.teacher, x, t, text)
        null = self.null_text.expand(len(x), -1, -1)
        cond, uncond = velocity(self.teacher, torch.cat([x, x]), torch.cat([t, t]), torch.cat([text, null])).chunk(2)
        return uncond + self.guidance * (cond - uncond)

    def loss(self, model, batch, step):
        student, critic, text = model.student, model.critic, batch["text"]
        # the random draws are a function of (seed, step): a resumed run draws what an uninterrupted one would
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step)
        draw = lambda *shape: torch.randn(*shape, generator=g).to(text.device)
        uniform = lambda n, lo, hi: (lo + (hi - lo) * torch.rand(n, generator=g)).to(text.device)
        rows, shape = batch["x_t"].shape[0], batch["x_t"].shape[1:]
        if self.prompts:  # prompts of the pool, encoded as they come (a Wan text encoder's pool would not fit)
            pick = torch.randint(len(self.prompts), (rows,), generator=g).tolist()
            text = self.encoder.encode([self.prompts[i] for i in pick], text.device, torch.float32)
        k = int(torch.randint(len(self.levels), (1,), generator=g))
        train_student = self.student_step(step)
        noise = draw(rows, *shape)
        x0 = student_sample(student, noise, text, self.levels, k, grad=train_student)
        parts, loss = {}, 0.0
        if train_student:
            t, eps = uniform(rows, T_MIN, T_MAX), draw(rows, *shape)
            x_t = (1 - per_row(t)) * x0.detach() + per_row(t) * eps
            with torch.no_grad():
                real = x_t - per_row(t) * self.real_velocity(x_t, t, text)
                fake = x_t - per_row(t) * velocity(critic, x_t, t, text)
            dmd = dmd_surrogate(x0, real, fake)
            loss, parts["dmd"] = dmd, dmd.detach()
            if self.config.regression_weight:
                seg = torch.nn.functional.mse_loss(segment_velocity(student, batch).float(), batch["target"])
                loss, parts["segment"] = loss + self.config.regression_weight * seg, seg.detach()
        # the critic: flow matching on the student's samples
        t, eps = uniform(rows, 0.0, 1.0), draw(rows, *shape)
        clean = x0.detach()
        x_t = (1 - per_row(t)) * clean + per_row(t) * eps
        critic_loss = torch.nn.functional.mse_loss(velocity(critic, x_t, t, text), eps - clean)
        parts["critic"] = critic_loss.detach()
        return loss + critic_loss, parts

    def validate(self, model, data, rows, device, batch_size) -> dict:
        return super().validate(model.student, data, rows, device, batch_size)

    def export(self, folder, model, weights, record) -> None:
        student = {k.removeprefix("student."): v for k, v in weights.items() if k.startswith("student.")}
        super().export(folder, model.student, student, record)
