"""Calibration inputs for profiling: noisy inputs x_t taken from the model's own sampling trajectories, at
steps spread over the schedule, with their conditioning and the clean sample each trajectory ended in."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .. import arch
from ..errors import require
from ..sampling import Conditioning, SamplerConfig, StepView, sample


@dataclass
class Calibration:
    """N calibration inputs (N = prompts x kept steps), in the model's input layout."""

    x_t: torch.Tensor  # (N, C, F', H', W') fp32
    timestep: torch.Tensor  # (N,)
    sigma: torch.Tensor  # (N,)
    text: torch.Tensor  # (N, L, D) conditional prompt embeddings
    x_0: torch.Tensor  # (N, C, F', H', W') the sample its trajectory ended in
    prompt: torch.Tensor  # (N,) index of the prompt
    step: torch.Tensor  # (N,) index of the sampling step
    image: torch.Tensor | None = None  # (N, image tokens, D_img) I2V image tokens (Wan2.1: 257 CLIP tokens)
    extra: torch.Tensor | None = None  # (N, mask + C, F', H', W') I2V latent condition (Wan2.1: 4 + 16)

    def __len__(self) -> int:
        return self.x_t.shape[0]

    def target_velocity(self, idx) -> torch.Tensor:
        """Velocity that carries x_t straight to where its trajectory ended: (x_t - x_0) / sigma."""
        return (self.x_t[idx] - self.x_0[idx]) / self.sigma[idx].view(-1, 1, 1, 1, 1)

    def batches(self, size: int) -> Iterator[slice]:
        for start in range(0, len(self), size):
            yield slice(start, min(start + size, len(self)))

    def inputs(self, idx, device, dtype) -> dict:
        """Keyword arguments of the transformer's forward for the samples `idx`."""
        x = self.x_t[idx]
        if self.extra is not None:
            x = torch.cat([x, self.extra[idx]], dim=1)
        kwargs = {"hidden_states": x.to(device, dtype), "timestep": self.timestep[idx].to(device),
                  "encoder_hidden_states": self.text[idx].to(device, dtype), "return_dict": False}  # fmt: skip
        if self.image is not None:
            kwargs["encoder_hidden_states_image"] = self.image[idx].to(device, dtype)
        return kwargs


def collect(
    model, cond: Conditioning, latent_shape, config: SamplerConfig, steps_kept: Sequence[int], batch_size: int = 8,
    progress: bool = False,
) -> Calibration:  # fmt: skip
    """Sample a trajectory per row of `cond` and keep x_t at the sampling steps `steps_kept`."""
    require(all(0 <= s < config.steps for s in steps_kept),
            f"--timesteps must be step indices in [0, {config.steps - 1}], got {list(steps_kept)}")  # fmt: skip
    parts = []
    for start in range(0, cond.batch, batch_size):
        rows = slice(start, min(start + batch_size, cond.batch))
        sub = Conditioning(*(None if t is None else t[rows] for t in
                             (cond.prompt_embeds, cond.negative_embeds, cond.image_embeds, cond.latent_condition)))  # fmt: skip
        kept: dict[int, StepView] = {}

        def keep(view: StepView):
            if view.index in steps_kept:
                kept[view.index] = StepView(view.index, view.timestep, view.sigma, view.x_t.cpu(), view.velocity.cpu())

        chunk = SamplerConfig(**{**vars(config), "seed": config.seed + start})
        result = sample(model, sub, latent_shape, chunk, on_step=keep, progress=progress)
        x_0 = result.latents.cpu()
        n = x_0.shape[0]
        for i in steps_kept:
            v = kept[i]
            parts.append((v.x_t, torch.full((n,), v.timestep), torch.full((n,), v.sigma), sub.prompt_embeds.cpu(), x_0,
                          torch.arange(start, start + n), torch.full((n,), i),
                          None if sub.image_embeds is None else sub.image_embeds.cpu(),
                          None if sub.latent_condition is None else sub.latent_condition.cpu()))  # fmt: skip
    fields = list(zip(*parts))
    cat = [None if f[0] is None else torch.cat(f) for f in fields]
    return Calibration(*cat)


