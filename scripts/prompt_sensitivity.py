"""How much does each word of a prompt change a shapes teacher's prediction?

    python scripts/prompt_sensitivity.py --model builtin:shapes-t2v --sigmas 1.0 0.95 0.9 0.7

For held-out prompts with a linear motion ("a red square moving left slowly"), swap one word at a time (the
first object's colour, its shape, the direction to the opposite one, the speed) and measure the relative change
of the model's velocity on the same noisy input, ||v(swapped) - v(own)|| / ||v(own)||, averaged over prompts,
at each noise level s (x = s * noise: from pure noise, where the prompt is all the model has to go on). A word the
model ignores changes nothing; one it reads changes the prediction where the video depends on it.

`--ideal R` adds what a perfect denoiser would do at s = 1: there the best velocity is noise - E[x_0 | prompt],
so the change is ||E[x_0 | swapped] - E[x_0 | own]|| / ||noise - E[x_0 | own]||, with each mean taken over R
rendered and encoded videos (the same nuisance seed for both prompts, so that what the swap leaves alone
cancels; what it moves, like the start position a direction needs, keeps some sampling noise of order
1 / sqrt(R)).
"""

from __future__ import annotations

import argparse

import torch

from pare.loading import load_bundle
from pare.shapes import domain
from pare.shapes.autoencoder import FrameAutoencoder
from pare.shapes.teacher import VAE_DIR, teacher_folder



def swap(prompt: str, kind: str) -> str:
    words = prompt.split()
    if kind == "colour":
        i = next(i for i, w in enumerate(words) if w in domain.COLOURS)
        names = list(domain.COLOURS)
        words[i] = names[(names.index(words[i]) + 1) % len(names)]
        while words[i] in words[i + 1 :]:  # keep the two objects' colours apart
            words[i] = names[(names.index(words[i]) + 1) % len(names)]
    elif kind == "shape":
        i = next(i for i, w in enumerate(words) if w in domain.SHAPES)
        words[i] = domain.SHAPES[(domain.SHAPES.index(words[i]) + 1) % len(domain.SHAPES)]
    elif kind == "direction":
        return domain.flip_direction(prompt)
    else:
        words[-1] = "quickly" if words[-1] == "slowly" else "slowly"
    return " ".join(words)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="builtin:shapes-t2v")
    ap.add_argument("--sigmas", type=float, nargs="+", default=[1.0, 0.95, 0.9, 0.7])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ideal", type=int, default=0, metavar="R", help="also the perfect denoiser at s = 1, from R renders")
    args = ap.parse_args()

    bundle = load_bundle(args.model)
    model = bundle.transformer.eval()
    prompts = domain.linear_heldout_prompts(args.prompts)
    C = model.config.in_channels
    F, H, W = bundle.latent.latent_shape(*bundle.default_shape)
    noise = torch.randn(len(prompts), C, F, H, W, generator=torch.Generator().manual_seed(args.seed))
    kinds = ("colour", "shape", "direction", "speed")
    own = bundle.prompt_encoder.encode(prompts, "cpu", torch.float32)
    swapped = {k: bundle.prompt_encoder.encode([swap(p, k) for p in prompts], "cpu", torch.float32) for k in kinds}
    print(f"{args.model}: {len(prompts)} held-out prompts; relative change of the velocity when one word is swapped")
    print(f"{'s':>6} " + " ".join(f"{k:>10}" for k in kinds))
    for s in args.sigmas:
        t = torch.full((len(prompts),), 1000.0 * s)
        x = s * noise  # the clean part is unknown to the model: what it predicts comes from the prompt
        v = model(x, t, own, return_dict=False)[0]
        change = {k: ((model(x, t, e, return_dict=False)[0] - v).flatten(1).norm(dim=1) / v.flatten(1).norm(dim=1)).mean()
                  for k, e in swapped.items()}  # fmt: skip
        print(f"{s:>6.2f} " + " ".join(f"{float(change[k]):>10.4f}" for k in kinds), flush=True)
    if args.ideal:
        autoencoder = FrameAutoencoder.load(teacher_folder(args.model) / VAE_DIR)

        def mean_latent(prompt: str) -> torch.Tensor:
            return autoencoder.encode(domain.render(domain.parse_prompts([prompt] * args.ideal), seed=args.seed)).mean(0)

        change = {k: 0.0 for k in kinds}
        for i, p in enumerate(prompts):
            m = mean_latent(p)
            for k in kinds:
                change[k] += float((mean_latent(swap(p, k)) - m).norm() / (noise[i] - m).norm()) / len(prompts)
        print(f"{'ideal':>6} " + " ".join(f"{change[k]:>10.4f}" for k in kinds) + f"  (s = 1, {args.ideal} renders per prompt)")


if __name__ == "__main__":
    main()
