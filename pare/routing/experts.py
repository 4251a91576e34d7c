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

import inspect
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


def stack_experts(models: list[torch.nn.Module], levels: list[float], groups: list[list[int]],
                  shared_from: int | None = None) -> RoutedWanTransformer3DModel:
    """A step-experts model whose group g starts as `models[g]`'s blocks (one model: its blocks for every group),
    so that at each of its steps `levels` (noise levels in (0, 1]) it computes exactly what that group's model
    does; `groups`: 0-based steps per group. Patch embedding, condition embedder and output head are shared: several
    models must be cuts of one model at different widths, equal outside their blocks (`pare prune` leaves those
    parts as they are), so that each group can have the width its steps need. `shared_from` (a 0-based group)
    instead takes those parts from that group's model, whatever the others have: its steps compute exactly what it
    does, and the other groups' blocks, trained beside other shared parts, are to be trained again (`pare
    step-distill --only-steps`). The experts take over the models' tensors where they can (a model given once
    shares its memory with its group): train them, not the models."""
    models = list(models) * len(groups) if len(models) == 1 else list(models)
    require(len(models) == len(groups), f"give one model for every group or one per group ({len(groups)}), got {len(models)}")
    require(not any(isinstance(m, RoutedWanTransformer3DModel) for m in models),
            "step experts are built from unrouted models (a step-distilled student, its pruned cuts or their trained "
            "cuts)")  # fmt: skip
    configs = [{k: v for k, v in m.config.items() if not k.startswith("_")} for m in models]
    width_keys = ("self_heads", "cross_heads", "ffn_dims")
    shared = lambda c: {k: v for k, v in c.items() if k not in width_keys}  # noqa: E731
    require(all(shared(c) == shared(configs[0]) for c in configs),
            "the models of the groups differ in more than their widths: give cuts of one model")  # fmt: skip
    cfg, L = configs[0], configs[0]["num_layers"]
    heads, dim = cfg["num_attention_heads"], cfg["ffn_dim"]
    full = {"self_heads": [heads] * L, "cross_heads": [heads] * L, "ffn_dims": [dim] * L}
    owner = {k: g for g, steps in enumerate(groups) for k in steps}
    routes = [list(range(owner[k] * L, (owner[k] + 1) * L)) for k in range(len(levels))]
    cfg = {**cfg, **{key: sum((c.get(key) or full[key] for c in configs), []) for key in width_keys},
           "num_layers": L * len(groups)}  # fmt: skip
    from accelerate import init_empty_weights

    with init_empty_weights():  # the structure without memory: the models' own tensors (copied) are assigned below
        experts = RoutedWanTransformer3DModel(**cfg, always_run=0, route_mode="steps",
                                              step_timesteps=[s * 1000.0 for s in levels], step_routes=routes)  # fmt: skip
    first = next(models[0].parameters())
    c = experts.config  # the router (unused in `steps` mode) is built for real, as `build_routed` does
    experts.router = BlockRouter(c.num_attention_heads * c.attention_head_dim, c.num_layers, c.router_hidden,
                                 c.router_content).to(first.dtype)  # fmt: skip
    states = [m.state_dict() for m in models]
    used: set[int] = set()

    def own(value: torch.Tensor) -> torch.Tensor:
        """The tensor itself the first time its memory is met, a copy after (one model given for several groups):
        no group shares memory with another, and distinct cuts are not copied (a Wan-14B cut is tens of GB)."""
        fresh = value.data_ptr() not in used
        used.add(value.data_ptr())
        return value if fresh else value.clone()

    require(shared_from is None or 0 <= shared_from < len(groups),
            f"shared_from is a 0-based group of the {len(groups)}, got {shared_from}")
    weights = {k: own(v) for k, v in states[shared_from or 0].items() if not k.startswith("blocks.")}
    require(shared_from is not None or all(torch.equal(state[k], v) for state in states[1:] for k, v in weights.items()),
            "the groups' models differ outside their blocks (patch embedding, condition embedder or output head), "
            "which the groups share: give fresh cuts of one model (`pare prune` leaves those parts as they are) and "
            "train the experts afterwards, or say whose to keep (--shared-from G)")  # fmt: skip
    for g, state in enumerate(states):
        for key, value in state.items():
            if key.startswith("blocks."):
                i, rest = key.removeprefix("blocks.").split(".", 1)
                weights[f"blocks.{g * L + int(i)}.{rest}"] = own(value)
    missing = experts.load_state_dict(weights, strict=False, assign=True)
    require(all(k.startswith("router.") for k in missing.missing_keys) and not missing.unexpected_keys,
            "the models' weights do not fit the step experts")  # fmt: skip
    return experts.to(first.device).eval()


