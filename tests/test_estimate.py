"""Memory and time estimates (`pare.estimate`): every stage's estimate against the peak it really reaches on the
CPU (fp32, one process), measured as the growth of the resident memory around the real stage function; the CLI's
--memory-estimate; the Wan2.1-14B plan of scripts/wan14b_estimates.py."""

from __future__ import annotations

import ctypes
import gc
import importlib.util
import json
import re
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

from pare import arch
from pare.arch import PIXEL_SPACE
from pare.cli import main
from pare.components import EmbeddingsFile, save_embeddings
from pare.estimate import (FP32, GIB, estimate_data, estimate_distill, estimate_profile, estimate_prune,
                           estimate_route, param_count, pruned_structure)  # fmt: skip
from pare.loading import ModelBundle

TOLERANCE = 0.25  # the estimate is within 25% of the measured peak
TEXT_TOKENS, TEXT_DIM = 16, 32
PROC = Path("/proc/self")
measured = pytest.mark.skipif(not (PROC / "clear_refs").exists(), reason="measures resident memory through Linux /proc")


def wan(width: int, ffn: int, layers: int, channels: int = 3, seed: int = 0) -> WanTransformer3DModel:
    """A Wan transformer with heads of 64 channels: wide enough for its tensors to dominate what the interpreter
    allocates, small enough for a 2-core CPU."""
    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=width // 64, attention_head_dim=64,
                                 in_channels=channels, out_channels=channels, text_dim=TEXT_DIM, freq_dim=32,
                                 ffn_dim=ffn, num_layers=layers, rope_max_seq_len=64).eval()  # fmt: skip


def grid_of(model, shape) -> arch.TokenGrid:
    return arch.token_grid(model.config, PIXEL_SPACE, *shape)


def _status(key: str) -> int:
    for line in (PROC / "status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _malloc_follows_tensors():
    """glibc serves every allocation of 64 KiB or more from mmap and gives it back on free (a fixed threshold,
    not the one it raises as it goes), so the resident size follows the live tensors."""
    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 16)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 16)
    return libc


if (PROC / "clear_refs").exists():
    _malloc_follows_tensors()  # from the start, so that earlier tests leave no heap behind


@contextmanager
def resident_peak():
    """Yields a dict whose "bytes" is, after the block, the most resident memory it added (the kernel's
    high-water mark, reset at the start)."""
    libc = _malloc_follows_tensors()
    gc.collect()
    libc.malloc_trim(0)
    (PROC / "clear_refs").write_text("5")  # VmHWM := VmRSS
    start = _status("VmRSS")
    box: dict = {"start": start}
    try:
        yield box
    finally:
        box["bytes"] = _status("VmHWM") - start


def check(measured_bytes: int, estimated: int, parts: dict[str, int], must_matter: tuple[str, ...]) -> None:
    """The estimate is within TOLERANCE of the measured peak, and the test can fail: leaving out any component
    named in `must_matter` would put it outside."""
    detail = f"measured {measured_bytes / 2**20:.1f} MiB, estimated {estimated / 2**20:.1f} MiB: " + ", ".join(
        f"{k} {v / 2**20:.1f}" for k, v in parts.items())  # fmt: skip
    print(detail)
    assert abs(estimated - measured_bytes) <= TOLERANCE * measured_bytes, detail
    for name in must_matter:
        assert abs(estimated - parts[name] - measured_bytes) > TOLERANCE * measured_bytes, f"{name} is too small to test: {detail}"


def embeddings(folder: Path, n: int) -> EmbeddingsFile:
    g = torch.Generator().manual_seed(0)
    prompts = [f"prompt {i}" for i in range(n)]
    save_embeddings(folder / "embeds.safetensors", prompts, torch.randn(n, TEXT_TOKENS, TEXT_DIM, generator=g),
                    torch.randn(TEXT_TOKENS, TEXT_DIM, generator=g))  # fmt: skip
    return EmbeddingsFile(folder / "embeds.safetensors")


def bundle_of(model, shape) -> ModelBundle:
    return ModelBundle(model, "estimate-test", "transformer-folder", PIXEL_SPACE, TEXT_TOKENS, default_shape=shape)


# --- profile, prune, data: the sampling stages ------------------------------------------------------------------


