import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_wan
from pare import PareError, load, load_bundle
from pare.artifacts import FORMAT_VERSION, write_manifest
from pare.cli import main

X = torch.randn(1, 3, 2, 8, 8, generator=torch.Generator().manual_seed(0))
T = torch.tensor([700])
E = torch.randn(1, 7, 16, generator=torch.Generator().manual_seed(1))


def outputs(model):
    with torch.no_grad():
        return model(X, T, E, return_dict=False)[0]


def assert_same_model(a, b):
    """Identical weights bit for bit; outputs equal up to the float noise of differently aligned memory."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    torch.testing.assert_close(outputs(a), outputs(b), rtol=0, atol=1e-6)


def test_transformer_folder_loads_exact_weights(pixel_model_dir):
    bundle = load_bundle(str(pixel_model_dir))
    assert bundle.kind == "transformer-folder" and bundle.latent.is_pixel
    assert_same_model(bundle.transformer, tiny_wan())


def test_pipeline_folder_uses_its_transformer(pipeline_dir):
    bundle = load_bundle(str(pipeline_dir))
    assert bundle.kind == "pipeline-folder"
    assert bundle.latent.temporal == 4 and bundle.latent.spatial == 8 and bundle.latent.channels == 16
    assert bundle.prompt_encoder is not None and bundle.decoder is not None
    ref, got = tiny_wan(in_channels=16, out_channels=16).state_dict(), bundle.transformer.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def test_config_only_specs_build_on_meta():
    model = load("wan2.1-i2v-14b", weights=False)
    assert next(model.parameters()).is_meta
    assert model.config.in_channels == 36 and model.config.image_dim == 1280 and len(model.blocks) == 40
    assert sum(p.numel() for p in model.parameters()) > 14e9


def test_pare_output_folder_loads_and_inherits(tmp_path, pixel_model_dir):
    out = tmp_path / "out"
    shutil.copytree(pixel_model_dir, out / "transformer")
    write_manifest(out, kind="test", base=str(pixel_model_dir), settings={"note": "copy"})
    bundle = load_bundle(str(out))
    assert bundle.kind == "pare:test" and bundle.latent.is_pixel
    assert_same_model(bundle.transformer, tiny_wan())
    assert bundle.full_model is not bundle.transformer and next(bundle.full_model.parameters()).is_meta


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def bad_folders(tmp_path, pixel_model_dir):
    weights = "diffusion_pytorch_model.safetensors"
    cases = {}
    d = _copy(pixel_model_dir, tmp_path / "partial")
    sd = load_file(d / weights)
    sd.pop("blocks.1.ffn.net.2.weight")
    save_file(sd, d / weights)
    cases["partial"] = (d, "partial checkpoint: 1 of")
    d = _copy(pixel_model_dir, tmp_path / "truncated")
    raw = (d / weights).read_bytes()
    (d / weights).write_bytes(raw[: len(raw) // 2])
    cases["truncated"] = (d, "cannot read")
    d = _copy(pixel_model_dir, tmp_path / "noweights")
    (d / weights).unlink()
    cases["noweights"] = (d, "no diffusion_pytorch_model.safetensors")
    d = _copy(pixel_model_dir, tmp_path / "wrongshape")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "ffn_dim": 40}))
    cases["wrongshape"] = (d, "do not match config.json")
    d = _copy(pixel_model_dir, tmp_path / "unsupported")
    (d / "config.json").write_text(json.dumps({**cfg, "_class_name": "FluxTransformer2DModel"}))
    cases["unsupported"] = (d, "holds a FluxTransformer2DModel; supported are")
    d = _copy(pixel_model_dir, tmp_path / "badjson")
    (d / "config.json").write_text("{not json")
    cases["badjson"] = (d, "cannot read")
    d = tmp_path / "empty"
    d.mkdir()
    cases["empty"] = (d, "holds no config.json")
    f = tmp_path / "file.safetensors"
    f.write_bytes(b"x")
    cases["file"] = (f, "is a file")
    cases["missing"] = (tmp_path / "nothing", "no model at")
    d = _copy(pixel_model_dir, tmp_path / "newer" / "transformer").parent
    (d / "pare.json").write_text(json.dumps({"format": "pare", "format_version": FORMAT_VERSION + 1, "kind": "x", "base": ""}))
    cases["newer"] = (d, "upgrade pare")
    d = _copy(pixel_model_dir, tmp_path / "foreign" / "transformer").parent
    (d / "pare.json").write_text(json.dumps({"something": "else"}))
    cases["foreign"] = (d, "is not a PARE manifest")
    manifest = {"format": "pare", "format_version": FORMAT_VERSION, "kind": "lora-fused", "base": ""}
    for name, extra, message in (("badsampler", {"sampler": 5}, '"sampler" must be an object'),
                                 ("badshape", {"default_shape": "abc"}, '"default_shape" must be ')):
        d = _copy(pixel_model_dir, tmp_path / name / "transformer").parent
        (d / "pare.json").write_text(json.dumps({**manifest, **extra}))
        cases[name] = (d, message)
    return cases


def test_bad_checkpoints_fail_with_one_line(tmp_path, pixel_model_dir, capsys):
    for name, (path, message) in bad_folders(tmp_path, pixel_model_dir).items():
        with pytest.raises(PareError, match=message.replace("(", r"\(")):
            load(str(path))
        # the same through the CLI: one line, exit code 2, no traceback
        code = main(["generate", "--model", str(path), "--prompt", "a red circle", "--out", str(tmp_path / "o.mp4")])
        err = capsys.readouterr().err
        assert code == 2, name
        assert err.startswith("pare: error:") and err.count("\n") == 1 and message in err, (name, err)
        assert not (tmp_path / "o.mp4").exists()


@pytest.mark.parametrize(
    "spec, message",
    [
        ("builtin:nope", "unknown built-in model"),
        ("wan2.1-t2v-14b", "built-in config without weights"),
    ],
)
def test_spec_errors(spec, message):
    with pytest.raises(PareError, match=message):
        load(spec)


@pytest.mark.parametrize("shards", [False, True])
@pytest.mark.parametrize("dtype", [None, torch.float32, torch.bfloat16])
def test_weights_load_as_from_pretrained_but_into_own_memory(tmp_path, shards, dtype):
    """What diffusers' from_pretrained gives (names, dtypes with Wan's fp32 modules kept, values, outputs), for one
    file or shards; but the weights are the process's own: rewriting the file afterwards changes nothing, while
    from_pretrained's memory-mapped weights change with it (so pruning could free nothing while the file lived)."""
    from diffusers import WanTransformer3DModel

    tiny_wan().save_pretrained(tmp_path, **({"max_shard_size": "20KB"} if shards else {}))
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) == (5 if shards else 1)
    ours = load(str(tmp_path), dtype=dtype)
    theirs = WanTransformer3DModel.from_pretrained(tmp_path, torch_dtype=dtype).eval()
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    if dtype == torch.bfloat16:
        assert a["scale_shift_table"].dtype == torch.float32 and a["blocks.0.ffn.net.0.proj.weight"].dtype == dtype
    before = {k: v.clone() for k, v in a.items()}
    for f in files:  # zero every tensor's bytes in place (the header stays)
        header = int.from_bytes(f.read_bytes()[:8], "little")
        with open(f, "r+b") as fh:
            fh.seek(8 + header)
            fh.write(b"\0" * (f.stat().st_size - 8 - header))
    assert all(torch.equal(before[k], v) for k, v in ours.state_dict().items())
    if dtype != torch.bfloat16:  # a cast copies: only same-dtype loads stay mapped
        assert not all(torch.equal(before[k], v) for k, v in theirs.state_dict().items())
