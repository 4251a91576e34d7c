"""`pare fuse-lora`: a LoRA (a step-distillation LoRA such as LightX2V's or CausVid's, in diffusers' or the
original Wan format) loaded into a model's transformer with diffusers' LoRA loading, fused into its weights and
saved as a PARE folder that every stage takes. With `steps`, the folder samples as the LoRA was trained to: that
many Euler steps on the flow-shifted schedule, at the given guidance (1: none)."""

from __future__ import annotations

import math
from pathlib import Path

from . import artifacts
from .errors import PareError, require, require_extras
from .io import atomic_dir


def few_step_sampler(steps: int, guidance: float, flow_shift: float) -> dict:
    """A few-step model's sampler as PARE records it: Euler on `few_step_levels` (the schedule the LightX2V and
    CausVid LoRAs are sampled with: 1000, 750, 500, 250 at shift 5 for 4 steps)."""
    from .sampling import few_step_levels, schedule_sampler

    return schedule_sampler(few_step_levels(steps, flow_shift), guidance)


def fuse_lora(bundle, lora: Path, scale: float = 1.0) -> int:
    """Load the LoRA file `lora` into `bundle.transformer` (diffusers' Wan LoRA loader converts the original Wan
    and other known formats), fuse it at `scale` and remove the adapter layers: the transformer keeps plain
    weights W + scale x (alpha / rank) B A. Returns the number of layers the LoRA changed."""
    require_extras("pare fuse-lora", "peft", hint="pip install 'pare[lora]' (diffusers' LoRA loading runs on peft)")
    from diffusers import WanPipeline
    from diffusers.utils import logging as dlogging

    require(Path(lora).is_file(), f"--lora {lora}: expected a LoRA .safetensors file")
    require(math.isfinite(scale), f"--scale must be a finite number, got {scale}")
    model = bundle.transformer
    quiet = dlogging.get_verbosity()
    dlogging.set_verbosity(dlogging.CRITICAL)  # diffusers logs what it cannot place; the refusal below says it once
    try:
        try:
            state = WanPipeline.lora_state_dict(str(lora))
        except (OSError, ValueError) as e:  # not a safetensors file, or one diffusers cannot parse
            raise PareError(f"--lora {lora}: cannot read it as LoRA weights ({_last_line(e)})") from None
        require(isinstance(state, dict) and state, f"--lora {lora} holds no LoRA weights diffusers can read")
        try:
            model.load_lora_adapter(state, prefix="transformer", adapter_name="pare")
        except (ValueError, RuntimeError) as e:  # peft's refusal: a layer it names is not here, or not of its shape
            raise PareError(f"--lora {lora} does not fit {bundle.spec}'s transformer: {_last_line(e)}") from None
    finally:
        dlogging.set_verbosity(quiet)
    layers = sum(1 for m in model.modules() if hasattr(m, "lora_A") and "pare" in getattr(m, "lora_A", {}))
    require(layers > 0, f"--lora {lora}: none of its layers matches {bundle.spec}'s transformer")
    model.fuse_lora(lora_scale=scale)
    model.unload_lora()
    return layers


def _last_line(error: Exception) -> str:
    """The informative line of a library's many-line error: peft puts the cause last."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def save_fused(bundle, out: Path, settings: dict, sampler: dict | None) -> None:
    """The fused transformer as a PARE folder made from `bundle` (text encoder, VAE and latent space inherited)."""
    extra = {"sampler": sampler} if sampler else {}
    with atomic_dir(out) as tmp:
        bundle.transformer.save_pretrained(tmp / "transformer")
        artifacts.write_manifest(tmp, kind="lora-fused", base=artifacts.base_spec(bundle.spec), settings=settings, **extra)
