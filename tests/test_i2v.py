"""Image-to-video: the shapes I2V teacher's conditioning, its start from a T2V teacher, training, evaluation and
`pare generate --image`."""

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny

from pare import arch
from pare.cli import main
from pare.loading import load_bundle
from pare.shapes import domain
from pare.shapes.autoencoder import CONFIGS, FrameAutoencoder
from pare.shapes.evaluate import evaluate_model, first_frames, frame_psnr
from pare.shapes.image import first_frame_condition, image_tokens
from pare.shapes.teacher import PRESETS, TeacherNet, build, t2v_to_i2v
from pare.shapes.text import pad_text, tokenize
from pare.video import read_video, write_image

TRAIN = ["teacher", "train", "--samples", "16", "--batch-size", "8", "--warmup-steps", "4", "--eval-every", "0",
         "--eval-prompts", "2", "--device", "cpu"]  # fmt: skip


def tiny_autoencoder() -> FrameAutoencoder:
    torch.manual_seed(0)
    return FrameAutoencoder(AutoencoderTiny(**CONFIGS["tiny"]).eval(), torch.zeros(4), torch.ones(4))


def test_image_tokens_are_the_latent_cut_into_2x2_patches_row_major():
    latent = torch.arange(2 * 4 * 6, dtype=torch.float32).view(1, 2, 1, 4, 6)  # (B, C, 1, h, w)
    tokens = image_tokens(latent)
    assert tokens.shape == (1, 2 * 3, 2 * 4)
    # token (i, j) = channel 0's patch rows 2i..2i+1, columns 2j..2j+1, then channel 1's
    i, j = 1, 2
    want = torch.cat([latent[0, c, 0, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].flatten() for c in range(2)])
    assert torch.equal(tokens[0, i * 3 + j], want)


def test_first_frame_condition_is_mask_then_latents_of_the_frame_and_empty_frames():
    ae = tiny_autoencoder()
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    tokens, condition = first_frame_condition(ae, images, frames=5)
    with torch.no_grad():
        video = torch.zeros(3, 3, 5, 32, 32)
        video[:, :, 0] = images
        latents = ae.encode(video)  # Wan's layout: the latents of [frame, zeros, zeros, ...]
    assert condition.shape == (3, 1 + 4, 5, 16, 16)
    assert torch.equal(condition[:, 0, 0], torch.ones(3, 16, 16)) and not condition[:, 0, 1:].any()
    assert torch.allclose(condition[:, 1:], latents, atol=1e-5)
    assert torch.allclose(tokens, image_tokens(latents[:, :, :1]), atol=1e-5) and tokens.shape == (3, 64, 16)


def test_an_i2v_teacher_started_from_a_t2v_one_computes_what_it_computes():
    """t2v_to_i2v: the mask and condition channels and the image branch's value projection start at zero, so the
    I2V model's velocity is the T2V model's on the same (padded) text, whatever the first frame."""
    t2v, text = build("tiny", "cpu", qk_gain=1.7)
    torch.manual_seed(1)
    for p in t2v.parameters():  # weights unlike a fresh model's (zero biases, unit norms)
        p.data.add_(0.1 * torch.randn_like(p))
    i2v, _ = build("tiny-i2v", "cpu")
    i2v.load_state_dict(t2v_to_i2v(t2v.state_dict(), i2v))
    assert arch.is_image_to_video(i2v) and not arch.is_image_to_video(t2v)
    g = torch.Generator().manual_seed(2)
    x, cond = torch.randn(2, 4, 8, 16, 16, generator=g), torch.randn(2, 5, 8, 16, 16, generator=g)
    image, t = torch.randn(2, 64, 16, generator=g), torch.tensor([800.0, 200.0])
    ids = tokenize(["a red circle bouncing", "a blue square moving left slowly"])
    with torch.no_grad():
        got = TeacherNet(i2v, text)(x, t, ids, image, cond)
        want = t2v(x, t, pad_text(text(ids), arch.WAN_TEXT_LEN), return_dict=False)[0]
        assert torch.allclose(got, want, atol=1e-5)
        # the T2V model itself on its 16 tokens: the padding is what differs
        assert not torch.allclose(t2v(x, t, text(ids), return_dict=False)[0], want, atol=1e-5)
    assert PRESETS["shapes-i2v"].transformer["in_channels"] == 9 and PRESETS["shapes-i2v"].transformer["image_dim"] == 16


