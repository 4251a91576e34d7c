"""At which noise level does a shapes teacher lose the prompted motion?

    python scripts/motion_by_noise.py --model builtin:shapes-t2v --sigmas 0.5 0.7 0.85 0.95 --prompts 32

Renders real videos of held-out prompts, encodes them, noises the latents to each start level s0
(x = (1 - s0) z0 + s0 eps) and denoises them with the model (Euler from s0 to 0, CFG at the model's scale, the
same noise for every s0), then scores the results as `pare eval-shapes` does. Where s0 is low the real video
still fixes the layout and the model only redraws detail; a score that drops between two levels is decided in
that band of noise. A model that keeps direction from s0 = 0.85 but not from 0.95 places objects consistently
across frames once it can see them, and fails to lay out a trajectory from (almost) pure noise.

    python scripts/motion_by_noise.py --model builtin:shapes-t2v --sigmas 0.9 0.95 1.0 --flip

`--flip` asks whether the model reads the direction word at all: it takes linear motions only and denoises each
video twice, once with its own prompt and once with the opposite direction ("left" for "right"), and scores
both against the motion of the real video and against the prompt given. A model that follows its prompt moves
the flipped runs the other way; one that ignores the word scores the same against the real motion either way.

    python scripts/motion_by_noise.py --model builtin:shapes-t2v --context 1 --flip

`--context K` keeps the first K frames of the real video clean (timestep 0 for their tokens, their latents reset
at every step) and generates the other frames from pure noise, as image-to-video continues a given frame. With
`--flip` it asks whether the model moves what it sees as the word says, the easiest use of the word there is.
"""

from __future__ import annotations

import argparse
import math

import torch

from pare.loading import load_bundle
from pare.shapes import domain
from pare.shapes.autoencoder import FrameAutoencoder
from pare.shapes.evaluate import evaluate_videos, score_video, to_frames01
from pare.shapes.teacher import VAE_DIR, teacher_folder

REAL_SEED = 123


@torch.no_grad()
def denoise_from(model, z0, s0: float, pos, neg, guidance: float, steps: int, seed: int) -> torch.Tensor:
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed))
    x = (1 - s0) * z0 + s0 * noise
    sigmas = torch.linspace(s0, 0, steps + 1)
    B = z0.shape[0]
    for i in range(steps):
        t = sigmas[i].repeat(B) * 1000
        cond = model(x, t, pos, return_dict=False)[0]
        uncond = model(x, t, neg, return_dict=False)[0]
        x = x + (sigmas[i + 1] - sigmas[i]) * (uncond + guidance * (cond - uncond))
    return x


@torch.no_grad()
def continue_from(model, z0, context: int, pos, neg, guidance: float, steps: int, seed: int) -> torch.Tensor:
    """Frames >= `context` denoised from pure noise, frames < `context` held at the real latents z0 (timestep 0;
    per-token timesteps, which Wan's transformer in diffusers takes as Wan2.2 TI2V does)."""
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed))
    B, F = z0.shape[0], z0.shape[2]
    given = torch.zeros(1, 1, F, 1, 1, dtype=torch.bool)
    given[:, :, :context] = True
    x = torch.where(given, z0, noise)
    p_t = model.config.patch_size[0]  # latent frames per token-frame: the given frames fill whole token-frames
    if context % p_t:
        raise SystemExit(f"--context must be a multiple of the model's temporal patch {p_t}")
    tokens_per_frame = math.prod(int(n) // int(p) for n, p in zip(z0.shape[3:], model.config.patch_size[1:]))
    sigmas = torch.linspace(1.0, 0, steps + 1)
    token_given = given.view(F)[::p_t].view(1, F // p_t)
    for i in range(steps):
        per_frame = torch.where(token_given, 0.0, sigmas[i]).expand(B, F // p_t)
        t = (per_frame * 1000).repeat_interleave(tokens_per_frame, dim=1)
        cond = model(x, t, pos, return_dict=False)[0]
        uncond = model(x, t, neg, return_dict=False)[0]
        x = x + (sigmas[i + 1] - sigmas[i]) * (uncond + guidance * (cond - uncond))
        x = torch.where(given, z0, x)
    return x


def direction_accuracy(videos, prompts: list[str]) -> float:
    """`evaluate_videos`' direction score alone (no classifier, no Frechet distance)."""
    hits = [h for v, p in zip(to_frames01(videos), prompts) for h in score_video(v, p)["direction"]]
    return 100.0 * sum(hits) / len(hits)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="builtin:shapes-t2v")
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.5, 0.7, 0.85, 0.95])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20, help="Euler steps from s0 to 0")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's own)")
    ap.add_argument("--flip", action="store_true", help="linear motions only, also with the opposite direction word")
    ap.add_argument("--context", type=int, default=0, help="keep the first K real frames and generate the rest "
                    "(replaces --sigmas)")
    args = ap.parse_args()

    bundle = load_bundle(args.model)
    model = bundle.transformer.eval()
    autoencoder = FrameAutoencoder.load(teacher_folder(args.model) / VAE_DIR)
    guidance = args.guidance if args.guidance is not None else bundle.sampler_defaults.get("guidance_scale", 4.0)
    prompts = domain.heldout_prompts(args.prompts)
    if args.flip:  # the first --prompts held-out prompts with a linear motion
        prompts = domain.linear_heldout_prompts(args.prompts)
    scenes = domain.parse_prompts(prompts)
    z0 = autoencoder.encode(domain.render(scenes, seed=REAL_SEED))
    pos = bundle.prompt_encoder.encode(prompts, "cpu", torch.float32)
    neg = bundle.prompt_encoder.encode([""] * len(prompts), "cpu", torch.float32)
    keys = ("colour", "shape", "direction", "speed", "count")
    print(f"{args.model}: {len(prompts)} held-out prompts, real videos noised to s0 and denoised "
          f"({args.steps} Euler steps, CFG {guidance:g})")  # fmt: skip
    if not args.flip:
        print(f"{'s0':>6} " + " ".join(f"{k:>9}" for k in keys))
    else:
        flipped = [domain.flip_direction(p) for p in prompts]
        pos_flipped = bundle.prompt_encoder.encode(flipped, "cpu", torch.float32)
        print(f"{'s0':>6} {'own word: real motion':>22} {'flipped word: real motion':>26} {'flipped word: its prompt':>25}")
    if args.context:
        run = lambda s0, text: continue_from(model, z0, args.context, text, neg, guidance, args.steps, args.seed)  # noqa: E731
        args.sigmas = [1.0]
        print(f"the first {args.context} frame(s) given, the rest from pure noise")
    else:
        run = lambda s0, text: denoise_from(model, z0, s0, text, neg, guidance, args.steps, args.seed)  # noqa: E731
    for s0 in args.sigmas:
        videos = autoencoder.decode(run(s0, pos))
        if args.flip:
            own = direction_accuracy(videos, prompts)
            videos = autoencoder.decode(run(s0, pos_flipped))
            real, given = direction_accuracy(videos, prompts), direction_accuracy(videos, flipped)
            print(f"{s0:>6.2f} {own:>22.1f} {real:>26.1f} {given:>25.1f}", flush=True)
            continue
        scores = evaluate_videos(videos, prompts)
        print(f"{s0:>6.2f} " + " ".join(f"{scores[k]:>9.1f}" for k in keys), flush=True)


if __name__ == "__main__":
    main()
