"""Multiplicative gates on attention heads and FFN channels, installed as forward pre-hooks.

A gate scales one head's output (before the attention's output projection) or one FFN channel (before the
FFN's down projection). All gates at 1 leave the model exactly as it was; a gate at 0 removes that head or
channel without touching the weights. Gates with `requires_grad` give the first-order Taylor importance
|g * dL/dg| of each head and channel. Removing the hooks restores the model bit for bit.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from . import arch


@dataclass
class Gates:
    """Gate values: (num_blocks, heads) for self- and cross-attention, (num_blocks, ffn) for FFN channels.
    A field left None is not gated. Blocks may differ in width (pruned models): then the fields are lists."""

    self_heads: torch.Tensor | list | None = None
    cross_heads: torch.Tensor | list | None = None
    ffn: torch.Tensor | list | None = None

    @classmethod
    def ones(cls, model: nn.Module, requires_grad: bool = False, device=None) -> Gates:
        blocks = arch.blocks(model)
        dev = device or next(model.parameters()).device

        def make(n):
            return torch.ones(n, device=dev, requires_grad=requires_grad)

        return cls([make(arch.num_heads(arch.self_attention(b))) for b in blocks],
                   [make(arch.num_heads(arch.cross_attention(b))) for b in blocks],
                   [make(arch.ffn_width(b)) for b in blocks])  # fmt: skip


def _head_hook(gate: torch.Tensor, heads: int):
    def hook(module, args):
        x = args[0]  # (B, S, heads * head_dim): attention output before to_out
        g = gate.to(x.dtype).repeat_interleave(x.shape[-1] // heads)
        return (x * g,) + tuple(args[1:])

    return hook


def _channel_hook(gate: torch.Tensor):
    def hook(module, args):
        return (args[0] * gate.to(args[0].dtype),) + tuple(args[1:])  # (B, S, F) before the down projection

    return hook


@contextmanager
def gated(model: nn.Module, gates: Gates):
    """Run `model` with `gates` applied; the hooks are removed on exit."""
    handles = []
    try:
        for i, block in enumerate(arch.blocks(model)):
            for attn, values in ((arch.self_attention(block), gates.self_heads),
                                 (arch.cross_attention(block), gates.cross_heads)):  # fmt: skip
                if values is not None:
                    handles.append(attn.to_out[0].register_forward_pre_hook(_head_hook(values[i], arch.num_heads(attn))))
            if gates.ffn is not None:
                down = arch.ffn_linears(block)[1]
                handles.append(down.register_forward_pre_hook(_channel_hook(gates.ffn[i])))
        yield model
    finally:
        for h in handles:
            h.remove()