@measured
def test_profile_estimate_matches_measured_peak(tmp_path):
    """The peak of `pare profile` is its Taylor pass (a backward through gated heads and channels), measured here
    on the pass itself without gradient checkpointing: every block's saved tensors, gates' copies included. (The
    checkpointed backward is measured with distillation's.)"""
    from pare.profiling import ProfileConfig
    from pare.profiling.calibration import calibrate
    from pare.profiling.importance import taylor_importance
    from pare.sampling import SamplerConfig

    encoder = embeddings(tmp_path, 2)
    model = wan(384, 768, 3)
    shape = (4, 32, 64)  # 4 x 16 x 32 = 2,048 tokens
    config = ProfileConfig(videos=1, steps=2, timesteps=(0, 1), queries=16, batch_size=2, removal="none")
    sampler = SamplerConfig(steps=config.steps)
    calib = calibrate(bundle_of(model, shape), encoder.prompts[:1], sampler, config.timesteps, shape, encoder)
    small = calibrate(bundle_of(model, (1, 8, 8)), encoder.prompts[:1], sampler, config.timesteps, (1, 8, 8), encoder)
    taylor_importance(model, small, config.batch_size, checkpointing=False)  # warm-up: what the first call sets up
    with resident_peak() as peak:
        taylor_importance(model, calib, config.batch_size, checkpointing=False)
    est = estimate_profile(model, grid_of(model, shape), TEXT_TOKENS, config, weight_bytes=FP32,
                           gradient_checkpointing=False)  # fmt: skip
    assert est.peak.name == "Taylor importance"
    parts = {k: v for k, v in est.peak.parts.items() if k != "weights"}  # the weights were resident before
    check(peak["bytes"], sum(parts.values()), parts, ("saved in the blocks",))


def _synthetic_profile(model, shape) -> dict:
    """A heads.json for `model` whose scores rank heads and channels by index (prune needs no real profile)."""
    from pare.profiling import PROFILE_FORMAT, PROFILE_VERSION, fingerprint

    H, F = model.config.num_attention_heads, model.config.ffn_dim
    blocks = [{"heads": [{"head": h, "role": "spatial", "taylor": float(h + 1)} for h in range(H)],
               "cross_taylor": [float(h + 1) for h in range(H)], "ffn_taylor": [float(f + 1) for f in range(F)]}
              for _ in arch.blocks(model)]  # fmt: skip
    return {"format": PROFILE_FORMAT, "format_version": PROFILE_VERSION, "model": "estimate-test",
            "fingerprint": fingerprint(model), "shape": list(shape), "rule": {"score": "taylor"}, "blocks": blocks,
            "settings": {"temporal_multiplier": 2.0, "min_temporal_share": 0.5, "steps": 1, "timesteps": [0]}}  # fmt: skip


@measured
def test_prune_estimate_matches_measured_peak(tmp_path):
    """Sliced in place: over the teacher already resident, the peak of what follows the calibration is the
    largest of the fingerprint's hashing of one tensor, the forward with the norm statistics, one block's
    slices (at this size the fingerprint: the time projection is 6 x 768 x 768)."""
    from pare.profiling.calibration import calibrate
    from pare.pruning import PruneConfig, prune_model
    from pare.sampling import SamplerConfig

    encoder = embeddings(tmp_path, 2)
    config = PruneConfig(heads=0.5, ffn=0.5, allocation="uniform", calibration_videos=2)
    tiny, tiny_shape = wan(128, 256, 2), (1, 8, 8)  # warm-up: what the first call sets up
    prune_model(bundle_of(tiny, tiny_shape), _synthetic_profile(tiny, tiny_shape), config,
                calibrate(bundle_of(tiny, tiny_shape), encoder.prompts, SamplerConfig(steps=1), [0], tiny_shape, encoder))  # fmt: skip
    model = wan(768, 1536, 2)
    shape = (1, 16, 16)  # 64 tokens: the weights dominate, as at real sizes
    bundle = bundle_of(model, shape)
    profile = _synthetic_profile(model, shape)
    calib = calibrate(bundle, encoder.prompts, SamplerConfig(steps=1), [0], shape, encoder)  # 2 inputs
    student = pruned_structure(model, 0.5, 0.5)
    est = estimate_prune(model, student, grid_of(model, shape), TEXT_TOKENS, config, sampling_steps=1, kept_steps=1,
                         weight_bytes=FP32, guidance=5.0)  # fmt: skip
    with resident_peak() as peak:
        pruned, _, _ = prune_model(bundle, profile, config, calib, in_place=True)
    assert param_count(student) == param_count(pruned)
    after = max(est.phases[1:], key=lambda p: p.total)  # the calibration trajectories were made before
    assert after.name == "fingerprint"
    parts = {k: v for k, v in after.parts.items() if k != "teacher weights"}
    check(peak["bytes"], sum(parts.values()), parts, ("hashing the largest tensor",))