def experts_to_folder(bundles: list, groups: str, out: Path, shared_from: int | None = None) -> list[list[int]]:
    """`pare experts`: the step experts of few-step models (one for every group, or one per group) as a PARE
    folder made from the first (its sampler kept, its text encoder and decoder inherited); returns the groups
    (0-based steps); `shared_from`: as in `stack_experts`."""
    levels = [b.sampler_defaults.get("sigmas") for b in bundles]
    for b, own in zip(bundles, levels):
        require(own, f"{b.spec} samples on no schedule of its own: step experts split a few-step model's steps (a "
                "`pare step-distill` student, its cut, or a fused step-distillation LoRA)")  # fmt: skip
        require(own == levels[0], f"{b.spec} samples on other levels than {bundles[0].spec} ({own} against "
                f"{levels[0]}): the groups' models must share one schedule")  # fmt: skip
    split = parse_groups(groups, len(levels[0]))
    experts = stack_experts([b.transformer for b in bundles], levels[0], split, shared_from)
    bundle = bundles[0]
    with atomic_dir(out) as tmp:
        experts.save_pretrained(tmp / "transformer")
        artifacts.write_manifest(tmp, kind="step-experts", base=artifacts.base_spec(bundle.spec),
                                 settings={"groups": [[k + 1 for k in g] for g in split],
                                           "models": [artifacts.base_spec(b.spec) for b in bundles],
                                           **({"shared_from": shared_from + 1} if shared_from is not None else {})},
                                 sampler=bundle.sampler_defaults)  # fmt: skip
    return split


def group_routes(config) -> list[tuple[int, ...]]:
    """The distinct routes of a step-experts config, one per group, in group order (group g owns blocks g*L..)."""
    return sorted({tuple(r) for r in config.step_routes})


def take_group(experts: RoutedWanTransformer3DModel, group: int) -> torch.nn.Module:
    """Group `group` (0-based) of step experts as a plain model: its blocks with the shared embedding, condition
    embedder and head, so that it computes at its steps exactly what the experts do. `pare prune` cuts it, and
    `pare experts` stacks such cuts again (their shared parts are untouched by pruning, so they still match)."""
    from ..pruning.model import PrunedWanTransformer3DModel

    require(is_step_experts(experts), "--take takes a `pare experts` folder (a model whose steps run groups of blocks)")
    c, owners = experts.config, group_routes(experts.config)
    require(0 <= group < len(owners), f"--take {group + 1}: the model has groups 1..{len(owners)}")
    blocks = sorted(set(owners[group]))  # the forward runs a route's blocks in index order
    keys = set(inspect.signature(PrunedWanTransformer3DModel.__init__).parameters) - {"self"}
    cfg = {k: v for k, v in c.items() if k in keys}
    widths = {k: [c[k][b] for b in blocks] for k in ("self_heads", "cross_heads", "ffn_dims")}
    cfg.update(num_layers=len(blocks), **widths)
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = PrunedWanTransformer3DModel(**cfg)
    renumber = {b: i for i, b in enumerate(blocks)}
    weights = {}
    for key, value in experts.state_dict().items():
        if key.startswith("router."):
            continue
        if key.startswith("blocks."):
            i, rest = key.removeprefix("blocks.").split(".", 1)
            if int(i) not in renumber:
                continue
            key = f"blocks.{renumber[int(i)]}.{rest}"
        weights[key] = value.clone()
    model.load_state_dict(weights, strict=True, assign=True)
    return model.to(next(experts.parameters()).device).eval()


def group_to_folder(bundle, group: int, out: Path) -> list[int]:
    """`pare experts --take`: group `group` (0-based) of a step-experts folder as a plain model folder that keeps
    its sampler; returns the group's steps (1-based)."""
    model = take_group(bundle.transformer, group)
    config = bundle.transformer.config
    own = group_routes(config)[group]
    steps = [k + 1 for k, r in enumerate(config.step_routes) if tuple(r) == own]
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp / "transformer")
        artifacts.write_manifest(tmp, kind="expert-group", base=artifacts.base_spec(bundle.spec),
                                 settings={"group": group + 1, "steps": steps}, sampler=bundle.sampler_defaults)  # fmt: skip
    return steps


def group_steps(bundle) -> list[int] | None:
    """The 0-based steps a `pare experts --take` model runs inside its experts, else None."""
    manifest = bundle.manifest or {}
    return [k - 1 for k in manifest["settings"]["steps"]] if manifest.get("kind") == "expert-group" else None


def trajectory_model(bundle) -> torch.nn.Module:
    """The transformer whose samples are a model's own trajectories: for a group taken out of step experts, the
    experts (the group alone would run the other groups' steps too), else the model itself."""
    model = bundle.transformer
    if group_steps(bundle) is None:
        return model
    from ..loading import load_bundle, resolve_base

    p = next(model.parameters())
    experts = load_bundle(resolve_base(bundle.manifest["base"], Path(bundle.spec)), device=p.device, dtype=p.dtype)
    return experts.transformer


def is_step_experts(model) -> bool:
    """A `pare experts` model: each step runs one group's blocks (in a batch of several steps, each group gets
    only its rows, so a group, and always the unused router, can get no gradient in a training step)."""
    return getattr(getattr(model, "config", None), "route_mode", None) == "steps"
