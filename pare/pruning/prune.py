"""Executing a width plan: physical slicing of heads and FFN channels into a `PrunedWanTransformer3DModel`.

Slicing the FFN is exact. Slicing heads is not: Wan's q/k norms are one RMSNorm over all heads, so the kept
heads are normalised by the RMS of fewer channels than before. The correction rescales each kept norm's
weights by the calibration mean of rms(kept channels) / rms(all channels): then x_kept / rms_kept * w'
matches x_kept / rms_full * w on average (`norm_scales`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import arch
from .model import PrunedWanTransformer3DModel
from .plan import WidthPlan

# (attention, norm, projection whose output it normalises) per block; added_k only for I2V models
NORMS = (("attn1", "norm_q", "to_q"), ("attn1", "norm_k", "to_k"), ("attn2", "norm_q", "to_q"),
         ("attn2", "norm_k", "to_k"), ("attn2", "norm_added_k", "add_k_proj"))  # fmt: skip


@dataclass
class PruneReport:
    """Sizes before and after, per-block widths, and the output error right after pruning."""

    params_before: int
    params_after: int
    self_heads: list[int]
    cross_heads: list[int]
    ffn_dims: list[int]
    error_without_correction: float | None = None
    error_with_correction: float | None = None


def _dims(heads: list[int], head_dim: int) -> torch.Tensor:
    """Channel indices of the given heads in a (heads x head_dim) projection."""
    return torch.tensor([h * head_dim + j for h in heads for j in range(head_dim)], dtype=torch.long)


def _kept_channels(plan: WidthPlan, b: int, attn: str, head_dim: int) -> torch.Tensor:
    return _dims(plan.self_heads[b] if attn == "attn1" else plan.cross_heads[b], head_dim)


@torch.no_grad()
def norm_scales(model: nn.Module, plan: WidthPlan, batches) -> dict[tuple[int, str, str], float]:
    """{(block, attention, norm): mean rms(kept) / rms(all)} of the q/k projections on calibration inputs.

    `batches`: iterable of forward keyword arguments."""
    head_dim = arch.head_dim(arch.self_attention(arch.blocks(model)[0]))
    sums: dict[tuple[int, str, str], list[float]] = {}
    handles = []
    for b, block in enumerate(arch.blocks(model)):
        for attn_name, norm_name, proj_name in NORMS:
            attn = getattr(block, attn_name)
            proj = getattr(attn, proj_name, None)
            if proj is None:
                continue
            kept = _kept_channels(plan, b, attn_name, head_dim)
            eps = getattr(attn, norm_name).eps or torch.finfo(torch.float32).eps

            def hook(module, args, out, key=(b, attn_name, norm_name), kept=kept, eps=eps):
                x = out.float()  # (B, S, H * d)
                full = x.pow(2).mean(-1).add(eps).sqrt()
                part = x[..., kept.to(x.device)].pow(2).mean(-1).add(eps).sqrt()
                acc = sums.setdefault(key, [0.0, 0])
                acc[0] += (part / full).sum().item()
                acc[1] += part.numel()

            handles.append(proj.register_forward_hook(hook))
    try:
        for kwargs in batches:
            model(**kwargs)
    finally:
        for h in handles:
            h.remove()
    return {k: s / n for k, (s, n) in sums.items()}


def prune(model: nn.Module, plan: WidthPlan, scales: dict | None = None,
          in_place: bool = False) -> tuple[PrunedWanTransformer3DModel, PruneReport]:  # fmt: skip
    """A new, physically smaller model that keeps what `plan` says; `scales` from `norm_scales` correct the
    q/k norms (None: no correction). The input model is left as it was, unless `in_place`: then each block's
    sliced tensors are freed as soon as their slices exist and the unsliced ones are shared, so the peak is the
    model plus one block, and `model` is left unusable (its sliced weights are empty)."""
    config = dict(model.config)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    config.update(self_heads=[len(h) for h in plan.self_heads], cross_heads=[len(h) for h in plan.cross_heads],
                  ffn_dims=[len(c) for c in plan.ffn])  # fmt: skip
    device = next(model.parameters()).device
    before = sum(p.numel() for p in model.parameters())
    with torch.device("meta"):
        pruned = PrunedWanTransformer3DModel.from_config(config)
    head_dim = model.config.attention_head_dim
    state = model.state_dict()
    for b in range(len(arch.blocks(model))):
        p = f"blocks.{b}."
        for attn in ("attn1", "attn2"):
            keep = _kept_channels(plan, b, attn, head_dim)
            for proj in ("to_q", "to_k", "to_v", "add_k_proj", "add_v_proj"):
                if f"{p}{attn}.{proj}.weight" in state:
                    for kind in ("weight", "bias"):
                        state[f"{p}{attn}.{proj}.{kind}"] = state[f"{p}{attn}.{proj}.{kind}"][keep.to(device)]
            state[f"{p}{attn}.to_out.0.weight"] = state[f"{p}{attn}.to_out.0.weight"][:, keep.to(device)]
            for norm in ("norm_q", "norm_k", "norm_added_k"):
                key = f"{p}{attn}.{norm}.weight"
                if key in state:
                    w = state[key][keep.to(device)]
                    if scales is not None and (b, attn, norm) in scales and len(keep) < state[key].numel():
                        w = w * scales[(b, attn, norm)]
                    state[key] = w
        channels = torch.tensor(plan.ffn[b], dtype=torch.long, device=device)
        for kind in ("weight", "bias"):
            state[f"{p}ffn.net.0.proj.{kind}"] = state[f"{p}ffn.net.0.proj.{kind}"][channels]
        state[f"{p}ffn.net.2.weight"] = state[f"{p}ffn.net.2.weight"][:, channels]
        if in_place:  # block b's sliced originals are no longer needed
            for name, param in arch.blocks(model)[b].named_parameters():
                if state[p + name].data_ptr() != param.data_ptr():
                    param.data = param.data.new_empty(0)
    # sliced tensors are already new; the rest (embeddings, norms, output head) are cloned so that the pruned
    # model shares no storage with the original (unless in place): at most one copy of what is kept is made
    unsliced = model.state_dict()  # (state_dict detaches: compare storage, not tensor objects)
    pruned.load_state_dict({k: v.clone() if not in_place and v.data_ptr() == unsliced[k].data_ptr() else v
                            for k, v in state.items()}, assign=True)  # fmt: skip
    # buffers that are not in the state dict (RoPE tables) were created on the meta device: rebuild them
    pruned.rope = type(model.rope)(model.rope.attention_head_dim, model.rope.patch_size, model.rope.max_seq_len)
    pruned = pruned.to(device).eval()
    report = PruneReport(before, sum(p.numel() for p in pruned.parameters()), config["self_heads"],
                         config["cross_heads"], config["ffn_dims"])  # fmt: skip
    return pruned, report


@torch.no_grad()
def apply_norm_scales(pruned: nn.Module, plan: WidthPlan, scales: dict, heads: int) -> None:
    """Correct the q/k norms of a model pruned without `scales` (the same weights as `prune(..., scales)`): each
    norm of an attention that lost heads (of `heads`) is multiplied by its scale."""
    for (b, attn, norm), scale in scales.items():
        kept = plan.self_heads[b] if attn == "attn1" else plan.cross_heads[b]
        if len(kept) < heads:
            getattr(getattr(arch.blocks(pruned)[b], attn), norm).weight.mul_(scale)
