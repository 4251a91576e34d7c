"""Image-to-video: the shapes I2V teacher's conditioning, its start from a T2V teacher, training, evaluation and
`pare generate --image`."""

import copy
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
from pare.video import read_generated, read_video, write_image

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


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """A tiny T2V teacher (2 steps) and a tiny I2V teacher started from it (2 steps): run folders."""
    d = tmp_path_factory.mktemp("i2v_teachers")
    t2v, i2v = d / "t2v", d / "i2v"
    assert main([*TRAIN, "--preset", "tiny", "--out", str(t2v)]) == 0
    assert main([*TRAIN, "--preset", "tiny-i2v", "--init-from", str(t2v / "model"), "--out", str(i2v)]) == 0
    return t2v, i2v


def test_i2v_teacher_trains_from_a_t2v_one_and_generates_from_a_first_frame(teachers, tmp_path, capsys):
    t2v, i2v = teachers
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
    # its record names the frame it was given: eval-shapes --videos scores frame 0 against it
    assert record["images"] == [str((tmp_path / "first.png").resolve())]
    prompts_read, frames, given_read = read_generated(tmp_path)
    assert np.array_equal(given_read[0], given[0])
    capsys.readouterr()
    assert main(["eval-shapes", "--videos", str(tmp_path), "--out", str(tmp_path / "rescored")]) == 0
    rescored = json.loads((tmp_path / "rescored" / "scores.json").read_text())["scores"]
    assert rescored["first_frame_psnr"] == pytest.approx(frame_psnr(frames[:1, 0] / 255, given[:1] / 255)[0])
    # eval-shapes --model keeps the first frames beside its videos, so that --videos re-scores them alike
    assert main(["eval-shapes", "--model", str(i2v / "model"), "--n", "2", "--steps", "2", "--out",
                 str(tmp_path / "e")]) == 0  # fmt: skip
    _, frames, given_read = read_generated(tmp_path / "e" / "videos")
    assert np.array_equal(given_read, given)
    assert main(["eval-shapes", "--videos", str(tmp_path / "e" / "videos"), "--out", str(tmp_path / "e2")]) == 0
    rescored = json.loads((tmp_path / "e2" / "scores.json").read_text())["scores"]
    assert rescored["first_frame_psnr"] == pytest.approx(np.mean(frame_psnr(frames[:, 0] / 255, given / 255)))
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


