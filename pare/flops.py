"""FLOPs of one denoising forward (one CFG branch, batch 1), counted from the model's real structure.

Convention (the one of the measured anchors in the design notes): 2 x multiply-adds of every matmul (linear
layers and the patch-embedding convolution), plus attention's two products QK^T and AV, for self-attention,
text cross-attention and the I2V image cross-attention. Elementwise work (norms, RoPE, softmax, modulation) is
not counted. Everything is read off module shapes, so a pruned model (fewer heads, narrower FFN) counts what it
really runs, and a model built on the meta device counts without any weights.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from torch import nn

from . import arch
from .arch import LatentSpace, TokenGrid


@dataclass
class BlockFlops:
    """FLOPs of one transformer block, by part."""

    self_proj: int  # to_q, to_k, to_v, to_out on the S video tokens
    self_attn: int  # QK^T and AV over S x S
    cross_proj: int  # to_q, to_out on S video tokens; to_k, to_v on the L text tokens
    cross_attn: int  # QK^T and AV over S x L
    image_proj: int  # add_k_proj, add_v_proj on the image tokens (I2V only)
    image_attn: int  # QK^T and AV over S x image tokens (I2V only)
    ffn: int  # both FFN linears on S tokens

    @property
    def total(self) -> int:
        return sum(asdict(self).values())


@dataclass
class FlopReport:
    """FLOPs of one forward: embeddings, each block, output head, and anything extra the model declares."""

    grid: TokenGrid
    text_tokens: int
    image_tokens: int
    embed: int  # patch embedding + timestep/text/image embedders
    head: int  # output projection
    blocks: list[BlockFlops]
    extra: int = 0  # e.g. a router's own compute, from `model.extra_flops(grid)`
    notes: list[str] = field(default_factory=list)

    def block_flops(self, blocks_run: Iterable[int] | None = None) -> int:
        """FLOPs of the blocks in `blocks_run` (all blocks when None)."""
        if blocks_run is None:
            return sum(b.total for b in self.blocks)
        return sum(self.blocks[i].total for i in blocks_run)

    def total(self, blocks_run: Iterable[int] | None = None) -> int:
        """FLOPs of a forward that runs the blocks in `blocks_run` (all blocks when None)."""
        return self.embed + self.head + self.extra + self.block_flops(blocks_run)

    def to_dict(self) -> dict:
        parts = {k: sum(getattr(b, k) for b in self.blocks) for k in BlockFlops.__dataclass_fields__}
        return {
            "tokens": self.grid.tokens,
            "token_grid": [self.grid.frames, self.grid.height, self.grid.width],
            "text_tokens": self.text_tokens,
            "image_tokens": self.image_tokens,
            "total": self.total(),
            "embed": self.embed,
            "head": self.head,
            "extra": self.extra,
            "blocks": self.block_flops(),
            "by_part": parts,
            "per_block": [b.total for b in self.blocks],
        }


def _block_flops(block: nn.Module, S: int, L: int, L_img: int) -> BlockFlops:
    a1, a2 = arch.self_attention(block), arch.cross_attention(block)
    # Projections are counted from the unfused to_q/to_k/to_v, which diffusers keeps even after
    # fuse_projections(); a fused to_qkv does the same multiply-adds.
    self_proj = S * (arch.macs(a1.to_q) + arch.macs(a1.to_k) + arch.macs(a1.to_v) + arch.macs(a1.to_out[0]))
    self_attn = S * S * (a1.to_q.out_features + a1.to_v.out_features)
    cross_proj = S * (arch.macs(a2.to_q) + arch.macs(a2.to_out[0])) + L * (arch.macs(a2.to_k) + arch.macs(a2.to_v))
    cross_attn = S * L * (a2.to_q.out_features + a2.to_v.out_features)
    image_proj = image_attn = 0
    if getattr(a2, "add_k_proj", None) is not None and L_img:
        image_proj = L_img * (arch.macs(a2.add_k_proj) + arch.macs(a2.add_v_proj))
        image_attn = S * L_img * (a2.to_q.out_features + a2.add_v_proj.out_features)
    ffn = S * sum(arch.macs(lin) for lin in arch.ffn_linears(block))
    return BlockFlops(*(2 * x for x in (self_proj, self_attn, cross_proj, cross_attn, image_proj, image_attn, ffn)))


def _embedder_macs(model: nn.Module, L: int, L_img: int) -> int:
    """Timestep MLP (one row), text projection (L rows), image projection (L_img rows)."""
    total = 0
    for name, mod in model.condition_embedder.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        rows = L if name.startswith("text_embedder") else L_img if name.startswith("image_embedder") else 1
        total += rows * arch.macs(mod)
    return total


def count_flops(model: nn.Module, grid: TokenGrid, text_tokens: int, image_tokens: int | None = None) -> FlopReport:
    """FLOPs of one forward of `model` (batch 1) on a token grid, with `text_tokens` text tokens.

    `image_tokens` defaults to Wan's 257 CLIP tokens for image-to-video models and 0 otherwise.
    """
    arch.check_supported(model)
    if image_tokens is None:
        image_tokens = arch.WAN_IMAGE_TOKENS if arch.is_image_to_video(model) else 0
    S, L = grid.tokens, text_tokens
    embed = S * arch.conv_macs(model.patch_embedding) + _embedder_macs(model, L, image_tokens)
    head = S * arch.macs(model.proj_out)
    blocks = [_block_flops(b, S, L, image_tokens) for b in arch.blocks(model)]
    extra_fn = getattr(model, "extra_flops", None)
    extra = int(extra_fn(grid)) if callable(extra_fn) else 0
    return FlopReport(grid, L, image_tokens, 2 * embed, 2 * head, blocks, extra)


def count_video_flops(
    model: nn.Module, latent: LatentSpace, frames: int, height: int, width: int, text_tokens: int,
    image_tokens: int | None = None,
) -> FlopReport:
    """`count_flops` for a video of `frames` x `height` x `width` pixels."""
    return count_flops(model, arch.token_grid(model.config, latent, frames, height, width), text_tokens, image_tokens)


def cpu_sdpa_flop_formula() -> dict:
    """A `custom_mapping` for `torch.utils.flop_counter.FlopCounterMode`: on the CPU, SDPA dispatches to a
    kernel the counter has no formula for (it would count attention as free); this gives it torch's own."""
    import torch
    from torch.utils import flop_counter

    return {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *a, out_shape=None, **kw: flop_counter.sdpa_flop_count(q, k, v)}  # fmt: skip
