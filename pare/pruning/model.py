"""A Wan transformer whose blocks have their own head counts and FFN widths.

It is diffusers' `WanTransformer3DModel` with three more config entries (kept self-attention heads, kept
cross-attention heads, FFN width, per block). Its blocks stay `WanTransformerBlock`s whose attention and FFN
modules are built narrower, so state-dict keys, diffusers' attention processors and diffusers' cache hooks
(registered against `WanTransformerBlock`) all work unchanged; `save_pretrained` / `from_pretrained` round-trip
through safetensors and `from_pretrained` builds it on the meta device first, as for any diffusers model.
"""

from __future__ import annotations

from diffusers import WanTransformer3DModel
from diffusers.models.attention import FeedForward
from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor
from torch import nn

from ..loading import extends_config, register_model_class


def narrow_block_(block: nn.Module, self_heads: int, cross_heads: int, ffn_dim: int, head_dim: int, eps: float,
                  added_kv_proj_dim: int | None) -> None:  # fmt: skip
    """Replace a block's attention and FFN modules by freshly built narrower ones (weights are set later)."""
    dim = block.attn1.to_q.in_features
    device = block.attn1.to_q.weight.device
    dtype = block.attn1.to_q.weight.dtype
    block.attn1 = WanAttention(dim=dim, heads=self_heads, dim_head=head_dim, eps=eps, cross_attention_dim_head=None,
                               processor=WanAttnProcessor()).to(device, dtype)  # fmt: skip
    block.attn2 = WanAttention(dim=dim, heads=cross_heads, dim_head=head_dim, eps=eps,
                               added_kv_proj_dim=added_kv_proj_dim, cross_attention_dim_head=head_dim,
                               processor=WanAttnProcessor()).to(device, dtype)  # fmt: skip
    block.ffn = FeedForward(dim, inner_dim=ffn_dim, activation_fn="gelu-approximate").to(device, dtype)


@register_model_class
class PrunedWanTransformer3DModel(WanTransformer3DModel):
    """`WanTransformer3DModel` with per-block widths: `self_heads[i]`, `cross_heads[i]`, `ffn_dims[i]`."""

    @extends_config(WanTransformer3DModel)
    def __init__(self, *, self_heads: list[int] | None = None, cross_heads: list[int] | None = None,
                 ffn_dims: list[int] | None = None, **wan) -> None:  # fmt: skip
        super().__init__(**wan)
        c = self.config
        num_attention_heads, num_layers, ffn_dim = c.num_attention_heads, c.num_layers, c.ffn_dim
        self_heads = self_heads or [num_attention_heads] * num_layers
        cross_heads = cross_heads or [num_attention_heads] * num_layers
        ffn_dims = ffn_dims or [ffn_dim] * num_layers
        if not len(self_heads) == len(cross_heads) == len(ffn_dims) == num_layers:
            raise ValueError(f"per-block widths must have num_layers={num_layers} entries")
        for block, h1, h2, f in zip(self.blocks, self_heads, cross_heads, ffn_dims):
            if (h1, h2, f) != (num_attention_heads, num_attention_heads, ffn_dim):
                narrow_block_(block, h1, h2, f, c.attention_head_dim, c.eps, c.added_kv_proj_dim)
