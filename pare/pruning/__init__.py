"""Structure-aware width pruning: a plan from a head profile, physical slicing, q/k-norm correction, and an
output folder that every later command loads. One config, one verb: `prune_model(bundle, profile, config)`."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import arch, artifacts
from ..errors import PareError, require
from ..io import atomic_dir
from ..loading import ModelBundle
from .model import PrunedWanTransformer3DModel
from .plan import WidthPlan, allocate, plan_from_profile
from .prune import PruneReport, apply_norm_scales, norm_scales, prune


@dataclass
class PruneConfig:
    """Knobs of `pare prune`."""

    heads: float = 0.25  # share of heads removed, self- and cross-attention
    ffn: float = 0.25  # share of FFN channels removed
    allocation: str = "global"  # global | uniform
    heads_multiple_of: int = 1
    temporal_multiplier: float | None = None  # multiplier of temporal heads' score; None = profile's
    min_temporal_share: float | None = None  # None = the profile's
    correct_norms: bool = True
    calibration_videos: int = 4
    seed: int = 0

    def validate(self) -> None:
        require(0 <= self.heads < 1, f"--heads must be a ratio in [0, 1), got {self.heads}")
        require(0 <= self.ffn < 1, f"--ffn must be a ratio in [0, 1), got {self.ffn}")
        require(self.heads_multiple_of >= 1, f"--heads-multiple-of must be >= 1, got {self.heads_multiple_of}")
        require(self.calibration_videos >= 1, f"--calibration-videos must be at least 1, got {self.calibration_videos}")


def check_profile_matches(profile: dict, model) -> None:
    """The profile was written by `pare profile` for this model, and its entries are whole: one per block, head
    and FFN channel of the model, each with its score (a hand-edited profile would otherwise prune silently)."""
    from ..profiling import config_record, fingerprint, public_config

    if profile.get("fingerprint") == fingerprint(model):
        problem = _profile_problem(profile, model)
        require(problem is None, f"the head profile is malformed ({problem}); write it again with `pare profile`")
        return
    same_config = public_config(profile.get("model_config", {})) == public_config(config_record(model))
    why = ("same config, other weights (or a profile written before fingerprints ignored where a model was "
           "loaded from)" if same_config else "another config")  # fmt: skip
    raise PareError(f"the profile was made on another model ({profile['model']}, fingerprint "
                    f"{profile['fingerprint']}: {why}); profile this model with `pare profile` first")


def _profile_problem(profile: dict, model) -> str | None:
    """What is wrong with a profile's entries for `model`, or None."""
    from ..profiling.roles import ROLES

    try:
        key = profile["rule"]["score"]
        settings = profile["settings"]
        for name in ("temporal_multiplier", "min_temporal_share", "steps", "timesteps"):
            if name not in settings:
                return f"settings lack {name!r}"
        model_blocks, entries = arch.blocks(model), profile["blocks"]
        if not isinstance(entries, list) or len(entries) != len(model_blocks):
            return f"{len(entries) if isinstance(entries, list) else 'no'} blocks for a model of {len(model_blocks)}"
        for b, (entry, block) in enumerate(zip(entries, model_blocks)):
            n = arch.num_heads(arch.self_attention(block))
            heads = entry["heads"]
            listed = sorted(h["head"] for h in heads)
            if listed != list(range(n)):
                return f"block {b} lists heads {listed}, the model has {n}"
            if not all(isinstance(h[key], (int, float)) and math.isfinite(h[key]) and h["role"] in ROLES for h in heads):
                return f"block {b} has a head without a finite {key!r} score or a known role"
            for name, width in (("cross_taylor", arch.num_heads(arch.cross_attention(block))),
                                ("ffn_taylor", arch.ffn_width(block))):  # fmt: skip
                if len(entry[name]) != width:
                    return f"block {b} has {len(entry[name])} {name} scores, the model {width}"
    except (KeyError, TypeError, AttributeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


@torch.no_grad()
def relative_error(model, reference: list[torch.Tensor], batches) -> float:
    """||model(x) - reference||^2 / ||reference||^2 summed over calibration batches and their reference outputs."""
    num = den = 0.0
    for kwargs, b in zip(batches, reference, strict=True):
        a = model(**kwargs)[0].float()
        num += ((a - b) ** 2).sum().item()
        den += (b**2).sum().item()
    return num / den


def prune_model(bundle: ModelBundle, profile: dict, config: PruneConfig, calibration=None, progress: bool = False,
                in_place: bool = False) -> tuple[PrunedWanTransformer3DModel, WidthPlan, PruneReport]:  # fmt: skip
    """Plan from `profile`, slice `bundle.transformer`, correct the q/k norms on `calibration` (a
    `pare.profiling.calibration.Calibration`; None skips correction and error report). `in_place`: slice the
    bundle's own transformer, block by block (peak memory the model plus one block; the bundle's transformer
    is unusable afterwards): the model's outputs and norm statistics are taken before it is sliced."""
    config.validate()
    model = bundle.transformer
    check_profile_matches(profile, model)
    plan = plan_from_profile(profile, config.heads, config.ffn, config.allocation, config.heads_multiple_of,
                             config.temporal_multiplier, config.min_temporal_share)  # fmt: skip
    if calibration is None:
        pruned, report = prune(model, plan, in_place=in_place)
        return pruned, plan, report
    from tqdm.auto import tqdm

    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    batches = [calibration.inputs(rows, device, dtype) for rows in calibration.batches(8)]
    # passes over the calibration inputs: the model's outputs, its norm statistics, the errors of the plain
    # slice and of the corrected one
    bar = tqdm(total=4 if config.correct_norms else 2, desc="prune: passes over calibration inputs",
               disable=not progress)  # fmt: skip
    with torch.no_grad():
        reference = [model(**kwargs)[0].float() for kwargs in batches]
    bar.update()
    scales = None
    if config.correct_norms:
        scales = norm_scales(model, plan, batches)
        bar.update()
    heads = model.config.num_attention_heads
    pruned, report = prune(model, plan, in_place=in_place)
    report.error_without_correction = relative_error(pruned, reference, batches)
    bar.update()
    if scales is not None:
        apply_norm_scales(pruned, plan, scales, heads)
        report.error_with_correction = relative_error(pruned, reference, batches)
        bar.update()
    bar.close()
    return pruned, plan, report


def save_pruned(out: Path, pruned, bundle: ModelBundle, plan: WidthPlan, report: PruneReport, config: PruneConfig,
                profile_path: str) -> None:  # fmt: skip
    """Write the output folder: transformer/ (diffusers format), pare.json (plan, report, settings, base)."""
    with atomic_dir(out) as tmp:
        pruned.save_pretrained(tmp / "transformer")
        artifacts.write_manifest(tmp, kind="pruned", base=artifacts.base_spec(bundle.spec), settings=asdict(config),
                                 plan=plan.to_dict(), report=asdict(report), profile=str(profile_path))  # fmt: skip


def prune_to_folder(bundle: ModelBundle, profile: dict, profile_path: str, config: PruneConfig, out: Path,
                    prompts_file: Path | None = None, encoder=None, progress: bool = True, images_dir=None):  # fmt: skip
    """`pare prune`: calibration trajectories (when anything is removed), plan, slice, norm correction, the output
    folder. Returns (report, shape, FLOPs per forward before, after) at the profile's video shape."""
    from ..flops import count_flops
    from ..profiling.calibration import calibrate, default_prompts, first_frames
    from ..sampling import SamplerConfig

    shape = tuple(profile.get("shape") or bundle.default_shape)
    calibration = None
    if config.heads > 0 or config.ffn > 0:  # calibration inputs for the norm correction and the error report
        check_profile_matches(profile, bundle.transformer)  # fail before the slow calibration
        sampler = SamplerConfig(**{**bundle.sampler_defaults, "steps": profile["settings"]["steps"]})
        prompts = default_prompts(bundle, prompts_file, config.calibration_videos, seed=10_000, encoder=encoder)
        calibration = calibrate(bundle, prompts, sampler, profile["settings"]["timesteps"], shape, encoder,
                                progress=progress, images=first_frames(bundle, prompts, images_dir, seed=10_000))  # fmt: skip
    grid = arch.token_grid(bundle.transformer.config, bundle.latent, *shape)
    image_tokens = bundle.image_tokens(*shape[1:])
    before = count_flops(bundle.transformer, grid, bundle.text_tokens, image_tokens).total()
    # in place: the command needs the full model no more once it is sliced (peak: the model plus one block, on a
    # GPU; on the host, weights memory-mapped from safetensors stay resident until the file's last tensor goes)
    pruned, plan, report = prune_model(bundle, profile, config, calibration, progress=progress, in_place=True)
    save_pruned(out, pruned, bundle, plan, report, config, profile_path)
    return report, shape, before, count_flops(pruned, grid, bundle.text_tokens, image_tokens).total()