@measured
def test_pruning_in_place_holds_the_model_and_one_block():
    """`pare prune`'s slicing over the loaded model: its peak is one block's slices (the estimate's "one block's
    slices"), far under the 0.3 x the model that the 1.3 x bound leaves; what is removed is given back."""
    from pare.pruning.plan import WidthPlan
    from pare.pruning.prune import prune

    model = wan(768, 1536, 4)
    H, n = model.config.num_attention_heads, len(model.blocks)
    plan = WidthPlan([list(range(H // 2))] * n, [list(range(H // 2))] * n, [list(range(768))] * n)
    size = param_count(model) * FP32
    with resident_peak() as peak:
        pruned, report = prune(model, plan, in_place=True)
        left = _status("VmRSS")
    block = max(param_count(b) for b in arch.blocks(pruned)) * FP32
    check(peak["bytes"], block, {"one block's slices": block}, ())
    assert peak["bytes"] < 0.3 * size
    removed = (report.params_before - report.params_after) * FP32
    assert abs(left - peak["start"] + removed) < 0.1 * removed  # the resident size fell by what was removed


@measured
def test_data_estimate_matches_measured_peak(tmp_path):
    """One shard of trajectories: the forward of the shard's videos and every step kept until it is packed."""
    from pare.distill.data import DataConfig, write_data
    from pare.sampling import SamplerConfig

    encoder = embeddings(tmp_path, 2)
    model = wan(256, 512, 2, channels=48)  # wide latents: the trajectory is a good part of the peak
    shape = (4, 32, 32)  # 1,024 tokens
    config = DataConfig(videos=2, shard_videos=2, store="fp16")
    sampler = SamplerConfig(steps=8, guidance_scale=5.0)
    write_data(tmp_path / "warm", bundle_of(model, (1, 8, 8)), encoder.prompts, SamplerConfig(steps=2), (1, 8, 8),
               config, encoder, progress=False)  # fmt: skip
    with resident_peak() as peak:
        write_data(tmp_path / "data", bundle_of(model, shape), encoder.prompts, sampler, shape, config, encoder,
                   progress=False)  # fmt: skip
    est = estimate_data(model, grid_of(model, shape), TEXT_TOKENS, config, sampling_steps=sampler.steps,
                        weight_bytes=FP32, on_cpu=True)  # fmt: skip
    parts = {k: v for k, v in est.peak.parts.items() if k != "weights"}
    check(peak["bytes"], sum(parts.values()), parts, ("trajectory so far", "activations")
          if est.peak.name == "sampling a shard" else ("trajectory", "concatenated x_t and velocities"))  # fmt: skip


# --- distill, route: the training stages -----------------------------------------------------------------------


def trajectory_folder(folder: Path, model, shape, shards: int = 2, videos: int = 2, steps: int = 2) -> Path:
    """A `pare data` folder of random trajectories, in the layout `write_data` writes."""
    from pare.distill.data import DATA_FORMAT, DATA_VERSION

    g = torch.Generator().manual_seed(0)
    latent = (model.config.out_channels, *PIXEL_SPACE.latent_shape(*shape))
    folder.mkdir(parents=True)
    entries = []
    for k in range(shards):
        n = videos * steps
        tensors = {name: torch.randn(n, *latent, generator=g).half() for name in ("x_t", "v_cond", "v_uncond")}
        tensors.update(timestep=torch.linspace(999, 1, steps).repeat_interleave(videos),
                       sigma=torch.linspace(1, 0.01, steps).repeat_interleave(videos),
                       prompt=torch.arange(videos).repeat(steps), video=torch.arange(videos).repeat(steps),
                       step=torch.arange(steps).repeat_interleave(videos),
                       text=torch.randn(videos, TEXT_TOKENS, TEXT_DIM, generator=g),
                       null_text=torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=g))  # fmt: skip
        save_file(tensors, str(folder / f"shard-{k:05d}.safetensors"))
        entries.append({"file": f"shard-{k:05d}.safetensors", "examples": n})
    (folder / "index.json").write_text(json.dumps({
        "format": DATA_FORMAT, "format_version": DATA_VERSION, "teacher": "estimate-test", "fingerprint": "-",
        "sampler": {"steps": steps, "guidance_scale": 5.0}, "shape": list(shape), "config": {}, "shards": entries}))  # fmt: skip
    return folder


def _training_inputs(tmp_path, width=512, ffn=1024, layers=2, shape=(2, 32, 32)):
    """A student folder and random trajectories at `shape` (2 x 16 x 16 = 512 tokens)."""
    model = wan(width, ffn, layers)
    model.save_pretrained(tmp_path / "student")
    data = trajectory_folder(tmp_path / "data", model, shape)
    return model, tmp_path / "student", data, grid_of(model, shape)


@pytest.fixture(scope="module")
def warm_training(tmp_path_factory):
    """One tiny distillation and routing run first: accelerate's first start imports and sets up a lot."""
    from pare.distill import DistillConfig, distill
    from pare.routing import RouteConfig, route

    d = tmp_path_factory.mktemp("warm")
    model, student, data, _ = _training_inputs(d, 64, 64, 2, (1, 8, 8))
    distill(str(student), student, data, d / "distill", DistillConfig(steps=1, batch_size=1, bf16=False,
                                                                      val_examples=1), progress=False)  # fmt: skip
    route(str(student), student, data, d / "route", RouteConfig(steps=1, batch_size=1, bf16=False, val_examples=1),
          progress=False)  # fmt: skip


@measured
@pytest.mark.parametrize("checkpointing", [False, True])
def test_distill_estimate_matches_measured_peak(tmp_path, warm_training, checkpointing):
    """Without checkpointing the activations dominate; with it, the AdamW moments are a good part too."""
    from pare.distill import DistillConfig, distill

    model, student, data, grid = _training_inputs(tmp_path)
    # two steps: the AdamW moments exist from the first step's end, so the second step's backward is the peak
    config = DistillConfig(steps=2, batch_size=2, warmup_steps=1, gradient_checkpointing=checkpointing, bf16=False,
                           val_examples=1)  # fmt: skip
    with resident_peak() as peak:
        distill(str(student), student, data, tmp_path / "run", config, progress=False)
    est = estimate_distill(model, model, grid, TEXT_TOKENS, config, processes=1)
    assert est.peak.name == "backward"
    parts = est.peak.parts
    check(peak["bytes"], est.total, parts, ("recomputed block", "AdamW moments") if checkpointing
          else ("saved in the blocks",))  # fmt: skip


@measured
@pytest.mark.parametrize("checkpointing", [False, True])
def test_route_estimate_matches_measured_peak(tmp_path, warm_training, checkpointing):
    """With checkpointing the gated residuals are recomputed with their blocks and drop out of the estimate."""
    from pare.routing import RouteConfig, route

    model, student, data, grid = _training_inputs(tmp_path)
    config = RouteConfig(steps=2, batch_size=2, bf16=False, val_examples=1, importance_examples=1,
                         gradient_checkpointing=checkpointing)  # fmt: skip
    with resident_peak() as peak:
        route(str(student), student, data, tmp_path / "run", config, progress=False)
    est = estimate_route(model, grid, TEXT_TOKENS, config, processes=1, train_examples=4)
    assert est.peak.name == "backward" and ("routed residuals" in est.peak.parts) == (not checkpointing)
    check(peak["bytes"], est.total, est.peak.parts, ("recomputed block", "AdamW moments") if checkpointing
          else ("saved in the blocks",))  # fmt: skip


def test_the_route_estimate_has_the_router_warm_start():
    """The warm start's phase: the router's inputs of every measured example (3 x branches x examples x width,
    fp32) and the model without its routed blocks; none for a static router or without a warm start."""
    from pare.routing import RouteConfig

    model = wan(256, 512, 4)
    grid = grid_of(model, (4, 32, 32))
    config = RouteConfig(batch_size=4, importance_examples=100, always_run=1)
    phases = {p.name: p for p in estimate_route(model, grid, TEXT_TOKENS, config, train_examples=1000).phases}
    warm = phases["router warm start"].parts
    assert warm["router inputs of the measured examples"] == 3 * 2 * 100 * 256 * FP32
    routed = sum(param_count(b) for b in model.blocks[1:])
    assert warm["the model but its routed blocks (fp32)"] == (param_count(model) - routed) * FP32
    assert list(phases)[:2] == ["block importance", "router warm start"]
    for other in (RouteConfig(router="static"), RouteConfig(warm_start_steps=0)):
        names = [p.name for p in estimate_route(model, grid, TEXT_TOKENS, other, train_examples=10).phases]
        assert "router warm start" not in names


@measured
def test_block_importance_estimate_matches_measured_peak(tmp_path, warm_training):
    """Route's first phase: one hidden state (the skipped block's input) is held next to a forward of the batch."""
    from pare.routing import RouteConfig, block_importance
    from pare.training import split_data

    model, student, data, grid = _training_inputs(tmp_path, 256, 512, 4, (4, 32, 32))  # 1,024 tokens
    train, _ = split_data(data)
    config = RouteConfig(batch_size=4, bf16=False)  # 8 sequences
    with resident_peak() as peak:
        block_importance(model, train, torch.device("cpu"), config.batch_size, progress=False)
    est = estimate_route(model, grid, TEXT_TOKENS, config, processes=1, train_examples=len(train))
    phase = next(p for p in est.phases if p.name == "block importance")
    parts = {k: v for k, v in phase.parts.items() if not k.startswith("student weights")}
    check(peak["bytes"], sum(parts.values()), parts, ("activations",))


# --- time ----------------------------------------------------------------------------------------------------


def test_time_counts_forwards_from_the_flop_count():
    """Data is videos x steps x 2 (CFG) forwards; a training step 3 forwards' worth (4 with checkpointing)."""
    from pare.distill import DistillConfig
    from pare.distill.data import DataConfig
    from pare.flops import count_flops

    model = wan(128, 256, 2)
    shape = (2, 16, 16)
    grid = grid_of(model, shape)
    fwd = count_flops(model, grid, TEXT_TOKENS).total()
    est = estimate_data(model, grid, TEXT_TOKENS, DataConfig(videos=6), sampling_steps=10, weight_bytes=FP32)
    assert est.flops == 6 * 10 * 2 * fwd
    assert est.hours(1e-3) == pytest.approx(est.flops / 1e9 / 3600)
    # --student-steps 4: the same forwards, and 4 of the 10 steps' tensors held while a shard is packed
    slim = estimate_data(model, grid, TEXT_TOKENS, DataConfig(videos=6, student_steps=4), sampling_steps=10,
                         weight_bytes=FP32)  # fmt: skip
    packing = lambda e: next(ph.parts for ph in e.phases if ph.name == "packing a shard")  # noqa: E731
    assert slim.flops == est.flops and packing(slim)["trajectory"] * 10 == packing(est)["trajectory"] * 4
    plain, ckpt = (estimate_distill(model, model, grid, TEXT_TOKENS, DistillConfig(steps=5, batch_size=4, val_examples=0,
                                                                                   gradient_checkpointing=c))
                   for c in (False, True))  # fmt: skip
    assert plain.flops == 5 * 4 * 2 * 3 * fwd and ckpt.flops == 5 * 4 * 2 * 4 * fwd
    # a guidance-free (few-step) teacher's data: one sequence per example instead of the cond + uncond pair, so half
    # the forwards and half the activations saved for the backward
    one = estimate_distill(model, model, grid, TEXT_TOKENS, DistillConfig(steps=5, batch_size=4, val_examples=0),
                           branches=1)  # fmt: skip
    assert one.flops == 5 * 4 * 1 * 3 * fwd
    saved = lambda e: e.peak.parts["saved in the blocks"]
    assert saved(one) * 2 == saved(plain) and one.peak.parts["AdamW moments"] == plain.peak.parts["AdamW moments"]
    from pare.routing import RouteConfig

    r1, r2 = (estimate_route(model, grid, TEXT_TOKENS, RouteConfig(steps=5, batch_size=4, val_examples=0),
                             train_examples=8, branches=b) for b in (1, 2))  # fmt: skip
    assert r1.flops * 2 == r2.flops


def test_image_to_video_estimates_count_the_models_own_image_tokens():
    """An I2V model's forward counts its image encoder's tokens: 64 for the embedded teacher's 32x32 frames
    (2x2 patches of its 16x16 latent), Wan2.1's 257 CLIP tokens for a pipeline without an encoder; the data
    estimate's FLOPs are those forwards'."""
    from pare.cli import _estimate_inputs
    from pare.distill.data import DataConfig
    from pare.flops import count_flops

    bundle, grid, tokens = _estimate_inputs("builtin:shapes-i2v", (None, None, None))
    assert tokens == 64 and _estimate_inputs("builtin:shapes-t2v", (None, None, None))[2] == 0
    assert _estimate_inputs("wan2.1-i2v-14b", (81, 480, 832))[2] == 257
    model, text = bundle.transformer, bundle.text_tokens
    est = estimate_data(model, grid, text, DataConfig(videos=3), sampling_steps=4, image_tokens=tokens)
    own, wan = count_flops(model, grid, text, 64).total(), count_flops(model, grid, text, 257).total()
    assert est.flops == 3 * 4 * 2 * own and own < wan


# --- the CLI ------------------------------------------------------------------------------------------------


def _gib(out: str, row: str) -> float:
    return float(re.search(rf"^  {re.escape(row)}\s+([0-9.]+)$", out, re.M).group(1))


def test_cli_memory_estimates_print_a_table_without_weights(capsys):
    video = ["--frames", "81", "--height", "480", "--width", "832"]
    assert main(["profile", "--model", "wan2.1-t2v-14b", *video, "--batch-size", "1", "--device", "cuda",
                 "--memory-estimate"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "pare profile: estimated peak per GPU" in out and _gib(out, "weights") == pytest.approx(26.6, abs=0.1)
    assert _gib(out, "text encoder") == pytest.approx(10.6, abs=0.1)  # UMT5-XXL in bf16
    assert main(["data", "--teacher", "wan2.1-t2v-14b", "--shard-videos", "1", "--device", "cuda", "--memory-estimate",
                 "--tflops", "200"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "at 200 TFLOP/s" in out and _gib(out, "total") < 80
    args = ["--teacher", "wan2.1-t2v-14b", "--student", "wan2.1-t2v-14b", "--memory-estimate", "--batch-size", "8"]
    assert main(["distill", *args, "--gpus", "8", "--gradient-checkpointing"]) == 0
    eight = capsys.readouterr().out
    assert main(["distill", *args, "--gpus", "4", "--gradient-checkpointing"]) == 0
    four = capsys.readouterr().out
    # FSDP shards the state: four GPUs hold twice eight's master weights
    assert _gib(four, "master weights (fp32)") == pytest.approx(2 * _gib(eight, "master weights (fp32)"), rel=0.01)
    assert main(["route", *args, "--gpus", "8"]) == 0
    assert "pare route" in capsys.readouterr().out
    assert main(["prune", "--model", "wan2.1-t2v-14b", "--heads-multiple-of", "8", "--device", "cuda",
                 "--memory-estimate"]) == 0  # fmt: skip
    out = capsys.readouterr().out  # sliced in place: the teacher alone, at the calibration forward's peak
    assert "in the phase: outputs and norm statistics" in out and "pruned weights" not in out
    for bad, message in [(["distill", *args, "--gpus", "0"], "--gpus must be at least 1"),
                         (["distill", *args, "--gpus", "3"], "must be divisible by the 3 processes"),
                         (["data", "--teacher", "wan2.1-t2v-14b", "--memory-estimate", "--tflops", "0"], "--tflops must be positive"),
                         (["prune", "--model", "wan2.1-t2v-14b", "--memory-estimate", "--heads", "1.5"], "--heads must be")]:  # fmt: skip
        assert main(bad) == 2
        assert message in capsys.readouterr().err
    assert main(["prune", "--model", "wan2.1-t2v-14b", "--heads", "0.25"]) == 2
    assert "Missing option '--profile'" in capsys.readouterr().err
    for command in ("distill", "route"):  # --gpus sizes an estimate; a run's processes come from its launcher
        assert main([command, "--teacher", "t", "--student", "s", "--data", "d", "--out", "o", "--gpus", "2"]) == 2
        assert "--gpus goes with --memory-estimate" in capsys.readouterr().err


# --- Wan2.1-14B on 8 GPUs --------------------------------------------------------------------------------------


def test_wan14b_plan_fits_8_gpus_of_80gb():
    """scripts/wan14b_estimates.py: every stage fits 80 GiB per GPU on 8 GPUs with the commands it prints."""
    path = Path(__file__).parents[1] / "scripts" / "wan14b_estimates.py"
    spec = importlib.util.spec_from_file_location("wan14b_estimates", path)
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script  # its dataclass looks its module up
    spec.loader.exec_module(script)
    rows = {r.stage: r for r in script.rows(limit_gib=80)}
    assert list(rows) == ["profile", "prune", "data", "distill", "route"]
    for stage, row in rows.items():
        assert row.fits and row.estimate.total < 80 * GIB, (stage, row.estimate.total / GIB)
    for stage in ("distill", "route"):
        assert "--gradient-checkpointing" in rows[stage].command and "--use_fsdp" in rows[stage].command
    table = script.markdown(list(rows.values()), 400, 8, 80)
    assert table.count("\n| ") == 1 + len(rows) and "(over)" not in table  # the header and a row per stage
