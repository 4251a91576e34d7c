"""Latency of one denoising forward at a given video shape, with random weights (latency does not depend on
them). Meant for a GPU; on a CPU it runs tiny shapes only and says so."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from . import arch
from .errors import PareError, require
from .flops import count_flops
from .loading import dtype_named, load_bundle

# A CPU forward at real Wan shapes takes minutes to hours; beyond this many tokens the CPU path refuses.
CPU_MAX_TOKENS = 4096


@dataclass
class LatencyConfig:
    """Knobs of the latency benchmark."""

    frames: int
    height: int
    width: int
    dtype: str | None = None  # bf16 | fp16 | fp32; default bf16 on a GPU, fp32 on a CPU
    warmup: int = 2
    iters: int = 5
    device: str | None = None  # default: cuda when available, else cpu
    seed: int = 0


@dataclass
class LatencyResult:
    model: str
    device: str
    dtype: str
    tokens: int
    seconds_per_step: float  # median over iters
    seconds_all: list[float]
    tflop_per_step: float
    achieved_tflops: float
    note: str




def random_model(meta_model: nn.Module, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A model with `meta_model`'s structure and random weights, built directly on `device` in `dtype`, with the
    modules diffusers keeps in fp32 (norms, timestep embedder, RoPE tables) in fp32 as `from_pretrained` does."""
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype if dtype.is_floating_point else torch.float32)
    try:
        with torch.device(device):
            model = type(meta_model).from_config(meta_model.config)
    finally:
        torch.set_default_dtype(previous)
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    for name, module in model.named_modules():
        if keep & set(name.split(".")):
            module.float()
    for name, param in model.named_parameters():  # e.g. the blocks' scale_shift_table parameters
        if keep & set(name.split(".")):
            param.data = param.data.float()
    return model.eval()


def _inputs(model: nn.Module, bundle, cfg: LatencyConfig, device, dtype) -> dict:
    lat_f, lat_h, lat_w = bundle.latent.latent_shape(cfg.frames, cfg.height, cfg.width)
    g = torch.Generator(device="cpu").manual_seed(cfg.seed)
    inputs = {
        "hidden_states": torch.randn(1, model.config.in_channels, lat_f, lat_h, lat_w, generator=g),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, bundle.text_tokens, model.config.text_dim, generator=g),
    }
    if arch.is_image_to_video(model):
        tokens = bundle.image_tokens(cfg.height, cfg.width)
        inputs["encoder_hidden_states_image"] = torch.randn(1, tokens, model.config.image_dim, generator=g)
    return {k: v.to(device, dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}


@torch.no_grad()
def bench_latency(spec: str, cfg: LatencyConfig) -> LatencyResult:
    """Time one forward (batch 1, one CFG branch) of the model named by `spec` with random weights."""
    require(cfg.iters >= 1 and cfg.warmup >= 0, "--iters must be >= 1 and --warmup >= 0")
    try:
        device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise PareError(f"--device must be cpu, cuda or cuda:N, got {cfg.device!r}") from None
    dtype_name = cfg.dtype or ("fp32" if device.type == "cpu" else "bf16")
    dtype = dtype_named(dtype_name)
    require(device.type != "cuda" or torch.cuda.is_available(), "--device cuda asked for, but no CUDA device is visible")
    bundle = load_bundle(spec, weights=False)
    grid = arch.token_grid(bundle.transformer.config, bundle.latent, cfg.frames, cfg.height, cfg.width)
    note = ""
    if device.type == "cpu":
        require(
            grid.tokens <= CPU_MAX_TOKENS,
            f"on a CPU bench-latency runs tiny shapes only (at most {CPU_MAX_TOKENS} tokens); this shape has "
            f"{grid.tokens}: run it on a GPU, or pass smaller --frames/--height/--width",
        )
        note = "CPU run on a tiny shape: wall-clock timing, not representative of GPU latency"
    model = random_model(bundle.transformer, device, dtype, cfg.seed)
    inputs = _inputs(model, bundle, cfg, device, dtype)
    flops = count_flops(model, grid, bundle.text_tokens, bundle.image_tokens(cfg.height, cfg.width)).total()

    times = []
    for i in range(cfg.warmup + cfg.iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(**inputs, return_dict=False)
            end.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(end) / 1000
        else:
            t0 = time.perf_counter()
            model(**inputs, return_dict=False)
            elapsed = time.perf_counter() - t0
        if i >= cfg.warmup:
            times.append(elapsed)
    median = statistics.median(times)
    return LatencyResult(spec, str(device), dtype_name, grid.tokens, median, times, flops / 1e12,
                         flops / 1e12 / median, note)  # fmt: skip


def result_dict(result: LatencyResult) -> dict:
    return asdict(result)
