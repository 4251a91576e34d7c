"""Tiny Wan models and folders built on the spot: nothing is downloaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel

TINY = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=3, out_channels=3, text_dim=16,
    freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
)  # fmt: skip


def fsdp_env() -> dict[str, str]:
    """The FSDP variables `accelerate launch` sets for PARE's own launch flags (`compress.FSDP_LAUNCH`)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    from pare.compress import FSDP_LAUNCH

    args = launch_command_parser().parse_args(["--num_processes", "2", "--num_machines", "1", "--dynamo_backend",
                                               "no", *FSDP_LAUNCH, "x.py"])  # fmt: skip
    env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    return {k: v for k, v in env.items() if "FSDP" in k or k == "ACCELERATE_MIXED_PRECISION"}


def two_processes(args: list[str], out: Path, kill_after: int | None = None, fsdp: bool = False) -> int | None:
    """`pare ARGS` in two CPU processes (gloo, one thread each); with `fsdp`, under PARE's FSDP launch flags
    (tests/fsdp_cpu.py). With `kill_after`, both workers die as a SIGKILL leaves them right after the checkpoint of
    that step (pare.training's fault injection, so the kill cannot come late), and the same command resumes the run;
    returns the step the killed run had checkpointed."""
    from pare.training import KILL_AFTER_CHECKPOINT

    program = [str(Path(__file__).with_name("fsdp_cpu.py"))] if fsdp else ["-m", "pare.cli"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *program, *args]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    if fsdp:
        env |= fsdp_env()
    if kill_after is not None:
        killed = subprocess.run(cmd, env={**env, KILL_AFTER_CHECKPOINT: str(kill_after)}, capture_output=True,
                                text=True, timeout=600)  # fmt: skip
        assert killed.returncode != 0 and "SIGKILL" in killed.stderr, killed.stderr[-3000:]
        killed_at = json.loads((out / "checkpoint" / "state.json").read_text())["step"]
        assert not (out / "model").exists()  # exported once, at the end (unless --export-checkpoints)
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    # the workers' own errors (a Python traceback, or a native abort's "terminate called ... what(): ..."), not the
    # launcher's summary of them
    worker = ("[rank", "terminate", "what()", "Error", "Exception")
    assert run.returncode == 0, "\n".join(l for l in run.stderr.splitlines() if any(w in l for w in worker))[-3000:]
    return killed_at if kill_after is not None else None


def tiny_wan(seed: int = 0, **overrides) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(**{**TINY, **overrides}).eval()


@pytest.fixture(scope="session")
def pixel_model_dir(tmp_path_factory):
    """A tiny pixel-space (3-channel) Wan transformer saved with save_pretrained."""
    d = tmp_path_factory.mktemp("pixel_model")
    tiny_wan().save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def embeds_file(tmp_path_factory):
    """Precomputed prompt embeddings for the tiny models (text_dim 16, 7 tokens)."""
    from pare.components import save_embeddings

    g = torch.Generator().manual_seed(1)
    path = tmp_path_factory.mktemp("embeds") / "embeds.safetensors"
    save_embeddings(path, ["a red circle", "a blue square"], torch.randn(2, 7, 16, generator=g),
                    torch.randn(7, 16, generator=g))  # fmt: skip
    return path


def _tiny_tokenizer(folder):
    """A word-level tokenizer saved in transformers' format (a stand-in for UMT5's, built offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<unk>", "a", "red", "blue", "circle", "square", "moving", "left", "right"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)
    return fast


def tiny_pipeline_parts(seed: int = 0):
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=11, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                                               relative_attention_num_buckets=8)).eval()  # fmt: skip
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()  # fmt: skip
    transformer = tiny_wan(seed, in_channels=16, out_channels=16)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=3.0)  # fmt: skip
    return text_encoder, vae, transformer, scheduler


def assert_pipeline_matches_sampler(transformer, pipe_parts, steps: int = 2) -> None:
    """diffusers' WanPipeline with `transformer` dropped in gives, latent for latent, what PARE's own sampler gives
    (same noise, embeddings, UniPC flow shift 3, guidance 5, unbatched CFG as the pipeline runs it)."""
    from diffusers import WanPipeline

    from pare.sampling import Conditioning, SamplerConfig, initial_noise, sample

    text_encoder, vae, _, scheduler = pipe_parts
    pipe = WanPipeline(tokenizer=None, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer)
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(1, 512, 16, generator=g), torch.randn(1, 512, 16, generator=g)
    shape = (16, 2, 4, 4)  # 5 frames of 32x32 through the tiny Wan VAE
    noise = initial_noise(shape, [3])
    config = SamplerConfig(steps=steps, guidance_scale=5.0, scheduler="unipc", flow_shift=3.0, batch_cfg=False)
    ours = sample(transformer, Conditioning(pos, neg), shape, config, noise=noise, progress=False).latents
    theirs = pipe(prompt_embeds=pos, negative_prompt_embeds=neg, latents=noise.clone(), num_frames=5, height=32,
                  width=32, num_inference_steps=steps, guidance_scale=5.0, output_type="latent").frames  # fmt: skip
    assert torch.equal(ours, theirs)
    video = pipe(prompt_embeds=pos, negative_prompt_embeds=neg, num_frames=5, height=32, width=32,
                 num_inference_steps=steps, output_type="pt").frames  # fmt: skip
    assert video.shape == (1, 5, 3, 32, 32)


@pytest.fixture(scope="session")
def pipeline_dir(tmp_path_factory):
    """A whole Wan pipeline folder (model_index.json, tokenizer, text_encoder, vae, scheduler, transformer)."""
    from diffusers import WanPipeline

    d = tmp_path_factory.mktemp("pipeline")
    tokenizer = _tiny_tokenizer(d / "tokenizer_src")
    text_encoder, vae, transformer, scheduler = tiny_pipeline_parts()
    WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                transformer=transformer).save_pretrained(d)  # fmt: skip
    assert json.loads((d / "model_index.json").read_text())["transformer"][1] == "WanTransformer3DModel"
    return d


@pytest.fixture(scope="session")
def stage_inputs(tmp_path_factory):
    """A tiny teacher, its profile, a pruned student and trajectory data: the inputs of `pare distill`."""
    from pare.cli import main

    d = tmp_path_factory.mktemp("stages")
    # the training settings are pinned to those the stage tests' recorded numbers were made with (the defaults
    # before --qk-gain 2 --frame-noise 0.5 --timestep-shift 3): these tests are about the stages, not the teacher
    assert main(["teacher", "train", "--out", str(d / "t"), "--preset", "tiny", "--samples", "16", "--batch-size",
                 "8", "--eval-every", "0", "--eval-prompts", "2", "--qk-gain", "1", "--frame-noise", "0",
                 "--timestep-shift", "1"]) == 0  # fmt: skip
    teacher = str(d / "t" / "model")
    assert main(["profile", "--model", teacher, "--out", str(d / "prof"), "--videos", "2", "--steps", "4",
                 "--timesteps", "0,2", "--queries", "16"]) == 0  # fmt: skip
    assert main(["prune", "--model", teacher, "--profile", str(d / "prof" / "heads.json"), "--heads", "0.5",
                 "--ffn", "0.5", "--calibration-videos", "2", "--out", str(d / "student")]) == 0  # fmt: skip
    assert main(["data", "--teacher", teacher, "--out", str(d / "data"), "--videos", "6", "--shard-videos", "2",
                 "--steps", "4"]) == 0  # fmt: skip
    return d, teacher
