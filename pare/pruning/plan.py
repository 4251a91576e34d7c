"""Width plans: which heads (self- and cross-attention) and which FFN channels each block keeps.

A plan is computed from scores alone (a head profile's role-aware score, or its plain importance for a
role-agnostic plan) and executed by `pare.pruning.prune`; neither knows about the other.

Allocation. Kept units are chosen greedily by score: `global` ranks all blocks' heads together (so important
blocks keep more), `uniform` keeps the same share in every block. With `multiple_of = K` heads are taken K at a
time in each block (a block's next K best heads form one unit, worth their summed score), so every block's
head count is a multiple of K, as Ulysses context parallelism of degree K needs. Every block keeps at least
one unit; `min_temporal_share` forces a share of each block's temporal heads to be kept before anything else.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..errors import require


@dataclass
class WidthPlan:
    """Kept indices per block: self-attention heads, cross-attention heads, FFN channels (sorted)."""

    self_heads: list[list[int]]
    cross_heads: list[list[int]]
    ffn: list[list[int]]

    def counts(self) -> dict[str, list[int]]:
        return {k: [len(x) for x in v] for k, v in asdict(self).items()}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> WidthPlan:
        return cls(d["self_heads"], d["cross_heads"], d["ffn"])


def allocate(scores: list[torch.Tensor], ratio: float, allocation: str, multiple_of: int = 1,
             forced: list[list[int]] | None = None, what: str = "heads") -> list[list[int]]:  # fmt: skip
    """Indices kept in each block when `ratio` of all units is removed (see the module docstring)."""
    require(0 <= ratio < 1, f"--{what} must be a ratio in [0, 1), got {ratio}")
    require(allocation in ("global", "uniform"), f"--allocation must be global or uniform, got {allocation!r}")
    K = multiple_of
    forced = forced or [[] for _ in scores]
    orders, values = [], []
    for s, f in zip(scores, forced):
        require(len(s) % K == 0, f"a block has {len(s)} {what}, not a multiple of --heads-multiple-of {K}")
        rest = [int(i) for i in torch.argsort(s, descending=True, stable=True) if int(i) not in f]
        order = sorted(f, key=lambda i: -float(s[i])) + rest  # forced first, then by score
        orders.append(order)
        unit = [sum(float(s[i]) for i in order[j : j + K]) for j in range(0, len(order), K)]
        n_forced_units = math.ceil(len(f) / K)
        values.append([math.inf] * n_forced_units + unit[n_forced_units:])
    units_total = sum(len(v) for v in values)
    if allocation == "uniform":
        keep_units = [max(1, round((1 - ratio) * len(v))) for v in values]
        keep_units = [max(k, sum(1 for x in v if x == math.inf)) for k, v in zip(keep_units, values)]
    else:
        target = round((1 - ratio) * units_total)
        require(target >= len(scores), f"--{what} {ratio} would leave fewer than one unit of {K} per block "
                f"({target} units for {len(scores)} blocks)")  # fmt: skip
        keep_units = [max(1, sum(1 for x in v if x == math.inf)) for v in values]
        # greedy: the next unit of the block whose next unit scores best (units within a block are sorted)
        while sum(keep_units) < target:
            best = max((b for b in range(len(values)) if keep_units[b] < len(values[b])),
                       key=lambda b: values[b][keep_units[b]])  # fmt: skip
            keep_units[best] += 1
    return [sorted(order[: k * K]) for order, k in zip(orders, keep_units)]


def plan_from_profile(profile: dict, heads: float, ffn: float, allocation: str = "global", multiple_of: int = 1,
                      temporal_multiplier: float | None = None, min_temporal_share: float | None = None) -> WidthPlan:  # fmt: skip
    """A width plan from a head profile (heads.json). `temporal_multiplier=1` and `min_temporal_share=0` give
    the role-agnostic plan; None takes the profile's settings for either."""
    settings = profile["settings"]
    mult = settings["temporal_multiplier"] if temporal_multiplier is None else temporal_multiplier
    share = settings["min_temporal_share"] if min_temporal_share is None else min_temporal_share
    require(mult >= 1, f"--temporal-multiplier must be >= 1, got {mult}")
    require(0 <= share <= 1, f"--min-temporal-share must be in [0, 1], got {share}")
    key = profile["rule"]["score"]  # removal_error or taylor
    self_scores, forced = [], []
    for block in profile["blocks"]:
        base = torch.tensor([h[key] for h in block["heads"]], dtype=torch.float64)
        temporal = [h["head"] for h in block["heads"] if h["role"] == "temporal"]
        boost = torch.ones_like(base)
        boost[temporal] = mult
        self_scores.append(base * boost)
        ranked = sorted(temporal, key=lambda i: -float(base[i]))
        forced.append(ranked[: math.ceil(share * len(temporal))] if heads > 0 else [])
    cross_scores = [torch.tensor(b["cross_taylor"], dtype=torch.float64) for b in profile["blocks"]]
    ffn_scores = [torch.tensor(b["ffn_taylor"], dtype=torch.float64) for b in profile["blocks"]]
    return WidthPlan(
        allocate(self_scores, heads, allocation, multiple_of, forced, "heads"),
        allocate(cross_scores, heads, allocation, multiple_of, None, "heads"),
        allocate(ffn_scores, ffn, allocation, 1, None, "ffn"),
    )
