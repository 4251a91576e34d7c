"""The shipped embedded default: it loads through the one loader, generates, and records how it was made."""

import json

import pytest
import torch

from pare import load_bundle
from pare.cli import main
from pare.arch import LatentSpace
from pare.loading import BUILTIN_DIR
from pare.shapes import domain
from pare.shapes.teacher import below_bar

SPEC = "builtin:shapes-t2v"


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(SPEC)


def test_shipped_files_are_small_and_recorded(bundle):
    folder = BUILTIN_DIR / "shapes-t2v"
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size <= 20_000_000
    record = bundle.manifest["training"]
    for key in ("samples_seen", "train_seconds", "sessions", "eval"):
        assert key in record
    assert record["sessions"][0]["command"].startswith("pare teacher train")
    # provisional exactly when the recorded scores miss the bar
    ev = record["eval"]
    evaluation = {"prompts": [""] * ev["prompts"], "scores": ev, "real": ev["real_videos"]}
    assert bundle.manifest["provisional"] is bool(below_bar(evaluation))


def test_teacher_is_a_diffusers_wan_model_with_width_and_depth(bundle):
    from diffusers import WanTransformer3DModel

    model = bundle.transformer
    assert type(model) is WanTransformer3DModel
    assert model.config.num_layers >= 8 and model.config.num_attention_heads >= 8
    assert bundle.latent == LatentSpace(temporal=1, spatial=2, channels=4)
    assert bundle.default_shape == (domain.FRAMES, domain.HEIGHT, domain.WIDTH)


def test_generate_builtin(tmp_path, capsys):
    out = tmp_path / "red.mp4"
    assert main(["generate", "--model", SPEC, "--prompt", "a red circle moving right slowly", "--steps", "3",
                 "--out", str(out)]) == 0  # fmt: skip
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["video_shape"] == [domain.FRAMES, domain.HEIGHT, domain.WIDTH]
    assert record["sampler"]["guidance_scale"] == bundle_defaults()["guidance_scale"]


def bundle_defaults():
    return load_bundle(SPEC, weights=False).sampler_defaults


def test_unknown_word_is_a_clean_error(tmp_path, capsys):
    code = main(["generate", "--model", SPEC, "--prompt", "a pink elephant", "--out", str(tmp_path / "x.mp4")])
    err = capsys.readouterr().err
    assert code == 2 and "not in the shapes vocabulary" in err and err.count("\n") == 1


def test_flops_of_builtin(capsys):
    assert main(["flops", "--model", SPEC, "--frames", "8", "--height", "32", "--width", "32", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    pt, ph, pw = load_bundle(SPEC, weights=False).transformer.config.patch_size
    # latents of 8 frames x 16 x 16 (the autoencoder halves each side), cut into patches
    assert d["tokens"] == (8 // pt) * (16 // ph) * (16 // pw) == 256 and d["text_tokens"] == 16 and len(d["per_block"]) == 8
