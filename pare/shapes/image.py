"""The image conditioning of the embedded image-to-video teacher `builtin:shapes-i2v`, in Wan2.1 I2V's layout.

Wan2.1 I2V conditions on a first frame twice: CLIP ViT-H/14 tokens of the frame enter every cross-attention
through `add_k_proj` / `add_v_proj`, and the video VAE's latents of [frame, black, black, ...] with a mask that
is 1 on the given frame are concatenated to the noisy latents along channels (`in_channels` = C + mask + C).
Here the teacher's own frozen frame autoencoder stands in for both encoders: the image tokens are the frame's
normalised latents cut into 2 x 2 patches (16 values each, `image_dim` 16: 64 tokens for a 32 x 32 frame),
and the condition is one mask channel (the frame autoencoder has no temporal compression, so one frame is one
latent frame; Wan's VAE needs four mask channels for its 4-frame latents) and the latents of the frame followed
by frames of zeros (mid-grey in [-1, 1], as Wan's pipeline pads with zeros).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..components import ImageEncoder
from . import domain
from .autoencoder import FrameAutoencoder

IMAGE_PATCH = 2  # latent pixels per image token along each axis
MASK_CHANNELS = 1


def image_dim(autoencoder_channels: int) -> int:
    """Width of an image token: the latent channels of a 2 x 2 patch."""
    return autoencoder_channels * IMAGE_PATCH**2


class ShapesImageEncoder(ImageEncoder):
    """`ImageEncoder` of a shapes I2V model: its frame autoencoder (a folder, loaded on first use, or given)."""

    def __init__(self, folder: Path | None = None, autoencoder: FrameAutoencoder | None = None):
        self.folder, self._ae = folder, autoencoder

    @property
    def autoencoder(self) -> FrameAutoencoder:
        if self._ae is None:
            self._ae = FrameAutoencoder.load(self.folder)
        return self._ae

    def encode(self, images: torch.Tensor, frames: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, condition = first_frame_condition(self.autoencoder.to(device), images.to(device), frames)
        return tokens.to(dtype), condition.to(dtype)

    def tokens(self, height: int, width: int) -> int:
        side = self.autoencoder.spatial * IMAGE_PATCH
        return (height // side) * (width // side)

    def own_images(self, prompts: list[str], split: str = "train", seed: int = 0) -> torch.Tensor:
        """Frame 0 of a render of each prompt's scene (the render of the whole list, seeded); held-out ones are
        the evaluator's (`evaluate.first_frames`)."""
        if split == "heldout":
            from .evaluate import first_frames

            return first_frames(prompts)
        return domain.render(domain.parse_prompts(prompts), seed=seed)[:, :, 0]


@torch.no_grad()
def first_frame_condition(ae: FrameAutoencoder, images: torch.Tensor, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, H, W) first frames in [-1, 1] -> image tokens (B, N, image_dim) and latent condition (B, 1 + C,
    `frames`, h, w), the teacher's training inputs and the sampler's alike. The autoencoder works frame by frame,
    so the latents of [frame, zeros, ...] are the frame's latents followed by those of one zero frame."""
    z0 = ae.encode(images.float()[:, :, None])  # (B, C, 1, h, w)
    empty = ae.encode(torch.zeros_like(images[:1]).float()[:, :, None])  # (1, C, 1, h, w)
    latents = torch.cat([z0, empty.expand(z0.shape[0], -1, frames - 1, -1, -1)], dim=2)
    return image_tokens(z0), latent_condition(latents)


def image_tokens(latent: torch.Tensor) -> torch.Tensor:
    """(B, C, 1, h, w) latents of one frame -> (B, h/2 * w/2, 4 C) tokens, row-major over the 2 x 2 patches."""
    B, C, _, h, w = latent.shape
    p = IMAGE_PATCH
    x = latent[:, :, 0].reshape(B, C, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (h // p) * (w // p), C * p * p)


def latent_condition(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, F, h, w) latents of [frame, zeros, ...] -> (B, 1 + C, F, h, w): the mask (1 on frame 0), then them."""
    mask = torch.zeros_like(latents[:, :MASK_CHANNELS])
    mask[:, :, 0] = 1
    return torch.cat([mask, latents], dim=1)