def test_every_stage_runs_on_an_i2v_teacher(teachers, tmp_path, capsys):
    """profile, prune (the image key/value projections too), data (with each video's first-frame conditioning),
    distill, route and eval on the tiny I2V teacher, each on the model's own first frames."""
    _, i2v = teachers
    teacher = str(i2v / "model")
    assert main(["profile", "--model", teacher, "--out", str(tmp_path / "prof"), "--videos", "2", "--steps", "4",
                 "--queries", "16"]) == 0  # fmt: skip
    assert main(["prune", "--model", teacher, "--profile", str(tmp_path / "prof" / "heads.json"), "--heads", "0.5",
                 "--ffn", "0.5", "--calibration-videos", "2", "--out", str(tmp_path / "pruned")]) == 0  # fmt: skip
    pruned = load_bundle(str(tmp_path / "pruned"))
    for block in arch.blocks(pruned.transformer):  # 1 head of 8 kept of 2: the image projections sliced with text's
        assert block.attn2.add_k_proj.out_features == block.attn2.to_k.out_features == 8
        assert block.attn2.add_v_proj.out_features == 8 and block.attn2.norm_added_k.weight.shape == (8,)
    assert pruned.image_encoder is not None and pruned.text_tokens == arch.WAN_TEXT_LEN  # from its base
    data = tmp_path / "data"
    assert main(["data", "--teacher", teacher, "--out", str(data), "--videos", "4", "--shard-videos", "2", "--steps",
                 "4"]) == 0  # fmt: skip
    from safetensors.torch import load_file

    shard = load_file(str(data / "shard-00001.safetensors"))  # videos 2 and 3
    prompts = json.loads((data / "index.json").read_text())["prompts"]
    ae = FrameAutoencoder.load(i2v / "model" / "vae")
    tokens, condition = first_frame_condition(ae, domain.render(domain.parse_prompts(prompts), seed=0)[2:, :, 0], 8)
    assert torch.allclose(shard["latent_condition"].float(), condition, atol=2e-3)  # fp16 storage
    assert torch.allclose(shard["image_embeds"], tokens, atol=1e-5)
    # the data's first frames are part of its settings: a resume from other frames is refused
    (tmp_path / "other").mkdir()
    write_image(tmp_path / "other" / "0.png", np.zeros((32, 32, 3), np.uint8))
    capsys.readouterr()
    assert main(["data", "--teacher", teacher, "--out", str(data), "--videos", "4", "--shard-videos", "2", "--steps",
                 "4", "--images", str(tmp_path / "other")]) == 2  # fmt: skip
    assert "holds data made with another first_frames" in capsys.readouterr().err
    assert main(["distill", "--teacher", teacher, "--student", str(tmp_path / "pruned"), "--data", str(data), "--out",
                 str(tmp_path / "distilled"), "--steps", "2", "--batch-size", "4"]) == 0  # fmt: skip
    assert main(["route", "--teacher", teacher, "--student", str(tmp_path / "distilled" / "model"), "--data", str(data),
                 "--out", str(tmp_path / "routed"), "--steps", "2", "--batch-size", "4", "--budget", "0.6",
                 "--warm-start-steps", "5"]) == 0  # fmt: skip
    routed = load_bundle(str(tmp_path / "routed" / "model"))
    assert routed.manifest["training"]["val_end"]["error"] > 0
    assert main(["eval", "--model", str(tmp_path / "routed" / "model"), "--reference", teacher, "--n", "2", "--steps",
                 "4", "--out", str(tmp_path / "eval")]) == 0  # fmt: skip
    ev = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert ev["model_scores"]["flops_per_video"] < ev["reference_scores"]["flops_per_video"]
    # first frames from files instead of the model's own: a folder of PNGs, image i with prompt i
    frames = tmp_path / "frames"
    frames.mkdir()
    for i, frame in enumerate(first_frames(domain.heldout_prompts(2))):  # the model's own frames, mirrored
        write_image(frames / f"{i:04d}.png", ((frame.flip(-1).permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8))
    assert main(["eval", "--model", str(tmp_path / "routed" / "model"), "--reference", teacher, "--n", "2", "--steps",
                 "4", "--images", str(frames), "--out", str(tmp_path / "eval-files")]) == 0  # fmt: skip
    mirrored = json.loads((tmp_path / "eval-files" / "results.json").read_text())
    assert mirrored["model_scores"]["flops_per_video"] == ev["model_scores"]["flops_per_video"]
    assert mirrored["fidelity"] != ev["fidelity"]  # other first frames, other videos
    for out in ("bench", "bench"):  # the second run finds the first's videos, stored under the frames' digest
        assert main(["bench", "--model", teacher, "--variant", f"PARE={tmp_path / 'routed' / 'model'}", "--caches",
                     "none", "--n", "2", "--steps", "4", "--images", str(frames), "--out", str(tmp_path / out)]) == 0  # fmt: skip
    rows = json.loads((tmp_path / "bench" / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["teacher", "PARE"]
    stored = sorted(p.name for p in (tmp_path / "bench" / "methods").iterdir())
    assert main(["bench", "--model", teacher, "--variant", f"PARE={tmp_path / 'routed' / 'model'}", "--caches", "none",
                 "--n", "2", "--steps", "4", "--out", str(tmp_path / "bench")]) == 0  # its own frames: run anew  # fmt: skip
    assert len(list((tmp_path / "bench" / "methods").iterdir())) > len(stored)
    capsys.readouterr()
    assert main(["bench", "--model", str(teachers[0] / "model"), "--caches", "none", "--n", "2", "--steps", "4",
                 "--images", str(frames), "--out", str(tmp_path / "bench2")]) == 2  # fmt: skip
    assert "is a text-to-video model: --images is for image-to-video models" in capsys.readouterr().err


def tiny_i2v_pipeline(folder):
    """A tiny diffusers WanImageToVideoPipeline (CLIP vision model and processor, Wan VAE, UMT5) saved to `folder`."""
    from diffusers import WanImageToVideoPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from conftest import _tiny_tokenizer, tiny_pipeline_parts, tiny_wan

    text_encoder, vae, _, scheduler = tiny_pipeline_parts()
    torch.manual_seed(1)
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                            num_attention_heads=2, image_size=32, patch_size=16)).eval()  # fmt: skip
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    # noisy latents, Wan's 4-channel first-frame mask and the condition latents; 5 CLIP tokens of 8 values
    transformer = tiny_wan(2, in_channels=16 + 4 + 16, out_channels=16, image_dim=8, added_kv_proj_dim=24)
    pipe = WanImageToVideoPipeline(tokenizer=_tiny_tokenizer(folder / "tokenizer_src"), text_encoder=text_encoder,
                                   vae=vae, scheduler=scheduler, image_processor=processor, image_encoder=clip,
                                   transformer=transformer)  # fmt: skip
    pipe.save_pretrained(folder)
    return pipe


def test_pruned_and_routed_i2v_transformers_run_in_wan_image_to_video_pipeline(tmp_path):
    """A Wan I2V pipeline folder loads with its image encoder; PARE's conditioning of a first frame is the
    pipeline's own, and the full, pruned and routed transformers dropped into diffusers' WanImageToVideoPipeline
    give, latent for latent, what PARE's sampler gives from that conditioning."""
    from PIL import Image

    from pare.components import images_from_uint8
    from pare.pruning.plan import WidthPlan
    from pare.pruning.prune import prune
    from pare.routing import RouteConfig, build_routed
    from pare.arch import TokenGrid
    from pare.sampling import Conditioning, SamplerConfig, initial_noise, sample

    pipe = tiny_i2v_pipeline(tmp_path / "pipe")
    bundle = load_bundle(str(tmp_path / "pipe"))
    assert arch.is_image_to_video(bundle.transformer) and bundle.image_encoder is not None
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    embeds, condition = bundle.image_encoder.encode(images_from_uint8(pixels[None]), 5, "cpu", torch.float32)
    want_embeds = pipe.encode_image(image, torch.device("cpu"))
    pre = pipe.video_processor.preprocess(image, height=32, width=32)
    _, want_condition = pipe.prepare_latents(pre, 1, 16, 32, 32, 5, torch.float32, torch.device("cpu"),
                                             latents=torch.zeros(1, 16, 2, 4, 4))  # fmt: skip
    assert embeds.shape == (1, 5, 8) and condition.shape == (1, 4 + 16, 2, 4, 4)
    assert torch.equal(embeds, want_embeds) and torch.equal(condition, want_condition)

    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(1, 512, 16, generator=g), torch.randn(1, 512, 16, generator=g)
    noise = initial_noise((16, 2, 4, 4), [3])
    config = SamplerConfig(steps=2, guidance_scale=5.0, scheduler="unipc", flow_shift=3.0, batch_cfg=False)
    full = bundle.transformer
    n = len(full.blocks)
    pruned, _ = prune(copy.deepcopy(full), WidthPlan([[1]] * n, [[0]] * n, [list(range(16))] * n))
    routed = build_routed(copy.deepcopy(full), RouteConfig(budget=0.6), TokenGrid(2, 2, 2), 512)
    for transformer in (full, pruned.eval(), routed.eval()):
        ours = sample(transformer, Conditioning(pos, neg, embeds, condition), (16, 2, 4, 4), config, noise=noise,
                      progress=False).latents  # fmt: skip
        pipe.transformer = transformer
        theirs = pipe(image=image, prompt_embeds=pos, negative_prompt_embeds=neg, latents=noise.clone(), num_frames=5,
                      height=32, width=32, num_inference_steps=2, guidance_scale=5.0, output_type="latent").frames  # fmt: skip
        assert torch.equal(ours, theirs)
    assert pruned.blocks[0].attn2.add_k_proj.out_features == 12  # one cross-attention head of 12 kept of 2
    # the folder through the CLI: pare generate --image
    write_image(tmp_path / "first.png", pixels)
    out = tmp_path / "v.mp4"
    assert main(["generate", "--model", str(tmp_path / "pipe"), "--prompt", "a red circle", "--image",
                 str(tmp_path / "first.png"), "--frames", "5", "--height", "32", "--width", "32", "--steps", "2",
                 "--out", str(out)]) == 0  # fmt: skip
    assert read_video(out).shape[0] == 5


def test_first_frames_from_files_pair_with_prompts_and_bad_layouts_are_refused(teachers, tmp_path):
    from pare.errors import PareError
    from pare.profiling.calibration import first_frames as frames_for
    from conftest import tiny_wan

    bundle = load_bundle(str(teachers[1] / "model"))
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(2):
        write_image(folder / f"{i}.png", np.full((32, 32, 3), 100 * i, np.uint8))
    # prompts cycled from two lines go with the two images in the same order
    got = frames_for(bundle, ["a red circle", "a blue square", "a red circle", "a blue square"], folder)
    assert got[:, 0, 0, 0].tolist() == pytest.approx([-1.0, 100 / 127.5 - 1] * 2)
    with pytest.raises(PareError, match="holds 2 images: give one, or one per line of --prompts"):
        frames_for(bundle, ["a red circle", "a blue square", "a green triangle"], folder)
    with pytest.raises(PareError, match="is a text-to-video model: --images is for image-to-video models"):
        frames_for(load_bundle(str(teachers[0] / "model")), ["a red circle"], folder)
    # Wan's I2V attention splits image from text 512 tokens before the end: other text lengths are refused
    with pytest.raises(PareError, match="needs prompt embeddings of 512 tokens"):
        arch.check_i2v_text(bundle.transformer, 16)
    arch.check_i2v_text(load_bundle(str(teachers[0] / "model")).transformer, 16)  # T2V: any length
    with pytest.raises(PareError, match="Wan2.2's image-to-video layout"):
        arch.check_supported(tiny_wan(in_channels=6))


def test_frame_weighted_mse_known_answers(teachers, tmp_path, capsys):
    from pare.shapes.teacher import frame_weighted_mse

    v, target = torch.zeros(2, 3, 4, 2, 2), torch.zeros(2, 3, 4, 2, 2)
    v[:, :, 0] = 1.0  # squared error 1 on frame 0
    v[:, :, 2] = 2.0  # 4 on frame 2
    assert frame_weighted_mse(v, target) == torch.nn.functional.mse_loss(v, target) == pytest.approx(5 / 4)
    assert frame_weighted_mse(v, target, 4.0).item() == pytest.approx((4 * 1 + 4) / (4 + 3))
    capsys.readouterr()
    assert main([*TRAIN, "--preset", "tiny", "--first-frame-weight", "4", "--out", "/nonexistent/x"]) == 2
    assert "--first-frame-weight is for image-to-video presets" in capsys.readouterr().err
    # wired into the teacher's loss: the same run with frame 0 weighted logs another loss
    t2v, i2v = teachers
    assert main([*TRAIN, "--preset", "tiny-i2v", "--init-from", str(t2v / "model"), "--first-frame-weight", "4",
                 "--out", str(tmp_path / "w")]) == 0  # fmt: skip
    loss = lambda run: json.loads((run / "log.jsonl").read_text().splitlines()[-1])["loss"]  # noqa: E731
    assert loss(tmp_path / "w") != loss(i2v)
