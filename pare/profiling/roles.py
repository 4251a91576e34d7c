"""Spatial and temporal roles of self-attention heads, from exact attention rows of sampled query tokens.

For a few sampled queries per forward, a head's attention row over all S keys is computed exactly from its
queries and keys (after the q/k RMSNorm and RoPE, as the attention itself sees them); the S x S matrix is
never formed, so memory stays at (heads x queries x S) per sample. From the rows:

    own      attention mass on the query's own frame            (uniform attention: 1 / F)
    other    mass on all other frames                            (uniform: (F - 1) / F)
    samepos  mass on the query's spatial position in other frames (uniform: (F - 1) / S)
    err_frame, err_temporal
             how far the head's output moves when its attention is restricted (and renormalised) to the own
             frame, or to the query's position across all frames: ||o - o_masked||^2 / ||o||^2

Role rule: a head is spatial when most of its attention stays in the query's own frame (own >= SPATIAL_OWN);
temporal when most of it goes to other frames *and* is aimed at the query's own position there (samepos at least
TEMPORAL_FOCUS times what uniform attention gives); mixed otherwise (diffuse or global heads). Mass on other
frames alone cannot decide: with F frames, uniform attention already puts (F - 1) / F of its mass there. The
output-error test is reported beside the rule as a check of it (a spatial head has err_frame << err_temporal).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .. import arch
from ..arch import TokenGrid

SPATIAL_OWN = 0.5
TEMPORAL_FOCUS = 2.0
ROLES = ("spatial", "temporal", "mixed")
STATS = ("own", "other", "samepos", "err_frame", "err_temporal")
# Rows of (heads x queries x S) fp32 elements computed at once; bounds the probe's working memory (64 MiB a
# tensor): heads are processed in chunks of MAX_ROW_ELEMENTS // (B x Q x S).
MAX_ROW_ELEMENTS = 1 << 24


def role_of(own: torch.Tensor, samepos: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
    """Role codes (index into ROLES) from own-frame mass and same-position-other-frames mass."""
    spatial, temporal, mixed = (ROLES.index(r) for r in ROLES)
    out = torch.full_like(own, mixed, dtype=torch.long)
    out[(own < SPATIAL_OWN) & (samepos >= TEMPORAL_FOCUS * uniform_stats(grid)["samepos"])] = temporal
    out[own >= SPATIAL_OWN] = spatial
    return out


def apply_rope(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on x (B, S, H, d), as diffusers' WanAttnProcessor applies it (that function is
    local to the processor's __call__ and cannot be imported)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def head_stats(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: TokenGrid, queries: torch.Tensor) -> dict:
    """Role statistics of every head for the query tokens `queries` (Q,).

    q, k, v: (B, S, H, d) as the attention sees them. Returns {stat: (B, H)} means over the queries.
    """
    B, S, H, d = q.shape
    dev = q.device
    frame, pos = grid.frame_of_token(dev), grid.position_of_token(dev)
    same_frame = frame[queries, None] == frame[None]  # (Q, S)
    same_pos = pos[queries, None] == pos[None]  # (Q, S): the query's position in every frame, its own included
    other_pos = same_pos & ~same_frame
    chunk = max(1, MAX_ROW_ELEMENTS // max(1, B * len(queries) * S))
    parts = []
    for h0 in range(0, H, chunk):
        hs = slice(h0, min(H, h0 + chunk))
        qs = q[:, queries, hs].float()  # (B, Q, h, d)
        logits = torch.einsum("bqhd,bshd->bhqs", qs, k[:, :, hs].float()) * d**-0.5
        A = logits.softmax(-1)  # (B, h, Q, S): exact attention rows
        vv = v[:, :, hs].float()
        out = torch.einsum("bhqs,bshd->bhqd", A, vv)

        def restricted_error(mask):
            Am = A * mask
            Am = Am / Am.sum(-1, keepdim=True).clamp_min(1e-30)
            o = torch.einsum("bhqs,bshd->bhqd", Am, vv)
            return ((out - o) ** 2).sum(-1) / (out**2).sum(-1).clamp_min(1e-30)

        own = (A * same_frame).sum(-1)
        parts.append({
            "own": own, "other": 1 - own, "samepos": (A * other_pos).sum(-1),
            "err_frame": restricted_error(same_frame), "err_temporal": restricted_error(same_pos),
        })  # fmt: skip
    return {k: torch.cat([p[k] for p in parts], dim=1).mean(-1) for k in STATS}


def probe_extra_bytes(heads: int, head_dim: int, grid: TokenGrid, queries: int, batch: int, dtype_bytes: int = 2) -> int:
    """Peak memory the probe adds to one self-attention forward: the rotated copies of q and k in the model's
    dtype, the fp32 keys and values of one head chunk, and four fp32 (chunk x Q x S) row tensors (logits,
    attention, one masked copy, its renormalisation)."""
    S, Q = grid.tokens, min(queries, grid.tokens)
    chunk = min(heads, max(1, MAX_ROW_ELEMENTS // max(1, batch * Q * S)))
    rope_copies = 2 * batch * S * heads * head_dim * dtype_bytes
    kv_chunk = 2 * batch * S * chunk * head_dim * 4
    rows = 4 * batch * chunk * Q * S * 4
    return rope_copies + kv_chunk + rows


def uniform_stats(grid: TokenGrid) -> dict[str, float]:
    """What uniform attention would give, the baseline of the relative statistics."""
    F, S = grid.frames, grid.tokens
    return {"own": 1 / F, "other": (F - 1) / F, "samepos": (F - 1) / S}


@dataclass
class _Capture:
    rotary: tuple | None = None
    q: torch.Tensor | None = None
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None


@contextmanager
def probe_self_attention(model: nn.Module, grid: TokenGrid, queries: int, generator: torch.Generator):
    """While active, every forward appends to `records[block]` the {stat: (B, H)} of that block's self-attention
    for `queries` query tokens sampled afresh each forward (all tokens when queries >= S). Yields `records`."""
    blocks = arch.blocks(model)
    records: list[list[dict]] = [[] for _ in blocks]
    handles = []
    state = {"queries": None}

    def pick(S, device):
        if state["queries"] is None or state["queries"].device != device:
            idx = torch.arange(S) if queries >= S else torch.randperm(S, generator=generator)[:queries].sort().values
            state["queries"] = idx.to(device)
        return state["queries"]

    for i, block in enumerate(blocks):
        attn = arch.self_attention(block)
        cap = _Capture()

        def pre(module, args, kwargs, cap=cap):
            cap.rotary = args[3] if len(args) > 3 else kwargs.get("rotary_emb")

        def keep(name, cap=cap):
            def hook(module, args, output):
                setattr(cap, name, output)

            return hook

        def post(module, args, output, cap=cap, i=i):
            heads = arch.num_heads(module)
            q, k, v = (t.unflatten(2, (heads, -1)) for t in (cap.q, cap.k, cap.v))  # (B, S, H, d)
            q, k = apply_rope(q, *cap.rotary), apply_rope(k, *cap.rotary)
            with torch.no_grad():
                records[i].append(head_stats(q.detach(), k.detach(), v.detach(), grid, pick(q.shape[1], q.device)))
            cap.q = cap.k = cap.v = None

        handles += [attn.register_forward_pre_hook(pre, with_kwargs=True), attn.norm_q.register_forward_hook(keep("q")),
                    attn.norm_k.register_forward_hook(keep("k")), attn.to_v.register_forward_hook(keep("v")),
                    attn.register_forward_hook(post)]  # fmt: skip
    # a new query sample for every forward: reset before each one
    handles.append(model.register_forward_pre_hook(lambda *_: state.update(queries=None)))
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


def stack_records(records: list[list[dict]]) -> dict[str, torch.Tensor]:
    """{stat: (N, blocks, H)} from the per-block lists of per-forward {stat: (B, H)}."""
    return {k: torch.stack([torch.cat([r[k] for r in block]) for block in records], dim=1).cpu() for k in STATS}
