"""A step-distillation LoRA fused into a Wan pipeline's transformer, then PARE on top of it."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from pare import load_bundle
from pare.cli import main
from pare.lora import few_step_sampler

SHAPE = ["--frames", "5", "--height", "32", "--width", "32"]  # 2 x 4 x 4 latents of the tiny Wan VAE


def test_fuse_lora_then_prune_distil_and_route(pipeline_dir, tmp_path, capsys):
    """A LoRA in the original Wan format (as LightX2V ships them) on two layers: fused at scale 0.5 it gives
    W + 0.5 (alpha / rank) B A on exactly those layers; the fused folder samples in 2 Euler steps without guidance
    and goes through profile, prune, data, distill and route."""
    g = torch.Generator().manual_seed(0)
    before = load_file(str(pipeline_dir / "transformer" / "diffusion_pytorch_model.safetensors"))
    rank, alpha = 2, 4.0
    lora, expected = {}, dict(before)
    for ours, theirs in (("blocks.0.attn1.to_q", "blocks.0.self_attn.q"), ("blocks.1.attn1.to_out.0", "blocks.1.self_attn.o")):
        out_dim, in_dim = before[f"{ours}.weight"].shape
        down, up = torch.randn(rank, in_dim, generator=g), torch.randn(out_dim, rank, generator=g)
        lora |= {f"diffusion_model.{theirs}.lora_down.weight": down, f"diffusion_model.{theirs}.lora_up.weight": up,
                 f"diffusion_model.{theirs}.alpha": torch.tensor(alpha)}  # fmt: skip
        expected[f"{ours}.weight"] = before[f"{ours}.weight"] + 0.5 * (alpha / rank) * up @ down
    save_file(lora, str(tmp_path / "steps.safetensors"))
    fused = tmp_path / "fused"
    assert main(["fuse-lora", "--model", str(pipeline_dir), "--lora", str(tmp_path / "steps.safetensors"), "--out",
                 str(fused), "--scale", "0.5", "--steps", "2"]) == 0  # fmt: skip
    assert "fused 2 LoRA layers" in capsys.readouterr().out
    after = load_file(str(fused / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert set(after) == set(before)  # plain weights: no adapter layers left
    for k in before:
        assert torch.allclose(after[k], expected[k], atol=1e-6), k
    assert sum(not torch.equal(after[k], before[k]) for k in before) == 2
    bundle = load_bundle(str(fused))
    assert bundle.sampler_defaults == few_step_sampler(2, 1.0, 5.0)
    assert bundle.sampler_defaults["sigmas"] == pytest.approx([1.0, 5 * 0.5 / (1 + 4 * 0.5)])  # timesteps 1000, 500 at shift 5
    assert bundle.prompt_encoder is not None and bundle.decoder is not None  # the pipeline's, inherited

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving left\na blue square moving right\na red square moving left\n")
    p = ["--prompts", str(prompts)]
    assert main(["profile", "--model", str(fused), "--out", str(tmp_path / "prof"), "--videos", "2", "--queries", "8",
                 *SHAPE, *p]) == 0  # fmt: skip
    assert json.loads((tmp_path / "prof" / "heads.json").read_text())["settings"]["steps"] == 2
    assert main(["prune", "--model", str(fused), "--profile", str(tmp_path / "prof" / "heads.json"), "--heads", "0.5",
                 "--ffn", "0.5", "--calibration-videos", "2", "--out", str(tmp_path / "pruned"), *p]) == 0  # fmt: skip
    assert main(["data", "--teacher", str(fused), "--out", str(tmp_path / "data"), "--videos", "6", "--shard-videos",
                 "2", *SHAPE, *p]) == 0  # fmt: skip
    assert main(["distill", "--teacher", str(fused), "--student", str(tmp_path / "pruned"), "--data",
                 str(tmp_path / "data"), "--out", str(tmp_path / "distilled"), "--steps", "2", "--batch-size", "2"]) == 0  # fmt: skip
    assert main(["route", "--teacher", str(fused), "--student", str(tmp_path / "distilled" / "model"), "--data",
                 str(tmp_path / "data"), "--out", str(tmp_path / "routed"), "--steps", "2", "--batch-size", "2",
                 "--budget", "0.6", "--warm-start-steps", "5"]) == 0  # fmt: skip
    routed = load_bundle(str(tmp_path / "routed" / "model"))
    assert routed.kind == "pare:routed" and routed.sampler_defaults == bundle.sampler_defaults
    video = tmp_path / "v.gif"
    assert main(["generate", "--model", str(tmp_path / "routed" / "model"), "--prompt", "a red circle moving left",
                 "--out", str(video), *SHAPE]) == 0  # fmt: skip
    steps = json.loads(video.with_suffix(".json").read_text())["steps"]
    assert len(steps) == 2 and all(s["forwards"] == 1 and s["flops"] < s["full_flops"] for s in steps)


@pytest.mark.parametrize("kind, message", [
    ("another model", "does not fit"),
    ("wrong shape", "does not fit"),
    ("not safetensors", "cannot read it as LoRA weights"),
])  # fmt: skip
def test_fuse_lora_refuses_a_lora_it_cannot_fuse_in_one_line(pipeline_dir, tmp_path, capsys, kind, message):
    lora = tmp_path / "x.safetensors"
    if kind == "not safetensors":
        lora.write_text("not a LoRA")
    else:
        block, out_dim = (7, 24) if kind == "another model" else (0, 999)  # the tiny Wan has 2 blocks of width 24
        save_file({f"diffusion_model.blocks.{block}.self_attn.q.lora_down.weight": torch.zeros(2, 24),
                   f"diffusion_model.blocks.{block}.self_attn.q.lora_up.weight": torch.zeros(out_dim, 2)}, str(lora))
    code = main(["fuse-lora", "--model", str(pipeline_dir), "--lora", str(lora), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, message", [
    (["--guidance", "2"], "--guidance and --shift set the sampler of --steps: give --steps too"),
    (["--shift", "3"], "--guidance and --shift set the sampler of --steps: give --steps too"),
    (["--steps", "4", "--guidance", "nan"], "--guidance must be a finite number"),
    (["--steps", "4", "--shift", "inf"], "--shift must be a positive number"),
    (["--scale", "nan"], "--scale must be a finite number"),
])  # fmt: skip
def test_fuse_lora_refuses_settings_it_would_ignore_or_cannot_use(tmp_path, capsys, extra, message):
    lora = tmp_path / "x.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(2, 128),
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(128, 2)}, str(lora))
    code = main(["fuse-lora", "--model", "builtin:shapes-t2v", "--lora", str(lora), "--out", str(tmp_path / "out"),
                 *extra])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()
