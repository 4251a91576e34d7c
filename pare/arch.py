"""Facts about the Wan architecture that every stage asks, kept in one place.

Stages never reach into diffusers' module layout themselves: they ask here which modules are the blocks, the
self-attention, the cross-attention and the FFN, how heads are split, and how tokens map to frames. Layout as of
diffusers 0.42 `models/transformers/transformer_wan.py`:

    block.attn1   self-attention   (to_q, to_k, to_v, to_out[0]; norm_q / norm_k: one RMSNorm over all heads)
    block.attn2   cross-attention  (to_q on video tokens; to_k / to_v on text tokens; add_k_proj / add_v_proj on
                                    the 257 CLIP image tokens for I2V)
    block.ffn     FeedForward      (net[0].proj: D -> F with tanh-GELU, net[2]: F -> D)

Tokens are frame-major after patchify: token i belongs to latent frame i // (H' * W').
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .errors import PareError, require

# Wan2.1's text encoder (UMT5-XXL) pads every prompt to this many tokens, and the I2V attention processor
# hard-codes it when it splits image tokens from text tokens.
WAN_TEXT_LEN = 512
# CLIP ViT-H/14 image tokens (256 patches + class token) that Wan2.1 I2V puts in front of the text tokens.
WAN_IMAGE_TOKENS = 257


@dataclass(frozen=True)
class LatentSpace:
    """How a video maps to the transformer's input: VAE compression factors and channel count.

    Pixel-space models (the embedded default) have factors 1 and 3 channels.
    """

    temporal: int = 4
    spatial: int = 8
    channels: int = 16

    @property
    def is_pixel(self) -> bool:
        return self.temporal == 1 and self.spatial == 1

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(F', H', W') of the latent for a video of `frames` x `height` x `width` pixels."""
        if self.temporal > 1:
            require(
                frames >= 1 and (frames - 1) % self.temporal == 0,
                f"--frames must be 1 + a multiple of {self.temporal} for this model (e.g. 81), got {frames}",
            )
            lat_f = (frames - 1) // self.temporal + 1
        else:
            require(frames >= 1, f"--frames must be at least 1, got {frames}")
            lat_f = frames
        for name, size in (("height", height), ("width", width)):
            require(
                size > 0 and size % self.spatial == 0,
                f"--{name} must be a positive multiple of {self.spatial} for this model, got {size}",
            )
        return lat_f, height // self.spatial, width // self.spatial


PIXEL_SPACE = LatentSpace(temporal=1, spatial=1, channels=3)
WAN_VAE = LatentSpace(temporal=4, spatial=8, channels=16)


@dataclass(frozen=True)
class TokenGrid:
    """The transformer's token grid for one input: latent frames x rows x columns after patchify."""

    frames: int
    height: int
    width: int

    @property
    def tokens(self) -> int:
        return self.frames * self.height * self.width

    @property
    def tokens_per_frame(self) -> int:
        return self.height * self.width

    def frame_of_token(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(S,) latent frame index of every token (frame-major order)."""
        return torch.arange(self.tokens, device=device) // self.tokens_per_frame

    def position_of_token(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(S,) spatial position (row * width + col) of every token within its frame."""
        return torch.arange(self.tokens, device=device) % self.tokens_per_frame


def token_grid(config, latent: LatentSpace, frames: int, height: int, width: int) -> TokenGrid:
    """Token grid of a video of `frames` x `height` x `width` pixels for a model with this `config`."""
    lat_f, lat_h, lat_w = latent.latent_shape(frames, height, width)
    p_t, p_h, p_w = config.patch_size
    for name, size, p in (("frames", lat_f, p_t), ("height", lat_h, p_h), ("width", lat_w, p_w)):
        require(
            size % p == 0,
            f"latent {name} {size} is not divisible by the patch size {p}; choose a {name} that gives a multiple of "
            f"{p} after the VAE's compression",
        )
    return TokenGrid(lat_f // p_t, lat_h // p_h, lat_w // p_w)


# --- module layout ----------------------------------------------------------------------------------------------


def blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks, in execution order."""
    return model.blocks


def self_attention(block: nn.Module) -> nn.Module:
    return block.attn1


def cross_attention(block: nn.Module) -> nn.Module:
    return block.attn2


def ffn_linears(block: nn.Module) -> tuple[nn.Linear, nn.Linear]:
    """(up, down) projections of the block's FFN: D -> F and F -> D."""
    net = block.ffn.net
    return net[0].proj, net[2]


def num_heads(attn: nn.Module) -> int:
    return attn.heads


def head_dim(attn: nn.Module) -> int:
    return attn.to_q.out_features // attn.heads


def ffn_width(block: nn.Module) -> int:
    return ffn_linears(block)[0].out_features


def is_image_to_video(model: nn.Module) -> bool:
    return model.config.image_dim is not None


def macs(linear: nn.Module) -> int:
    """Multiply-adds per token of a Linear layer."""
    return linear.in_features * linear.out_features


def conv_macs(conv: nn.Conv3d) -> int:
    """Multiply-adds per output position of a Conv3d (the patch embedding)."""
    return conv.in_channels // conv.groups * math.prod(conv.kernel_size) * conv.out_channels


def check_i2v_text(model: nn.Module, text_tokens: int) -> None:
    """An I2V model's cross-attention (diffusers' WanAttnProcessor) takes all but the last 512 tokens of
    `encoder_hidden_states` as image tokens: its text must be exactly 512 tokens long."""
    require(not is_image_to_video(model) or text_tokens == WAN_TEXT_LEN,
            f"an image-to-video model needs prompt embeddings of {WAN_TEXT_LEN} tokens (Wan's attention splits image "
            f"from text tokens there), got {text_tokens}")  # fmt: skip


def check_supported(model: nn.Module) -> None:
    """Refuse a transformer whose layout is not the Wan one this module describes."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "image_dim", None) is None and \
            config.in_channels != getattr(config, "out_channels", config.in_channels):  # fmt: skip
        raise PareError(f"{type(model).__name__} takes {config.in_channels} input channels for {config.out_channels} "
                        "output channels without image tokens (Wan2.2's image-to-video layout): not supported; "
                        "Wan2.1 I2V (CLIP image tokens) is")  # fmt: skip
    try:
        for block in blocks(model):
            self_attention(block).to_q, cross_attention(block).to_k, ffn_linears(block)
    except (AttributeError, IndexError, TypeError) as exc:
        raise PareError(
            f"{type(model).__name__} does not have the Wan transformer layout (blocks[i].attn1/attn2/ffn): {exc}"
        ) from None
