"""Head profiling: spatial/temporal roles of self-attention heads and role-aware importance of heads and FFN
channels. One config, one verb: `profile(bundle, ProfileConfig(...))`, then `write_profile(result, DIR)`."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace

import torch

from .. import arch
from ..errors import require
from ..io import tensor_digest
from ..loading import ModelBundle
from ..sampling import SamplerConfig
from .calibration import Calibration, calibrate
from .report import plot_profile, write_profile
from .importance import block_removal_error, removal_error, taylor_importance
from .roles import ROLES, SPATIAL_OWN, TEMPORAL_FOCUS, STATS, probe_self_attention, role_of, stack_records, uniform_stats

PROFILE_FORMAT, PROFILE_VERSION = "pare-heads", 1
REMOVAL_MODES = ("block", "model", "none")


@dataclass
class ProfileConfig:
    """Knobs of `pare profile`."""

    videos: int = 16  # calibration prompts, one trajectory each
    steps: int | None = None  # sampling steps of the calibration trajectories (None: the model's own, else 25)
    timesteps: tuple[int, ...] | None = None  # indices of the steps whose x_t is kept (None: `spread_steps`)
    queries: int = 64  # query tokens sampled per forward for the attention rows
    batch_size: int = 8
    removal: str = "block"  # each head's removal error: "block" (its block's output), "model" (one forward per head), "none"
    # role-aware score: temporal heads count this much more. 1, the best of the sweep 1 / 1.5 / 2 / 3 at 40% + 40%
    # on the embedded teacher (docs/results.md, claim 2): there the floor below is what protects temporal heads
    temporal_multiplier: float = 1.0
    min_temporal_share: float = 0.5  # role-aware plan: keep at least this share of each block's temporal heads
    seed: int = 0

    def validate(self) -> None:
        require(self.removal in REMOVAL_MODES, f"--removal must be one of {', '.join(REMOVAL_MODES)}, got {self.removal!r}")
        require(self.videos >= 1, f"--videos must be at least 1, got {self.videos}")
        require(self.queries >= 1, f"--queries must be at least 1, got {self.queries}")
        require(self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}")
        require(self.steps is None or self.steps >= 1, f"--steps must be at least 1, got {self.steps}")
        require(self.timesteps is None or len(self.timesteps) >= 1, "--timesteps needs at least one step index")
        require(self.temporal_multiplier >= 1, f"--temporal-multiplier must be >= 1, got {self.temporal_multiplier}")
        require(0 <= self.min_temporal_share <= 1, f"--min-temporal-share must be in [0, 1], got {self.min_temporal_share}")


    def resolved(self, sampler_defaults: dict, own_steps: list[int] | None = None) -> ProfileConfig:
        """The config with its defaults filled in for a model that samples with `sampler_defaults`: its own steps
        (a few-step model's K), and five kept steps spread over them; `own_steps`: the only steps a model runs (a
        group taken out of step experts), then kept by default, and the only ones that may be kept."""
        steps = self.steps or sampler_defaults.get("steps", 25)
        if own_steps is not None:
            require(self.timesteps is None or set(self.timesteps) <= set(own_steps),
                    f"--timesteps: this group of step experts runs steps {','.join(map(str, own_steps))} (0-based) "
                    f"only, got {','.join(map(str, self.timesteps or ()))}")  # fmt: skip
        return replace(self, steps=steps, timesteps=self.timesteps or tuple(own_steps or spread_steps(steps)))


def spread_steps(steps: int) -> tuple[int, ...]:
    """Five step indices spread over `steps` sampling steps, first and last included (0, 6, 12, 18, 24 for 25;
    every step of a model with 5 or fewer)."""
    return tuple(sorted({round(k * (steps - 1) / 4) for k in range(5)}))


def config_record(model) -> dict:
    """The model's config as JSON values (what a profile records as `model_config`)."""
    return json.loads(json.dumps(dict(model.config), default=str))


