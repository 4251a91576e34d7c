"""Step experts: a few-step model whose steps are split into groups, each group running its own copy of the blocks.

A K-step student asks one network to serve K very different noise levels; a width-pruned cut of it has the
capacity of one narrow network for all of them. Step experts give each group of steps (for example the first two
and the last two of four) its own blocks, as Wan2.2's high-noise and low-noise experts do: each step runs one
group's blocks, so the FLOPs per step are the cut's, while the parameters grow with the number of groups (two
groups of a cut at 0.55 of the width hold about 1.1x the unpruned model's block weights).

The result is a `RoutedWanTransformer3DModel` in `steps` mode: blocks 0..L-1 are the first group's, L..2L-1 the
second's, and so on; patch embedding, condition embedder and output head stay shared. The route of each step is a
table looked up by the timestep (the model's own K levels x 1000), so the sampler, the FLOP counters, `pare bench`
and diffusers' pipelines take it like any routed model, and `pare step-distill --init-from` trains every group on
its own steps at once (each example runs through the blocks of its step's group only).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import artifacts
from ..errors import require
from ..io import atomic_dir
from .model import BlockRouter, RoutedWanTransformer3DModel


def parse_groups(text: str, steps: int) -> list[list[int]]:
    """'1,2/3,4' -> [[0, 1], [2, 3]] (0-based steps), refused unless the groups cover steps 1..K once each."""
    groups = []
    for part in text.split("/"):
        items = [p.strip() for p in part.split(",")]
        require(all(i.isdigit() for i in items), f"--groups takes step numbers such as 1,2/3,4, got {text!r}")
        groups.append([int(i) - 1 for i in items])
    flat = sorted(k for g in groups for k in g)
    require(flat == list(range(steps)), f"--groups must name each of the model's steps 1..{steps} exactly once, "
            f"got {text!r}")  # fmt: skip
    require(len(groups) >= 2, f"--groups needs at least two groups of steps (one group is the model itself), got {text!r}")
    return groups


def stack_experts(model: torch.nn.Module, levels: list[float], groups: list[list[int]]) -> RoutedWanTransformer3DModel:
    """A step-experts model whose every group starts as a copy of `model`'s blocks (so it computes exactly what
    `model` does at every one of its steps `levels`, noise levels in (0, 1]); `groups`: 0-based steps per group."""
    require(not isinstance(model, RoutedWanTransformer3DModel),
            "step experts are built from an unrouted model (a step-distilled student or its pruned, trained cut)")  # fmt: skip
    cfg = {k: v for k, v in model.config.items() if not k.startswith("_")}
    L, G = cfg["num_layers"], len(groups)
    heads, dim = cfg["num_attention_heads"], cfg["ffn_dim"]
    widths = {"self_heads": cfg.get("self_heads") or [heads] * L, "cross_heads": cfg.get("cross_heads") or [heads] * L,
              "ffn_dims": cfg.get("ffn_dims") or [dim] * L}  # fmt: skip
    owner = {k: g for g, steps in enumerate(groups) for k in steps}
    routes = [list(range(owner[k] * L, (owner[k] + 1) * L)) for k in range(len(levels))]
    cfg.update({key: value * G for key, value in widths.items()}, num_layers=L * G)
    from accelerate import init_empty_weights

    with init_empty_weights():  # the structure without memory: the model's own tensors (copied per group) are assigned below
        experts = RoutedWanTransformer3DModel(**cfg, always_run=0, route_mode="steps",
                                              step_timesteps=[s * 1000.0 for s in levels], step_routes=routes)  # fmt: skip
    c = experts.config  # the router (unused in `steps` mode) is built for real, as `build_routed` does
    experts.router = BlockRouter(c.num_attention_heads * c.attention_head_dim, c.num_layers, c.router_hidden,
                                 c.router_content).to(next(model.parameters()).dtype)  # fmt: skip
    weights = {}
    for key, value in model.state_dict().items():
        if key.startswith("blocks."):
            i, rest = key.removeprefix("blocks.").split(".", 1)
            weights.update({f"blocks.{g * L + int(i)}.{rest}": value.clone() for g in range(G)})
        else:
            weights[key] = value.clone()
    missing = experts.load_state_dict(weights, strict=False, assign=True)
    require(all(k.startswith("router.") for k in missing.missing_keys) and not missing.unexpected_keys,
            "the model's weights do not fit the step experts")  # fmt: skip
    return experts.to(next(model.parameters()).device).eval()


def experts_to_folder(bundle, groups: str, out: Path) -> list[list[int]]:
    """`pare experts`: the step experts of `bundle`'s few-step model as a PARE folder (its sampler kept, its
    text encoder and decoder inherited); returns the groups (0-based steps)."""
    levels = bundle.sampler_defaults.get("sigmas")
    require(levels, f"{bundle.spec} samples on no schedule of its own: step experts split a few-step model's steps "
            "(a `pare step-distill` student, its pruned and trained cut, or a fused step-distillation LoRA)")  # fmt: skip
    split = parse_groups(groups, len(levels))
    experts = stack_experts(bundle.transformer, levels, split)
    with atomic_dir(out) as tmp:
        experts.save_pretrained(tmp / "transformer")
        artifacts.write_manifest(tmp, kind="step-experts", base=artifacts.base_spec(bundle.spec),
                                 settings={"groups": [[k + 1 for k in g] for g in split]}, sampler=bundle.sampler_defaults)  # fmt: skip
    return split
