"""Prompt in, video out: wires a loaded model bundle, its prompt encoder, the sampler and the decoder."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import require
from .flops import FlopReport, count_flops
from .loading import ModelBundle
from .components import PromptEncoder
from .sampling import Conditioning, SampleResult, SamplerConfig, sample
from . import arch


@dataclass
class Generation:
    videos: torch.Tensor  # (B, F, H, W, 3) uint8
    result: SampleResult
    flop_report: FlopReport  # of one forward of this model with every block
    reference_flops: int  # of one forward of the full model it was made from (itself, for a full model)


def video_shape(bundle: ModelBundle, frames: int | None, height: int | None, width: int | None) -> tuple[int, int, int]:
    """The requested (frames, height, width), defaults filled from the model; errors name the missing flag."""
    default = bundle.default_shape or (None, None, None)
    shape = tuple(v if v is not None else d for v, d in zip((frames, height, width), default))
    missing = [f"--{n}" for n, v in zip(("frames", "height", "width"), shape) if v is None]
    require(not missing, f"{bundle.spec} has no default video size: pass {' '.join(missing)}")
    return shape


def heldout_images(bundle: ModelBundle, prompts: list[str]) -> torch.Tensor | None:
    """The first frames an image-to-video model is evaluated and benchmarked from: those of `bundle.images_dir`
    (--images), else its own held-out ones for `prompts` (None for a text-to-video model)."""
    from .profiling.calibration import first_frames

    return first_frames(bundle, prompts, bundle.images_dir, split="heldout")


def generate(
    bundle: ModelBundle,
    prompts: list[str],
    config: SamplerConfig = SamplerConfig(),
    *,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str = "",
    prompt_encoder: PromptEncoder | None = None,
    images: torch.Tensor | None = None,
    progress: bool = True,
    on_step=None,
) -> Generation:
    """Generate one video per prompt with the bundle's transformer; an image-to-video model continues `images`
    ((B, 3, H, W) in [-1, 1], one first frame per prompt; `components.images_from_uint8` converts frames). `on_step`
    is passed to `pare.sampling.sample` (called after every step)."""
    model = bundle.transformer
    require(bundle.has_weights, f"{bundle.spec} has no weights to generate with")
    require(prompts, "give at least one --prompt")
    i2v = arch.is_image_to_video(model)
    require(i2v or images is None, f"{bundle.spec} is a text-to-video model: --image is for image-to-video models")
    require(not i2v or images is not None, f"{bundle.spec} is an image-to-video model: give the first frame "
            "(--image FILE.png)")  # fmt: skip
    require(not i2v or bundle.image_encoder is not None, f"{bundle.spec} comes without an image encoder: encode the "
            "first frame yourself and call pare.sample() with Conditioning(image_embeds=..., latent_condition=...)")  # fmt: skip
    encoder = prompt_encoder or bundle.prompt_encoder
    require(
        encoder is not None,
        f"{bundle.spec} comes without a text encoder: pass --embeds FILE.safetensors (see `pare generate --help`)",
    )
    require(bundle.decoder is not None, f"{bundle.spec} outputs {bundle.latent.channels}-channel latents and comes "
            "without a VAE: pass --vae DIR (an AutoencoderKLWan folder)")  # fmt: skip
    frames, height, width = video_shape(bundle, frames, height, width)
    grid_latent = bundle.latent.latent_shape(frames, height, width)
    grid = arch.token_grid(model.config, bundle.latent, frames, height, width)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    pos = encoder.encode(list(prompts), device, dtype)
    arch.check_i2v_text(model, pos.shape[1])
    require(
        pos.shape[-1] == model.config.text_dim,
        f"prompt embeddings are {pos.shape[-1]} wide but the model expects text_dim={model.config.text_dim}",
    )
    neg = encoder.encode([negative_prompt] * len(prompts), device, dtype) if config.uses_cfg else None
    image_embeds = condition = None
    if i2v:
        require(images.ndim == 4 and images.shape[0] == len(prompts) and tuple(images.shape[1:]) == (3, height, width),
                f"expected one {width}x{height} RGB first frame per prompt ({len(prompts)}), got images of shape "
                f"{tuple(images.shape)}")  # fmt: skip
        image_embeds, condition = bundle.image_encoder.encode(images, frames, device, dtype)
    image_tokens = 0 if image_embeds is None else image_embeds.shape[1]
    report = count_flops(model, grid, text_tokens=pos.shape[1], image_tokens=image_tokens)
    reference = count_flops(bundle.full_model, grid, text_tokens=pos.shape[1], image_tokens=image_tokens).total()
    latent_shape = (model.config.out_channels, *grid_latent)
    result = sample(model, Conditioning(pos, neg, image_embeds, condition), latent_shape, config, flop_report=report,
                    reference_flops=reference, progress=progress, on_step=on_step)  # fmt: skip
    return Generation(bundle.decoder.decode(result.latents), result, report, reference)
