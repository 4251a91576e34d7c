"""How a shapes model's generated latents differ from the encoded renders of the same prompts, and how much latent
blur the shape reading survives.

    python scripts/latent_stats.py --model builtin:shapes-t2v --prompts 64 --blur 0 0.5 0.7 1.0

Prints, for the renders of the first N held-out prompts: their latents' std and high-frequency share (energy of
z - blur(z, 1) over the energy of z less its per-frame mean), and the scores of their decodes after a Gaussian
blur of each --blur sigma (latent pixels); then the same statistics and scores of the model's own samples
(its default sampler, seed i for prompt i).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from pare.generate import generate
from pare.loading import load_bundle
from pare.sampling import SamplerConfig
from pare.shapes import domain
from pare.shapes.autoencoder import FrameAutoencoder
from pare.shapes.evaluate import evaluate_videos
from pare.shapes.teacher import teacher_folder

KEYS = ("colour", "shape", "direction", "count")


def blur(z: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (5 taps) of every frame and channel of latents (B, C, F, H, W)."""
    if sigma == 0:
        return z
    k = torch.exp(-torch.arange(-2, 3).float() ** 2 / (2 * sigma * sigma))
    k = k / k.sum()
    B, C, Fr, H, W = z.shape
    x = z.transpose(1, 2).reshape(B * Fr * C, 1, H, W)
    x = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="replicate"), k.view(1, 1, 1, 5))
    x = F.conv2d(F.pad(x, (0, 0, 2, 2), mode="replicate"), k.view(1, 1, 5, 1))
    return x.view(B, Fr, C, H, W).transpose(1, 2)


def high_frequency_share(z: torch.Tensor) -> float:
    centred = z - z.mean(dim=(3, 4), keepdim=True)
    return ((z - blur(z, 1.0)) ** 2).mean().item() / (centred**2).mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--blur", type=float, nargs="*", default=[0, 0.5, 0.7, 1.0])
    a = p.parse_args()
    torch.set_grad_enabled(False)
    bundle = load_bundle(a.model)
    ae = FrameAutoencoder.load(teacher_folder(a.model) / "vae")
    prompts = domain.heldout_prompts(a.prompts)
    z0 = ae.encode(domain.render(domain.parse_prompts(prompts), seed=123))
    print(f"renders: latent std {z0.std().item():.3f}, high-frequency share {high_frequency_share(z0):.4f}")
    for s in a.blur:
        scores = evaluate_videos(ae.decode(blur(z0, s)), prompts)
        print(f"  decoded after blur sigma {s}: " + ", ".join(f"{k} {scores[k]:.1f}" for k in KEYS))
    zs = []
    for start in range(0, len(prompts), 16):
        config = SamplerConfig(**{**bundle.sampler_defaults, "seed": start})
        zs.append(generate(bundle, prompts[start : start + 16], config, progress=False).result.latents)
    zg = torch.cat(zs)
    scores = evaluate_videos(ae.decode(zg), prompts)
    print(f"samples: latent std {zg.std().item():.3f}, high-frequency share {high_frequency_share(zg):.4f}; "
          + ", ".join(f"{k} {scores[k]:.1f}" for k in KEYS))  # fmt: skip


if __name__ == "__main__":
    main()
