"""The teacher's latent space: the per-frame autoencoder, its normalisation, its folder and its decoder entry."""

import json
import shutil

import pytest
import torch
from diffusers import AutoencoderTiny

from pare import load_bundle
from pare.cli import main
from pare.shapes import domain
from pare.shapes.autoencoder import (CONFIGS, AutoencoderTrainConfig, FrameAutoencoder, FrameAutoencoderDecoder,
                                     train_autoencoder)  # fmt: skip


def _ae(seed=0, config="tiny"):
    torch.manual_seed(seed)
    return FrameAutoencoder(AutoencoderTiny(**CONFIGS[config]).eval(), torch.tensor([0.5, -1.0, 2.0, 0.0]),
                            torch.tensor([2.0, 0.5, 1.0, 4.0]))  # fmt: skip


@torch.no_grad()
def test_encode_is_per_frame_and_normalised_per_channel():
    ae = _ae()
    videos = domain.render(domain.sample_scenes(2, seed=1), seed=1)  # (2, 3, 8, 32, 32)
    z = ae.encode(videos)
    assert z.shape == (2, 4, domain.FRAMES, 32 // ae.spatial, 32 // ae.spatial) and ae.spatial == 2
    # frame 5 of video 1, encoded alone by the diffusers model, then normalised by hand
    raw = ae.vae.encode(videos[1:2, :, 5]).latents[0]  # (4, 16, 16)
    torch.testing.assert_close(z[1, :, 5], (raw - ae.mean.view(4, 1, 1)) / ae.std.view(4, 1, 1))
    # decode un-normalises: decoding z equals the diffusers decoder on the raw latents
    torch.testing.assert_close(ae.decode(z)[1, :, 5], ae.vae.decode(raw[None]).sample[0].clamp(-1, 1))


@torch.no_grad()
def test_save_load_round_trip_is_exact(tmp_path):
    ae = _ae(seed=3)
    ae.save(tmp_path / "ae")
    back = FrameAutoencoder.load(tmp_path / "ae")
    videos = domain.render(domain.sample_scenes(2, seed=2), seed=2)
    assert torch.equal(back.mean, ae.mean) and torch.equal(back.std, ae.std)
    assert torch.equal(back.encode(videos), ae.encode(videos))
    z = torch.randn(2, 4, 8, 16, 16)
    assert torch.equal(back.decode(z), ae.decode(z))
    assert torch.equal(FrameAutoencoderDecoder(tmp_path / "ae").decode(z), ((ae.decode(z) + 1) * 127.5).round()
                       .to(torch.uint8).permute(0, 2, 3, 4, 1))  # fmt: skip


def test_load_refuses_a_folder_without_statistics(tmp_path):
    from pare.errors import PareError

    AutoencoderTiny(**CONFIGS["tiny"]).save_pretrained(tmp_path / "bare")
    with pytest.raises(PareError, match="not a frame autoencoder folder"):
        FrameAutoencoder.load(tmp_path / "bare")


def test_training_is_deterministic_and_learns():
    cfg = AutoencoderTrainConfig("tiny", steps=30, batch_frames=16, lr=5e-3)
    a, ra = train_autoencoder(cfg, progress=False)
    b, rb = train_autoencoder(cfg, progress=False)
    sa, sb = a.vae.state_dict(), b.vae.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and torch.equal(a.mean, b.mean)
    assert ra == rb
    untrained = train_autoencoder(AutoencoderTrainConfig("tiny", steps=1, batch_frames=16, lr=5e-3), progress=False)[1]
    assert ra["reconstruction_mse"] < 0.5 * untrained["reconstruction_mse"]


def test_teacher_folder_decodes_through_its_autoencoder(tmp_path, capsys):
    """A teacher folder names its decoder in pare.json; the loader builds it, and a folder missing it is refused."""
    out = tmp_path / "run"
    assert main(["teacher", "train", "--preset", "tiny", "--samples", "16", "--batch-size", "8", "--warmup-steps", "2",
                 "--eval-every", "0", "--eval-prompts", "2", "--out", str(out)]) == 0  # fmt: skip
    bundle = load_bundle(str(out / "model"))
    assert isinstance(bundle.decoder, FrameAutoencoderDecoder)
    assert bundle.latent.spatial == 2 and bundle.latent.channels == 4
    manifest = json.loads((out / "model" / "pare.json").read_text())
    assert manifest["decoder"] == {"type": "frame-ae", "path": "vae"}
    # the run's autoencoder is what the model folder ships
    z = torch.randn(1, 4, 8, 16, 16)
    run_ae = FrameAutoencoder.load(out / "autoencoder")
    assert torch.equal(bundle.decoder.decode(z), FrameAutoencoderDecoder(out / "autoencoder").decode(z))
    assert run_ae.mean.shape == (4,)
    broken = tmp_path / "broken"
    shutil.copytree(out / "model", broken)
    shutil.rmtree(broken / "vae")
    capsys.readouterr()
    assert main(["generate", "--model", str(broken), "--prompt", "a red circle bouncing", "--out", str(tmp_path / "x.mp4")]) == 2
    err = capsys.readouterr().err
    assert "its decoder vae is missing" in err and err.count("\n") == 1
