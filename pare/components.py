"""What a transformer needs around it to turn a prompt into a video: a prompt encoder and a decoder.

Both load lazily on first use, so that commands which only need the transformer's structure (flops, latency)
never touch a multi-GB text encoder or VAE.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Protocol

import torch
from safetensors import safe_open

from .arch import WAN_IMAGE_TOKENS, WAN_TEXT_LEN
from .errors import PareError, require


class PromptEncoder:
    """Maps prompts to `encoder_hidden_states` in Wan's layout: (B, L, text_dim).

    The one interface generic code (calibration, evaluation, bench, the CLI) sees. A model with a domain of its
    own (the shapes teacher) also brings its prompts and its evaluator; for the others both return None and
    the user passes --prompts.
    """

    text_tokens: int

    def encode(self, prompts: list[str], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def own_prompts(self, n: int, split: str = "train", seed: int = 0) -> list[str] | None:
        """`n` prompts of the model's domain: "train" ones to calibrate on, "heldout" ones to evaluate on."""
        return None

    def domain_scores(self, videos, prompts: list[str]) -> dict | None:
        """The domain evaluator's scores of `videos` ((N, F, H, W, 3) uint8) for their `prompts`."""
        return None


class ImageEncoder:
    """Maps first frames to an image-to-video model's two conditioning inputs, in Wan2.1 I2V's layout: image
    tokens for the cross-attention's `add_k_proj` / `add_v_proj` (`encoder_hidden_states_image`, (B, N,
    image_dim)), and the latent condition concatenated to the noisy latents along channels ((B, mask channels +
    C, F', H', W'): a mask that is 1 on the given frame, then the latents of that frame followed by empty frames).
    """

    def encode(self, images: torch.Tensor, frames: int, device: torch.device,
               dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor]:  # fmt: skip
        """`images` (B, 3, H, W) in [-1, 1] -> (image_embeds or None, latent_condition) for videos of `frames`."""
        raise NotImplementedError

    def tokens(self, height: int, width: int) -> int:
        """Image tokens per video for frames of `height` x `width` (Wan2.1's CLIP ViT-H/14: 257 at any size)."""
        return WAN_IMAGE_TOKENS

    def own_images(self, prompts: list[str], split: str = "train", seed: int = 0) -> torch.Tensor | None:
        """First frames for `prompts` from the model's own domain ((B, 3, H, W) in [-1, 1]): "train" ones (seeded)
        to calibrate and sample data on, "heldout" ones to evaluate from; None for a model without a domain."""
        return None


