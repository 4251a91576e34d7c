from types import SimpleNamespace

import pytest
import torch
from diffusers import WanPipeline, WanTransformer3DModel
from torch import nn

from conftest import TINY, tiny_wan
from pare import PareError, load_bundle
from pare.arch import TokenGrid
from pare.components import WanT5PromptEncoder
from pare.flops import count_flops
from pare.sampling import Conditioning, SamplerConfig, initial_noise, sample

LATENT = (16, 2, 4, 4)  # 5 frames of 32x32 through the Wan VAE: 2 latent frames of 4x4


@pytest.fixture(scope="module")
def pipe_and_bundle(pipeline_dir):
    return WanPipeline.from_pretrained(pipeline_dir), load_bundle(str(pipeline_dir))


def test_prompt_encoder_matches_wan_pipeline(pipe_and_bundle):
    pipe, bundle = pipe_and_bundle
    prompts = ["a red circle moving left", ""]
    with torch.no_grad():
        theirs, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=512,
                                       device="cpu")  # fmt: skip
    ours = bundle.prompt_encoder.encode(prompts, "cpu", torch.float32)
    assert ours.shape == (2, 512, 16) and (ours[0, 5:] == 0).all() and (ours[1, 1:] == 0).all()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)  # separately loaded copies: float noise only
    encoder = WanT5PromptEncoder(bundle.spec)
    encoder._parts = SimpleNamespace(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, _execution_device="cpu")
    assert torch.equal(encoder.encode(prompts, "cpu", torch.float32), theirs)  # same modules: bit for bit



@pytest.mark.parametrize("scheduler", ["unipc", "euler"])
def test_sampler_matches_wan_pipeline(pipe_and_bundle, scheduler):
    """Unbatched CFG reproduces diffusers' WanPipeline denoising loop bit for bit."""
    pipe, bundle = pipe_and_bundle
    pos = bundle.prompt_encoder.encode(["a red circle"], "cpu", torch.float32)
    neg = bundle.prompt_encoder.encode([""], "cpu", torch.float32)
    noise = initial_noise(LATENT, [3])
    config = SamplerConfig(steps=4, guidance_scale=5.0, scheduler=scheduler, flow_shift=3.0, batch_cfg=False)
    ours = sample(pipe.transformer, Conditioning(pos, neg), LATENT, config, noise=noise, progress=False)
    if scheduler == "euler":
        from diffusers import FlowMatchEulerDiscreteScheduler

        pipe = WanPipeline(**{**pipe.components, "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0)})
    theirs = pipe(prompt_embeds=pos, negative_prompt_embeds=neg, latents=noise.clone(), num_frames=5, height=32,
                  width=32, num_inference_steps=4, guidance_scale=5.0, output_type="latent").frames  # fmt: skip
    assert torch.equal(ours.latents, theirs)


def test_batched_cfg_equals_two_passes_and_seeds_are_per_sample(pipe_and_bundle):
    _, bundle = pipe_and_bundle
    enc = bundle.prompt_encoder
    cond = Conditioning(enc.encode(["a red circle", "a blue square"], "cpu", torch.float32),
                        enc.encode(["", ""], "cpu", torch.float32))  # fmt: skip
    batched = sample(bundle.transformer, cond, LATENT, SamplerConfig(steps=3, seed=5), progress=False)
    separate = sample(bundle.transformer, cond, LATENT, SamplerConfig(steps=3, seed=5, batch_cfg=False), progress=False)
    torch.testing.assert_close(batched.latents, separate.latents, rtol=0, atol=1e-5)
    # the second video of a batch is the video its seed gives alone
    alone = sample(bundle.transformer, Conditioning(cond.prompt_embeds[1:], cond.negative_embeds[1:]), LATENT,
                   SamplerConfig(steps=3, seed=6), progress=False)  # fmt: skip
    torch.testing.assert_close(batched.latents[1:], alone.latents, rtol=0, atol=1e-5)


class FirstBlockOnly(WanTransformer3DModel):
    """A stand-in for a routed model: runs block 0 only and reports its route in `last_route`."""

    def forward(self, hidden_states, timestep, encoder_hidden_states, **kwargs):
        every = self.blocks
        self.blocks = nn.ModuleList(every[:1])
        try:
            out = super().forward(hidden_states, timestep, encoder_hidden_states, **kwargs)
        finally:
            self.blocks = every
        self.last_route = torch.tensor([[True] + [False] * (len(every) - 1)] * hidden_states.shape[0])
        return out


def test_step_record_counts_executed_blocks():
    torch.manual_seed(0)
    routed = FirstBlockOnly(**TINY).eval()
    grid = TokenGrid(2, 4, 4)
    report = count_flops(routed, grid, 7)
    cond = Conditioning(torch.randn(3, 7, 16), torch.randn(3, 7, 16))
    for batch_cfg in (True, False):
        res = sample(routed, cond, (3, 2, 8, 8), SamplerConfig(steps=2, batch_cfg=batch_cfg), flop_report=report,
                     progress=False)  # fmt: skip
        for s in res.steps:
            assert s.forwards == 6 and s.blocks_run == 1.0
            assert s.flops == 6 * report.total([0]) and s.full_flops == 6 * report.total()
    full = sample(tiny_wan(), cond, (3, 2, 8, 8), SamplerConfig(steps=2, guidance_scale=1.0), flop_report=report,
                  progress=False)  # fmt: skip
    assert [s.forwards for s in full.steps] == [3, 3] and full.flops == full.full_flops == 6 * report.total()


@pytest.mark.parametrize(
    "config, message",
    [
        (SamplerConfig(steps=0), "--steps"),
        (SamplerConfig(scheduler="ddim"), "--scheduler"),
        (SamplerConfig(flow_shift=0), "--shift"),
    ],
)
def test_bad_sampler_config(config, message):
    with pytest.raises(PareError, match=message):
        sample(tiny_wan(), Conditioning(torch.randn(1, 7, 16), torch.randn(1, 7, 16)), (3, 1, 4, 4), config)


def test_i2v_conditioning_is_concatenated():
    model = tiny_wan(in_channels=5, image_dim=8, added_kv_proj_dim=24)
    cond = Conditioning(torch.randn(1, 512, 16), torch.randn(1, 512, 16), image_embeds=torch.randn(1, 4, 8),
                        latent_condition=torch.randn(1, 2, 2, 4, 4))  # fmt: skip
    res = sample(model, cond, (3, 2, 4, 4), SamplerConfig(steps=2), progress=False)
    assert res.latents.shape == (1, 3, 2, 4, 4) and torch.isfinite(res.latents).all()