def calibrate(bundle, prompts: list[str], sampler: SamplerConfig, steps_kept: Sequence[int], shape, encoder=None,
              batch_size: int = 8, progress: bool = False, images: torch.Tensor | None = None) -> Calibration:  # fmt: skip
    """Calibration inputs of a loaded bundle: trajectories of `prompts` at `shape` (frames, height, width), x_t
    kept at `steps_kept`. `encoder` overrides the bundle's prompt encoder; an image-to-video model continues
    `images`, else its own first frames of the prompts (`first_frames`). A group taken out of step experts is
    calibrated on the experts' trajectories, the inputs it meets at its steps."""
    from ..routing.experts import trajectory_model

    model = trajectory_model(bundle)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    encoder = encoder or bundle.prompt_encoder
    require(encoder is not None, f"{bundle.spec} comes without a text encoder: pass --embeds FILE.safetensors")
    pos = encoder.encode(prompts, device, dtype)
    neg = encoder.encode([""] * len(prompts), device, dtype) if sampler.uses_cfg else None
    image, condition = encode_images(bundle, images, prompts, shape, device, dtype, sampler.seed)
    latent_shape = (model.config.out_channels, *bundle.latent.latent_shape(*shape))
    return collect(model, Conditioning(pos, neg, image, condition), latent_shape, sampler, steps_kept, batch_size,
                   progress)  # fmt: skip


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def first_frames(bundle, prompts: list[str], images_dir=None, seed: int = 0, split: str = "train") -> torch.Tensor | None:
    """The first frames an image-to-video model is calibrated, sampled or evaluated from, one per prompt ((N, 3, H,
    W) in [-1, 1]): the images in `images_dir` in name order, image i with prompt i, cycled as the prompts are; else
    the model's own of `split` (built-in shapes models render their prompts). None for a text-to-video model."""
    from pathlib import Path

    if not arch.is_image_to_video(bundle.transformer):
        require(images_dir is None, f"{bundle.spec} is a text-to-video model: --images is for image-to-video models")
        return None
    require(bundle.image_encoder is not None, f"{bundle.spec} is an image-to-video model without an image encoder: "
            "use its pipeline folder (with image_encoder/ and vae/)")  # fmt: skip
    if images_dir is None:
        own = bundle.image_encoder.own_images(prompts, split, seed)
        require(own is not None, f"{bundle.spec} is an image-to-video model: pass --images DIR (first frames, one "
                "per prompt, in the prompts' order)")  # fmt: skip
        return own
    import numpy as np

    from ..components import images_from_uint8
    from ..video import read_image

    folder = Path(images_dir)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    require(files, f"--images {folder}: expected a folder of first frames ({', '.join(IMAGE_SUFFIXES)}), one per "
            "prompt, in the prompts' order")  # fmt: skip
    k, n = len(files), len(prompts)
    # prompt i goes with image i: the prompts, cycled from --prompts' lines, must then cycle with the images
    require(k == 1 or k >= n or all(prompts[i] == prompts[i % k] for i in range(n)),
            f"--images {folder} holds {k} images: give one, or one per line of --prompts in the same order")  # fmt: skip
    frames = [read_image(f) for f in files[:n]]
    require(len({f.shape for f in frames}) == 1, f"--images {folder}: the images differ in size")
    return images_from_uint8(np.stack([frames[i % len(frames)] for i in range(n)]))


def encode_images(bundle, images: torch.Tensor | None, prompts: list[str], shape, device, dtype,
                  seed: int = 0) -> tuple:  # fmt: skip
    """(image tokens, latent condition) of an image-to-video model's first frames for videos of `shape`, `images`
    or else the model's own for `prompts` (`first_frames`); (None, None) for a text-to-video model."""
    if not arch.is_image_to_video(bundle.transformer):
        require(images is None, f"{bundle.spec} is a text-to-video model: it takes no first frames (--images)")
        return None, None
    arch.check_i2v_text(bundle.transformer, bundle.text_tokens)
    images = first_frames(bundle, prompts, None, seed) if images is None else images
    frames, height, width = shape
    require(tuple(images.shape[1:]) == (3, height, width), f"the first frames are {images.shape[-1]}x{images.shape[-2]}: "
            f"expected {width}x{height}, the video's size")  # fmt: skip
    return bundle.image_encoder.encode(images, frames, device, dtype)


def read_prompt_file(path, flag: str = "--prompts") -> list[str]:
    """The non-empty lines of a --prompts file (`flag`: the option that named it, for the messages)."""
    from pathlib import Path

    path = Path(path)
    require(path.is_file(), f"{flag} {path}: expected a text file with one prompt per line")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    require(lines, f"{flag} {path} holds no prompts")
    return lines


def default_prompts(bundle, prompts_file, n: int, seed: int, encoder=None) -> list[str]:
    """Calibration prompts: the lines of `prompts_file`, else those of an embeddings file, else (built-in shapes
    models) the domain's training prompts; cycled or cut to `n`."""
    from pathlib import Path

    if prompts_file is not None:
        lines = read_prompt_file(Path(prompts_file))
    elif encoder is not None and getattr(encoder, "prompts", None):
        lines = list(encoder.prompts)
    else:
        own = bundle.prompt_encoder.own_prompts(n, "train", seed) if bundle.prompt_encoder is not None else None
        require(own is not None, f"{bundle.spec}: pass --prompts FILE (one prompt per line) to calibrate on")
        return own
    return (lines * n)[:n]
