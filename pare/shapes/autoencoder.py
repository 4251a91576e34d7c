"""The embedded teacher's latent space: a per-frame convolutional autoencoder, diffusers' `AutoencoderTiny`
(the TAESD architecture) at a tiny config, 32x32x3 frames -> 8x8x4 latents.

Why a latent space at all: the transformer must carry every value of a token through a model only 128 wide.
In pixel space, few tokens means many values per token (an 8x8x3 patch is 192 values) and the noise part of
the velocity target cannot pass; many tokens is too slow to train on a CPU. Wan's own answer is a VAE, then
patch (1, 2, 2): 4 latent channels x 2 x 2 = 16 values per token, 128 tokens per 8-frame video.

Why `AutoencoderTiny` rather than `AutoencoderKLWan`: a plain stack of 3x3 convolutions per frame, no causal
temporal convolution, no attention, no 1 + 4k frame rule; it encodes 512 frames in ~0.35 s on two CPU cores.
Latents are normalised per channel (mean/std over rendered frames, as Wan's `latents_mean/latents_std`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderTiny
from diffusers.utils import logging as diffusers_logging
from tqdm.auto import tqdm

from ..components import to_uint8_video
from ..errors import PareError, require
from ..io import atomic_dir, write_json
from . import domain

# Configs by name. The encoder is light (it runs on every training batch); the decoder only at sampling time.
CONFIGS: dict[str, dict] = {
    "frame-ae": dict(encoder_block_out_channels=(32, 32), num_encoder_blocks=(1, 1),
                     decoder_block_out_channels=(32, 32), num_decoder_blocks=(1, 1), latent_channels=4),
    "tiny": dict(encoder_block_out_channels=(8, 8), num_encoder_blocks=(0, 1),
                 decoder_block_out_channels=(8, 8), num_decoder_blocks=(1, 0), latent_channels=4),
}  # fmt: skip
LATENT_NOISE = 0.05  # std of noise added to (normalised-scale) latents while training: a decoder that tolerates
# small latent errors decodes the transformer's imperfect samples into clean frames
STATS_FILE = "latents_stats.json"
STATS_FRAMES = 4096


@dataclass
class AutoencoderTrainConfig:
    """Knobs of the autoencoder stage of `pare teacher train`."""

    config: str = "frame-ae"
    steps: int = 1000
    batch_frames: int = 64
    lr: float = 2e-3
    seed: int = 0


class FrameAutoencoder:
    """Per-frame encoder/decoder of videos (B, 3, F, H, W) in [-1, 1] <-> normalised latents (B, C, F, H/4, W/4)."""

    def __init__(self, vae: AutoencoderTiny, mean: torch.Tensor, std: torch.Tensor):
        self.vae, self.mean, self.std = vae, mean.float(), std.float()

    @property
    def channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def spatial(self) -> int:
        """Spatial downsampling factor: one stride-2 stage per encoder block after the first."""
        return 2 ** (len(self.vae.config.encoder_block_out_channels) - 1)

    def _stat(self, t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return t.to(ref.device, ref.dtype).view(1, -1, 1, 1, 1)

    def encode(self, videos: torch.Tensor) -> torch.Tensor:
        B, C, Fr, H, W = videos.shape
        frames = videos.transpose(1, 2).reshape(B * Fr, C, H, W)  # (B*F, 3, H, W)
        z = self.vae.encode(frames.to(next(self.vae.parameters()).dtype)).latents.float()  # (B*F, c, h, w)
        z = z.view(B, Fr, *z.shape[1:]).transpose(1, 2)  # (B, c, F, h, w)
        return (z - self._stat(self.mean, z)) / self._stat(self.std, z)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, c, F, h, w) normalised latents -> (B, 3, F, H, W) in [-1, 1]."""
        z = latents.float() * self._stat(self.std, latents.float()) + self._stat(self.mean, latents.float())
        B, c, Fr, h, w = z.shape
        frames = z.transpose(1, 2).reshape(B * Fr, c, h, w)  # (B*F, c, h, w)
        x = self.vae.decode(frames.to(next(self.vae.parameters()).dtype)).sample.float()  # (B*F, 3, H, W)
        return x.view(B, Fr, *x.shape[1:]).transpose(1, 2).clamp(-1, 1)

    def to(self, device) -> FrameAutoencoder:
        self.vae.to(device)
        return self

    def save(self, folder: Path) -> None:
        """A diffusers `AutoencoderTiny` folder plus `latents_stats.json`, written atomically."""
        with atomic_dir(Path(folder)) as tmp:
            self.vae.save_pretrained(tmp)
            write_json(tmp / STATS_FILE, {"latents_mean": self.mean.tolist(), "latents_std": self.std.tolist()})

    @classmethod
    def load(cls, folder: Path) -> FrameAutoencoder:
        folder = Path(folder)
        require((folder / STATS_FILE).is_file(), f"{folder} is not a frame autoencoder folder (no {STATS_FILE})")
        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # AutoencoderTiny warns about a key its own save_pretrained writes
        try:
            vae = AutoencoderTiny.from_pretrained(folder).eval()
        except (OSError, ValueError) as exc:
            raise PareError(f"cannot load the autoencoder from {folder}: {str(exc).splitlines()[0]}") from None
        finally:
            diffusers_logging.set_verbosity(verbosity)
        stats = json.loads((folder / STATS_FILE).read_text())
        return cls(vae, torch.tensor(stats["latents_mean"]), torch.tensor(stats["latents_std"]))