def test_frame_psnr_known_answers():
    a = np.zeros((2, 4, 4, 3))
    b = a.copy()
    b[1] += 0.1  # MSE 0.01: 20 dB
    assert frame_psnr(a, b) == [100.0, pytest.approx(20.0)]


def test_i2v_teacher_trains_from_a_t2v_one_and_generates_from_a_first_frame(tmp_path, capsys):
    t2v, i2v = tmp_path / "t2v", tmp_path / "i2v"
    assert main([*TRAIN, "--preset", "tiny", "--out", str(t2v)]) == 0
    assert main([*TRAIN, "--preset", "tiny-i2v", "--init-from", str(t2v / "model"), "--out", str(i2v)]) == 0
    bundle = load_bundle(str(i2v / "model"))
    assert arch.is_image_to_video(bundle.transformer) and bundle.image_encoder is not None
    assert bundle.text_tokens == arch.WAN_TEXT_LEN == bundle.prompt_encoder.encode(["a red circle"], "cpu", torch.float32).shape[1]
    # the run's evaluation scores the first frame and is the exported model's
    evals = [json.loads(l) for l in (i2v / "eval.jsonl").read_text().splitlines()]
    prompts = domain.heldout_prompts(2)
    scores, videos = evaluate_model(bundle, prompts, progress=False)
    assert evals[-1]["first_frame_psnr"] == pytest.approx(scores["first_frame_psnr"])
    given = ((first_frames(prompts) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert scores["first_frame_psnr"] == pytest.approx(np.mean(frame_psnr(videos[:, 0].numpy() / 255, given / 255)))
    # pare generate --image: the same video as the Python API from the same frame and seed
    write_image(tmp_path / "first.png", given[0])
    out = tmp_path / "v.gif"
    assert main(["generate", "--model", str(i2v / "model"), "--prompt", prompts[0], "--image", str(tmp_path / "first.png"),
                 "--steps", "25", "--out", str(out)]) == 0  # fmt: skip
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["prompts"] == prompts[:1]
    written = read_video(out)
    k = written.shape[1] // 32  # the GIF is upscaled for viewing
    assert np.abs(written[:, ::k, ::k].astype(int) - videos[0].numpy().astype(int)).mean() < 2
    capsys.readouterr()
    # bad input: no frame, a frame of another size, a frame for a text-to-video model
    assert main(["generate", "--model", str(i2v / "model"), "--prompt", "x", "--out", str(tmp_path / "w.gif")]) == 2
    assert "is an image-to-video model: give the first frame (--image FILE.png)" in capsys.readouterr().err
    write_image(tmp_path / "small.png", given[0][:16, :16])
    assert main(["generate", "--model", str(i2v / "model"), "--prompt", "x", "--image", str(tmp_path / "small.png"),
                 "--out", str(tmp_path / "w.gif")]) == 2  # fmt: skip
    assert "is 16x16: expected 32x32, the video's size" in capsys.readouterr().err
    assert main(["generate", "--model", str(t2v / "model"), "--prompt", "x", "--image", str(tmp_path / "first.png"),
                 "--out", str(tmp_path / "w.gif")]) == 2  # fmt: skip
    assert "is a text-to-video model: --image is for image-to-video models" in capsys.readouterr().err
    (tmp_path / "bad.png").write_text("not an image")
    assert main(["generate", "--model", str(i2v / "model"), "--prompt", "x", "--image", str(tmp_path / "bad.png"),
                 "--out", str(tmp_path / "w.gif")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "cannot read it as an image" in err and err.count("\n") == 1
    assert not (tmp_path / "w.gif").exists()