class WanImageEncoder(ImageEncoder):
    """The first-frame conditioning of a Wan2.1 I2V pipeline folder (`image_encoder/` CLIP vision model,
    `image_processor/`, `vae/`), computed by diffusers' own `WanImageToVideoPipeline.encode_image` (CLIP's
    penultimate hidden states) and `prepare_latents` (the VAE's latents of [image, zeros], normalised, behind
    Wan's 4-channel first-frame mask), called on the loaded parts without building the whole pipeline."""

    def __init__(self, pipeline_folder: Path):
        self.folder = Path(pipeline_folder)
        self._parts = None

    def _load(self):
        if self._parts is None:
            from diffusers import AutoencoderKLWan
            from transformers import CLIPImageProcessor, CLIPVisionModel

            try:
                vae = AutoencoderKLWan.from_pretrained(self.folder / "vae").eval()
                encoder = CLIPVisionModel.from_pretrained(self.folder / "image_encoder").eval()
                processor = CLIPImageProcessor.from_pretrained(self.folder / "image_processor")
            except (OSError, ValueError) as exc:
                raise PareError(f"cannot load the image encoder of {self.folder}: {str(exc).splitlines()[0]}") from None
            # the attributes the two methods read (`expand_timesteps` is Wan2.2's, off for Wan2.1 I2V)
            self._parts = SimpleNamespace(vae=vae, image_encoder=encoder, image_processor=processor,
                                          vae_scale_factor_temporal=vae.config.scale_factor_temporal,
                                          vae_scale_factor_spatial=vae.config.scale_factor_spatial,
                                          config=SimpleNamespace(expand_timesteps=False))  # fmt: skip
        return self._parts

    @torch.no_grad()
    def encode(self, images: torch.Tensor, frames: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        from diffusers import WanImageToVideoPipeline

        parts = self._load()
        parts.vae.to(device)
        parts.image_encoder.to(device)
        pixels = [frame for frame in to_uint8_video(images[:, :, None])[:, 0].cpu().numpy()]  # what a PNG holds
        embeds = WanImageToVideoPipeline.encode_image(parts, pixels, torch.device(device))
        height, width = images.shape[-2:]
        conditions = []
        for image in images:  # one at a time: prepare_latents repeats its image's latents batch-size times
            shape = (1, parts.vae.config.z_dim, (frames - 1) // parts.vae_scale_factor_temporal + 1,
                     height // parts.vae_scale_factor_spatial, width // parts.vae_scale_factor_spatial)  # fmt: skip
            _, condition = WanImageToVideoPipeline.prepare_latents(
                parts, image[None].to(device, parts.vae.dtype), 1, parts.vae.config.z_dim, height, width, frames,
                torch.float32, torch.device(device), latents=torch.zeros(shape))  # fmt: skip
            conditions.append(condition)
        return embeds.to(dtype), torch.cat(conditions).to(dtype)


def images_from_uint8(images) -> torch.Tensor:
    """(B, H, W, 3) uint8 (numpy or torch) -> (B, 3, H, W) float in [-1, 1]."""
    images = torch.as_tensor(images)
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1


class Decoder(Protocol):
    """Maps the sampler's final latents (B, C, F', H', W') to uint8 RGB video frames (B, F, H, W, 3)."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


def to_uint8_video(video: torch.Tensor) -> torch.Tensor:
    """(B, 3, F, H, W) in [-1, 1] -> (B, F, H, W, 3) uint8."""
    video = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return video.permute(0, 2, 3, 4, 1).contiguous()


class PixelDecoder:
    """Identity decoder for pixel-space models: the transformer's output already is the video in [-1, 1]."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        require(latents.shape[1] == 3, f"a pixel-space model must output 3 channels, got {latents.shape[1]}")
        return to_uint8_video(latents)


class WanVaeDecoder:
    """Decodes Wan latents with diffusers' `AutoencoderKLWan`, un-normalising them as `WanPipeline` does."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._vae = None

    @property
    def vae(self):
        if self._vae is None:
            from diffusers import AutoencoderKLWan

            try:
                self._vae = AutoencoderKLWan.from_pretrained(self.folder).eval()
            except (OSError, ValueError, EnvironmentError) as exc:
                raise PareError(f"cannot load the VAE from {self.folder}: {str(exc).splitlines()[0]}") from None
        return self._vae

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae.to(latents.device)
        latents = latents.to(vae.dtype)
        z = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(latents)
        std = torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(latents)
        video = vae.decode(latents * std + mean, return_dict=False)[0]  # (B, 3, F, H, W) in [-1, 1]
        return to_uint8_video(video)


class WanT5PromptEncoder(PromptEncoder):
    """UMT5 prompt encoder of a Wan pipeline folder (`text_encoder/` + `tokenizer/`), encoded exactly as
    `WanPipeline` does: cleaned text, padded to 512 tokens, embeddings past the prompt's length zeroed."""

    text_tokens = WAN_TEXT_LEN

    def __init__(self, pipeline_folder: Path):
        self.folder = Path(pipeline_folder)
        self._parts = None

    def _load(self):
        if self._parts is None:
            from transformers import AutoTokenizer, UMT5EncoderModel

            try:
                tokenizer = AutoTokenizer.from_pretrained(self.folder / "tokenizer")
                encoder = UMT5EncoderModel.from_pretrained(self.folder / "text_encoder").eval()
            except (OSError, ValueError) as exc:
                raise PareError(
                    f"cannot load the text encoder of {self.folder}: {str(exc).splitlines()[0]}"
                ) from None
            # WanPipeline._get_t5_prompt_embeds only reads these three attributes; calling it on a namespace
            # reuses diffusers' exact prompt cleaning and padding without building a whole pipeline.
            self._parts = SimpleNamespace(tokenizer=tokenizer, text_encoder=encoder, _execution_device="cpu")
        return self._parts

    @torch.no_grad()
    def encode(self, prompts: list[str], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        from diffusers import WanPipeline

        parts = self._load()
        parts.text_encoder.to(device)
        return WanPipeline._get_t5_prompt_embeds(
            parts, prompts, max_sequence_length=self.text_tokens, device=torch.device(device), dtype=dtype
        )


class EmbeddingsFile(PromptEncoder):
    """Precomputed prompt embeddings in a safetensors file, for transformers that come without a text encoder.

    Layout: `prompt_embeds` (N, L, D), optional `negative_prompt_embeds` (1, L, D), and metadata `prompts`: the
    N prompts, one per line. `encode` looks prompts up by their exact text; the empty prompt (CFG's
    unconditional branch) maps to `negative_prompt_embeds`.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        require(self.path.is_file(), f"no embeddings file at {self.path}: expected a .safetensors file")
        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = f.metadata() or {}
                keys = set(f.keys())
                require("prompt_embeds" in keys, f"{self.path} has no 'prompt_embeds' tensor")
                self.embeds = f.get_tensor("prompt_embeds")
                self.negative = f.get_tensor("negative_prompt_embeds") if "negative_prompt_embeds" in keys else None
        except PareError:
            raise
        except Exception as exc:  # safetensors raises its own error types for a damaged header
            raise PareError(f"cannot read embeddings file {self.path}: {exc}") from None
        require(self.embeds.ndim == 3, f"'prompt_embeds' in {self.path} must be (N, L, D), got {tuple(self.embeds.shape)}")
        self.prompts = meta.get("prompts", "").split("\n") if meta.get("prompts") else []
        require(
            len(self.prompts) == self.embeds.shape[0],
            f"{self.path}: metadata 'prompts' names {len(self.prompts)} prompts for {self.embeds.shape[0]} embeddings",
        )
        self.text_tokens = self.embeds.shape[1]
        require(
            self.negative is None or self.negative.shape[-2:] == self.embeds.shape[1:],
            f"{self.path}: 'negative_prompt_embeds' is {tuple(self.negative.shape) if self.negative is not None else ''}, "
            f"expected (1, {self.embeds.shape[1]}, {self.embeds.shape[2]}) like the prompts'",
        )

    def encode(self, prompts: list[str], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        rows = []
        for p in prompts:
            if p == "":
                require(
                    self.negative is not None,
                    f"{self.path} has no 'negative_prompt_embeds' for classifier-free guidance; add them or use --guidance 1",
                )
                rows.append(self.negative[0])
            else:
                require(p in self.prompts, f"prompt {p!r} is not in {self.path}; it holds: {self.prompts}")
                rows.append(self.embeds[self.prompts.index(p)])
        return torch.stack(rows).to(device=device, dtype=dtype)


def save_embeddings(path: Path, prompts: list[str], embeds: torch.Tensor, negative: torch.Tensor | None = None):
    """Write an `EmbeddingsFile`."""
    from safetensors.torch import save_file

    from .io import atomic_path

    tensors = {"prompt_embeds": embeds.contiguous()}
    if negative is not None:
        tensors["negative_prompt_embeds"] = negative.reshape(1, *negative.shape[-2:]).contiguous()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"prompts": "\n".join(prompts)})