def public_config(config) -> dict:
    """A config without its private keys (_name_or_path, _diffusers_version): they say where and how a model was
    loaded, not what it is."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def fingerprint(model) -> str:
    """A short digest of the model's config and of every tensor (name, shape, dtype, its float64 sum, a
    position-weighted sum that changes when values move, and a strided sample of 64 values): a profile, a data
    set or a cache applies to these weights only. One read of the weights, one tensor at a time."""
    h = hashlib.sha256(repr(sorted(public_config(model.config).items())).encode())
    for name, t in model.state_dict().items():
        t = t.detach()
        flat = t.reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu()
        weighted = (flat.float() * torch.linspace(1, 2, flat.numel(), device=flat.device)).sum(dtype=torch.float64)
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|{flat.sum(dtype=torch.float64).item():.17g}|"
                 f"{weighted.item():.17g}|".encode())  # fmt: skip
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def role_aware_score(importance: torch.Tensor, roles: torch.Tensor, multiplier: float) -> torch.Tensor:
    """Importance normalised to mean 1, times `multiplier` for temporal heads."""
    base = importance / importance.mean().clamp_min(1e-30)
    return base * torch.where(roles == ROLES.index("temporal"), multiplier, 1.0)


def profile(bundle: ModelBundle, config: ProfileConfig, prompts: list[str], *, encoder=None, shape=None,
            sampler: SamplerConfig | None = None, progress: bool = True, images=None) -> dict:  # fmt: skip
    """Profile `bundle`'s transformer on trajectories of `prompts` (an I2V model's from `images`, else its own
    first frames); returns the content of heads.json."""
    from ..routing.experts import group_steps

    config.validate()
    config = config.resolved(bundle.sampler_defaults, group_steps(bundle))
    model = bundle.transformer
    sampler = sampler or SamplerConfig(**{**bundle.sampler_defaults, "steps": config.steps, "seed": config.seed})
    frames, height, width = shape or bundle.default_shape
    grid = arch.token_grid(model.config, bundle.latent, frames, height, width)
    calib = calibrate(bundle, prompts, sampler, config.timesteps, (frames, height, width), encoder,
                      config.batch_size, progress, images)  # fmt: skip
    first = {} if calib.image is None else {"first_frames": tensor_digest(calib.extra[:, :, :1])}  # an I2V model's
    return profile_calibration(bundle, calib, grid, config, progress=progress,
                               extra={"prompts": prompts, "sampler": vars(sampler), "shape": [frames, height, width],
                                      **first})  # fmt: skip


def profile_calibration(bundle: ModelBundle, calib: Calibration, grid, config: ProfileConfig, progress: bool = True,
                        extra: dict | None = None) -> dict:  # fmt: skip
    """Profile on given calibration inputs (`profile` builds them from prompts, and an I2V model's first frames)."""
    model = bundle.transformer
    heads = {arch.num_heads(arch.self_attention(b)) for b in arch.blocks(model)}
    # a model made from another is profiled only when it is still whole (a step-distilled one): not pruned or routed
    size = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    require(len(heads) == 1 and (bundle.reference is None or size(model) == size(bundle.reference)),
            f"{bundle.spec} is a {bundle.kind} model: profile the full model it was made from")  # fmt: skip
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    gen = torch.Generator().manual_seed(config.seed)
    with torch.no_grad(), probe_self_attention(model, grid, config.queries, gen) as records:
        for rows in calib.batches(config.batch_size):
            model(**calib.inputs(rows, device, dtype))
    stats = stack_records(records)  # {stat: (N, blocks, H)}
    mean = {k: v.mean(0) for k, v in stats.items()}  # (blocks, H)
    roles = role_of(mean["own"], mean["samepos"], grid)
    stability = {
        "timesteps": _stability(stats, calib.step, roles, grid),
        "prompts": _stability(stats, calib.prompt, roles, grid),
    }
    taylor = taylor_importance(model, calib, config.batch_size, progress)
    measure = {"block": block_removal_error, "model": removal_error}.get(config.removal)
    removal = measure(model, calib, config.batch_size, progress) if measure else None
    base = removal if removal is not None else taylor["self"]
    score = role_aware_score(base, roles, config.temporal_multiplier)
    uni = uniform_stats(grid)

    blocks = []
    for b in range(roles.shape[0]):
        heads = []
        for h in range(roles.shape[1]):
            s = {k: round(float(mean[k][b, h]), 6) for k in STATS}
            s.update({f"{k}_vs_uniform": round(float(mean[k][b, h]) / uni[k], 4) for k in uni})
            heads.append({
                "head": h, "role": ROLES[roles[b, h]], "stats": s,
                "stability": {k: round(float(v[b, h]), 4) for k, v in stability.items()},
                "taylor": float(taylor["self"][b, h]),
                "removal_error": None if removal is None else float(removal[b, h]),
                "score": float(score[b, h]),
            })  # fmt: skip
        blocks.append({"heads": heads, "cross_taylor": taylor["cross"][b].tolist(), "ffn_taylor": taylor["ffn"][b].tolist()})
    counts = {r: int((roles == i).sum()) for i, r in enumerate(ROLES)}
    return {
        "format": PROFILE_FORMAT, "format_version": PROFILE_VERSION, "model": bundle.spec,
        "model_config": config_record(model), "fingerprint": fingerprint(model),
        "settings": asdict(config), "calibration": {"inputs": len(calib), **(extra or {})},
        "shape": (extra or {}).get("shape"),
        "rule": {"role": "spatial if own >= spatial_own; temporal if own < spatial_own and samepos >= "
                 "temporal_focus x uniform samepos; mixed otherwise", "spatial_own": SPATIAL_OWN,
                 "temporal_focus": TEMPORAL_FOCUS, "uniform": uni,
                 "score": "removal_error" if removal is not None else "taylor", "removal": config.removal},
        "role_counts": counts, "blocks": blocks,
    }  # fmt: skip


def _stability(stats: dict, group: torch.Tensor, overall: torch.Tensor, grid) -> torch.Tensor:
    """(blocks, H) share of the groups (timesteps or prompts) whose own role equals the overall role."""
    keys = group.unique()
    agree = torch.zeros_like(overall, dtype=torch.float32)
    for g in keys:
        sel = group == g
        agree += (role_of(stats["own"][sel].mean(0), stats["samepos"][sel].mean(0), grid) == overall).float()
    return agree / len(keys)


def load_profile(path) -> dict:
    """Read heads.json, refusing other files with a clear message."""
    from pathlib import Path

    from ..errors import PareError

    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PareError(f"cannot read the profile {path}: {exc}") from None
    require(isinstance(data, dict) and data.get("format") == PROFILE_FORMAT,
            f"{path} is not a PARE head profile (heads.json written by `pare profile`)")  # fmt: skip
    require(data.get("format_version", 0) <= PROFILE_VERSION, f"{path} was written by a newer PARE: upgrade pare")
    return data
