"""Importance of heads and FFN channels, by two criteria the pruning planner can choose from.

taylor   first-order Taylor on per-head / per-channel gates, |g * dL/dg| summed over calibration batches,
         with L the flow-matching loss against the unpruned model's own trajectories: the velocity that
         carries x_t to where the unpruned model's sample ended, (x_t - x_0) / sigma. (The plain output error
         against the unpruned model's output is identically 0, with gradient 0, at g = 1, so it cannot rank
         gates to first order; its own trajectory's endpoint is the nearest target that can.)
removal  the relative output error ||f_without_h - f||^2 / ||f||^2 on the calibration inputs when head h alone
         is removed (its gate set to 0). "model": of the model's output, one model forward per head (blocks x
         heads forwards: 1,600 at Wan2.1-14B); "block": of the head's own block's output, from that block's
         inputs, which a chain through the blocks computes once per batch: one block forward per head, about
         heads + 1 model forwards' worth in all.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import arch
from ..gates import Gates, gated
from .calibration import Calibration


def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (losses of bf16 models are summed in fp32; fp64 stays fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def taylor_importance(model: nn.Module, calib: Calibration, batch_size: int, progress: bool = False,
                      checkpointing: bool = True) -> dict:  # fmt: skip
    """{"self": (blocks, H), "cross": (blocks, H), "ffn": [(F_b,)...]} of summed |g * dL/dg|. With
    `checkpointing` (diffusers' gradient checkpointing), the backward keeps each block's input and recomputes
    the rest: activations of one block instead of all (what lets a 14B model's backward fit)."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    gates = Gates.ones(model, requires_grad=True)
    acc = {name: [torch.zeros_like(g) for g in getattr(gates, field)] for name, field in
           (("self", "self_heads"), ("cross", "cross_heads"), ("ffn", "ffn"))}  # fmt: skip
    was_checkpointing = model.is_gradient_checkpointing
    if checkpointing and not was_checkpointing:
        model.enable_gradient_checkpointing()
    try:
        _taylor_batches(model, calib, batch_size, gates, acc, device, dtype, progress)
    finally:
        if checkpointing and not was_checkpointing:
            model.disable_gradient_checkpointing()
    return {"self": torch.stack(acc["self"]).cpu(), "cross": torch.stack(acc["cross"]).cpu(),
            "ffn": [a.cpu() for a in acc["ffn"]]}  # fmt: skip


def _taylor_batches(model, calib, batch_size, gates, acc, device, dtype, progress) -> None:
    for rows in tqdm(list(calib.batches(batch_size)), desc="taylor", disable=not progress, leave=False):
        with gated(model, gates):  # the backward too: a checkpointed block recomputes its forward, gates and all
            out = _wide(model(**calib.inputs(rows, device, dtype))[0])
            target = calib.target_velocity(rows).to(device, out.dtype)
            loss = ((out - target) ** 2).mean()
            grads = torch.autograd.grad(loss, [*gates.self_heads, *gates.cross_heads, *gates.ffn])
        n = len(gates.self_heads)
        for j, (name, field) in enumerate((("self", "self_heads"), ("cross", "cross_heads"), ("ffn", "ffn"))):
            for b in range(n):
                g = getattr(gates, field)[b]
                acc[name][b] += (g.detach() * grads[j * n + b]).abs()


@torch.no_grad()
def removal_error(model: nn.Module, calib: Calibration, batch_size: int, progress: bool = False) -> torch.Tensor:
    """(blocks, H) relative output error when each self-attention head alone is removed."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    batches = list(calib.batches(batch_size))
    full = [_wide(model(**calib.inputs(rows, device, dtype))[0]) for rows in batches]
    norm = sum((f**2).sum() for f in full)
    blocks = arch.blocks(model)
    heads = arch.num_heads(arch.self_attention(blocks[0]))
    err = torch.zeros(len(blocks), heads)
    todo = [(b, h) for b in range(len(blocks)) for h in range(heads)]
    for b, h in tqdm(todo, desc="removal", disable=not progress, leave=False):
        gates = Gates.ones(model)
        gates.self_heads[b][h] = 0
        with gated(model, Gates(self_heads=gates.self_heads)):
            diff = sum(((_wide(model(**calib.inputs(rows, device, dtype))[0]) - f) ** 2).sum()
                       for rows, f in zip(batches, full))  # fmt: skip
        err[b, h] = (diff / norm).item()
    return err


class _Stop(Exception):
    """Raised by a pre-hook to end a forward once the inputs it needed are captured."""


def _block_inputs(model: nn.Module, inputs: dict) -> tuple[list, dict]:
    """The positional and keyword arguments of the first block's forward for `inputs`; the forward stops there."""
    got = {}

    def hook(module, args, kwargs):
        got.update(args=list(args), kwargs=dict(kwargs))
        raise _Stop

    handle = arch.blocks(model)[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(**inputs)
    except _Stop:
        pass
    finally:
        handle.remove()
    return got["args"], got["kwargs"]


@torch.no_grad()
def block_removal_error(model: nn.Module, calib: Calibration, batch_size: int, progress: bool = False) -> torch.Tensor:
    """(blocks, H) relative change of each block's output when one of its self-attention heads alone is removed.

    The blocks run as the model runs them (hidden states in, hidden states out, the same text, timestep and RoPE
    arguments for every block), so block b's input is block b-1's output: per batch, the chain computes each
    block once unchanged and once per head with that head's gate at 0. Written here because no library measures
    per-head removal; the block-local error is a cheap stand-in for the model-level one (`removal_error`)."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    blocks = arch.blocks(model)
    heads = arch.num_heads(arch.self_attention(blocks[0]))
    diff, norm = torch.zeros(len(blocks), heads, dtype=torch.float64), torch.zeros(len(blocks), dtype=torch.float64)
    batches = list(calib.batches(batch_size))
    bar = tqdm(total=len(batches) * len(blocks), desc="removal (per block)", disable=not progress, leave=False)
    for rows in batches:
        args, kwargs = _block_inputs(model, calib.inputs(rows, device, dtype))
        hidden, rest = args[0], args[1:]
        for b, block in enumerate(blocks):
            out = block(hidden, *rest, **kwargs)
            full = _wide(out)
            norm[b] += (full**2).sum().double().cpu()
            for h in range(heads):
                gates = Gates.ones(model)
                gates.self_heads[b][h] = 0
                with gated(model, Gates(self_heads=gates.self_heads)):
                    diff[b, h] += ((_wide(block(hidden, *rest, **kwargs)) - full) ** 2).sum().double().cpu()
            hidden = out
            bar.update()
    bar.close()
    return (diff / norm[:, None].clamp_min(1e-30)).float()