class FrameAutoencoderDecoder:
    """`Decoder` of a model folder whose latents are a `FrameAutoencoder`'s (loaded on first use)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._ae = None

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self._ae is None:
            self._ae = FrameAutoencoder.load(self.folder)
        return to_uint8_video(self._ae.to(latents.device).decode(latents))


def _frames(n: int, seed: int, device) -> torch.Tensor:
    """(n, 3, H, W) frames of random training scenes, each from another video and frame."""
    videos = n // domain.FRAMES + 1
    scenes = domain.sample_scenes(videos, "train", seed=seed, device=device)
    v = domain.render(scenes, seed=seed).transpose(1, 2).reshape(-1, 3, domain.HEIGHT, domain.WIDTH)
    return v[:n]


def train_autoencoder(cfg: AutoencoderTrainConfig, device="cpu", progress: bool = True) -> tuple[FrameAutoencoder, dict]:
    """Train a frame autoencoder on rendered frames (reconstruction MSE, latent noise); deterministic per seed.
    Returns the autoencoder with its latent statistics and a record (held-out reconstruction MSE)."""
    # A plain loop, not `training.run`: a few minutes of fixed recipe inside `pare teacher train`, re-run whole
    # (deterministic) rather than resumed, and torch's one-cycle schedule is all it needs.
    torch.manual_seed(cfg.seed)
    vae = AutoencoderTiny(**CONFIGS[cfg.config]).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.steps, pct_start=0.05)
    g = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    for step in tqdm(range(cfg.steps), desc="autoencoder", unit="step", disable=not progress):
        x = _frames(cfg.batch_frames, seed=cfg.seed * 1_000_003 + step, device=device)
        z = vae.encode(x).latents
        # noise relative to the latents' own spread, so the decoder learns to ignore what sampling gets wrong
        z = z + LATENT_NOISE * z.detach().std() * torch.randn(z.shape, generator=g, device=device)
        loss = F.mse_loss(vae.decode(z).sample, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    vae.eval()
    with torch.no_grad():
        z = torch.cat([vae.encode(c).latents for c in _frames(STATS_FRAMES, seed=-1 % 2**31, device=device).split(512)])
        mean, std = z.mean(dim=(0, 2, 3)), z.std(dim=(0, 2, 3))  # per channel
        held = _frames(512, seed=2**31 - 7, device=device)
        mse = F.mse_loss(vae.decode(vae.encode(held).latents).sample.clamp(-1, 1), held).item()
    return FrameAutoencoder(vae, mean.cpu(), std.cpu()), {"config": cfg.config, "steps": cfg.steps,
                                                          "reconstruction_mse": round(mse, 6)}  # fmt: skip
