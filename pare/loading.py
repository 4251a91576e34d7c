"""One entry point that every command uses to get a model: `load(spec)` / `load_bundle(spec)`.

A spec is one of
    builtin:<name>        a model shipped inside the package (see `BUILTIN_DIR`)
    wan2.1-t2v-1.3b, ...  a built-in Wan2.1 config without weights (FLOP counting, latency benchmarks)
    DIR                   a diffusers transformer folder (config.json + safetensors), a whole Wan pipeline
                          folder (model_index.json; its transformer/ is used), or a PARE output folder (pare.json)
Anything else, an unreadable or partial checkpoint, or an unsupported model class raises `PareError`.
"""

from __future__ import annotations

import importlib
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import WanTransformer3DModel
from diffusers.configuration_utils import register_to_config
from safetensors import safe_open
from torch import nn

from . import arch, artifacts
from .arch import PIXEL_SPACE, WAN_TEXT_LEN, WAN_VAE, LatentSpace
from .components import (Decoder, EmbeddingsFile, ImageEncoder, PixelDecoder, PromptEncoder, WanImageEncoder,
                         WanT5PromptEncoder, WanVaeDecoder)  # fmt: skip
from .errors import PareError, require

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # the names every --dtype takes


def dtype_named(name: str, flag: str = "--dtype") -> torch.dtype:
    require(name in DTYPES, f"{flag} must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def parse_device(name: str) -> torch.device:
    """The --device of the commands, parsed (whether a GPU is there is the caller's question)."""
    try:
        return torch.device(name)
    except RuntimeError:
        raise PareError(f"--device must be cpu, cuda or cuda:N, got {name!r}") from None


def weights_dtype(name: str | None, device: str) -> torch.dtype:
    """The --dtype of the commands: as named, else bf16 on a GPU and fp32 on a CPU."""
    return dtype_named(name or ("fp32" if device == "cpu" else "bf16"))

BUILTIN_DIR = Path(__file__).parent / "builtin"

# Transformer classes the loader accepts, by the `_class_name` diffusers writes into config.json. Later stages
# (pruned and routed models) add theirs with `register_model_class`.
MODEL_CLASSES: dict[str, type] = {"WanTransformer3DModel": WanTransformer3DModel}
# Classes of PARE's own stages, by the module that registers them on import (imported on first use only).
STAGE_CLASSES: dict[str, str] = {
    "PrunedWanTransformer3DModel": "pare.pruning.model",
    "RoutedWanTransformer3DModel": "pare.routing.model",
}

# Text encoders a manifest may name, by type: factory(folder, entry) -> PromptEncoder.
TEXT_ENCODERS: dict[str, callable] = {
    "wan-t5": lambda folder, entry: WanT5PromptEncoder(folder / entry["path"]),
    "embeddings": lambda folder, entry: EmbeddingsFile(folder / entry["path"]),
    "shapes-text": lambda folder, entry: _shapes_prompt_encoder(folder / entry["path"], entry.get("tokens")),
}

# Image encoders of image-to-video models a manifest may name, by type: factory(folder, entry) -> ImageEncoder.
IMAGE_ENCODERS: dict[str, callable] = {
    "shapes-frame-ae": lambda folder, entry: _shapes_image_encoder(folder / entry["path"]),
}


# Decoders a manifest may name, by type: factory(folder, entry) -> Decoder (pixel-space models need none).
DECODERS: dict[str, callable] = {
    "frame-ae": lambda folder, entry: _frame_autoencoder_decoder(folder / entry["path"]),
}


def _frame_autoencoder_decoder(path: Path) -> Decoder:
    from .shapes.autoencoder import FrameAutoencoderDecoder

    return FrameAutoencoderDecoder(path)


def _shapes_prompt_encoder(path: Path, tokens: int | None) -> PromptEncoder:
    from .shapes.text import ShapesPromptEncoder

    return ShapesPromptEncoder(path, pad_to=tokens)


def _shapes_image_encoder(path: Path) -> ImageEncoder:
    from .shapes.image import ShapesImageEncoder

    return ShapesImageEncoder(path)

_WAN_COMMON = dict(
    patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
    cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)  # fmt: skip
# Transformer configs of the public Wan2.1 diffusers checkpoints (transformer/config.json of Wan-AI/*-Diffusers).
WAN_CONFIGS: dict[str, dict] = {
    "wan2.1-t2v-1.3b": dict(_WAN_COMMON, num_attention_heads=12, ffn_dim=8960, num_layers=30),
    "wan2.1-t2v-14b": dict(_WAN_COMMON, num_attention_heads=40, ffn_dim=13824, num_layers=40),
    "wan2.1-i2v-14b": dict(
        _WAN_COMMON, num_attention_heads=40, ffn_dim=13824, num_layers=40, in_channels=36,
        image_dim=1280, added_kv_proj_dim=5120,
    ),  # fmt: skip
}
WAN_DEFAULT_SHAPE = (81, 480, 832)  # frames, height, width: Wan2.1 480p


def register_model_class(cls: type) -> type:
    """Let the loader build `cls` from a config.json whose `_class_name` is `cls.__name__` (usable as decorator)."""
    MODEL_CLASSES[cls.__name__] = cls
    return cls


def extends_config(parent: type):
    """Decorator for the `__init__` of a diffusers model subclass that adds config entries to `parent`'s.

    The decorated `__init__` names only its own entries, keyword-only, and passes the rest (`**kwargs`) on to
    `parent.__init__`. diffusers reads a model's config keys from its `__init__` signature (`register_to_config`
    when it records them, `from_config` when it picks them out of a config.json), so the signature is set to the
    parent's entries followed by the new ones before `register_to_config` wraps it: a subclass does not restate
    its parent's arguments."""

    def wrap(init):
        inherited = list(inspect.signature(parent.__init__).parameters.values())
        own = [p.replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD)
               for p in inspect.signature(init).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]  # fmt: skip
        init.__signature__ = inspect.Signature(inherited + own)
        return register_to_config(init)

    return wrap


@dataclass
class ModelBundle:
    """A transformer with what surrounds it: latent space, text length, prompt encoder, decoder, defaults."""

    transformer: nn.Module
    spec: str
    kind: str  # builtin | wan-config | transformer-folder | pipeline-folder | pare:<stage>
    latent: LatentSpace
    text_tokens: int
    prompt_encoder: PromptEncoder | None = None
    decoder: Decoder | None = None
    default_shape: tuple[int, int, int] | None = None  # frames, height, width
    has_weights: bool = True
    manifest: dict | None = None
    sampler_defaults: dict = field(default_factory=dict)  # steps, guidance_scale, flow_shift the model wants
    # Structure (meta device) of the full model a PARE output was made from; None when this is a full model.
    reference: nn.Module | None = None
    image_encoder: ImageEncoder | None = None  # first frame -> image tokens and latent condition (I2V models)
    images_dir: Path | None = None  # an I2V model's first frames to evaluate from (--images), else its own

    def image_tokens(self, height: int, width: int) -> int:
        """Image tokens per video of an I2V model at this frame size (0 for a T2V one): its image encoder's
        count, else Wan2.1's 257 CLIP tokens."""
        if not arch.is_image_to_video(self.transformer):
            return 0
        return self.image_encoder.tokens(height, width) if self.image_encoder is not None else arch.WAN_IMAGE_TOKENS

    @property
    def full_model(self) -> nn.Module:
        """The unpruned, unrouted structure to measure compute against."""
        return self.reference if self.reference is not None else self.transformer


def load(spec: str, **kwargs) -> nn.Module:
    """The transformer named by `spec` (see the module docstring); keyword arguments as `load_bundle`."""
    return load_bundle(spec, **kwargs).transformer


def load_bundle(
    spec: str, *, weights: bool = True, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> ModelBundle:
    """Resolve `spec` to a `ModelBundle`. With `weights=False` the transformer is built on the meta device from
    its config alone (instant, no memory: enough for FLOP counting and for building random-weight copies)."""
    spec = str(spec)
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        folder = BUILTIN_DIR / name
        require(
            name and (folder / artifacts.MANIFEST).is_file(),
            f"unknown built-in model {spec!r}: available are {', '.join(builtin_names()) or 'none'}",
        )
        return _load_pare_folder(folder, spec, weights, device, dtype)
    if spec.lower() in WAN_CONFIGS:
        require(
            not weights,
            f"{spec} is a built-in config without weights (good for `pare flops` and `pare bench-latency`); "
            "to run it, pass the folder of a Wan2.1 diffusers checkpoint",
        )
        model = _build_meta(WanTransformer3DModel, WAN_CONFIGS[spec.lower()])
        return ModelBundle(model, spec, "wan-config", WAN_VAE, WAN_TEXT_LEN, default_shape=WAN_DEFAULT_SHAPE,
                           has_weights=False)  # fmt: skip
    path = Path(spec).expanduser()
    require(path.exists(), f"no model at {spec!r}: {_EXPECTED}")
    require(path.is_dir(), f"{spec!r} is a file: {_EXPECTED}")
    if (path / artifacts.MANIFEST).is_file():
        return _load_pare_folder(path, spec, weights, device, dtype)
    if (path / "model_index.json").is_file():
        require((path / "transformer").is_dir(), f"pipeline folder {spec!r} has no transformer/ subfolder")
        model = _load_transformer(path / "transformer", weights, device, dtype)
        encoder = WanT5PromptEncoder(path) if (path / "text_encoder").is_dir() else None
        decoder = WanVaeDecoder(path / "vae") if (path / "vae").is_dir() else None
        latent = _pipeline_latent(path, model)
        images = WanImageEncoder(path) if (path / "image_encoder").is_dir() and (path / "vae").is_dir() else None
        return ModelBundle(model, spec, "pipeline-folder", latent, WAN_TEXT_LEN, encoder, decoder,
                           WAN_DEFAULT_SHAPE, weights, image_encoder=images)  # fmt: skip
    if (path / "config.json").is_file():
        model = _load_transformer(path, weights, device, dtype)
        return _bare_transformer_bundle(model, spec, weights)
    raise PareError(f"{spec!r} holds no config.json, model_index.json or pare.json: {_EXPECTED}")


_EXPECTED = (
    "expected a diffusers Wan transformer folder (config.json + *.safetensors), a Wan pipeline folder "
    "(model_index.json), a PARE output folder (pare.json), builtin:<name>, or one of " + ", ".join(WAN_CONFIGS)
)


def builtin_names() -> list[str]:
    if not BUILTIN_DIR.is_dir():
        return []
    return sorted(p.name for p in BUILTIN_DIR.iterdir() if (p / artifacts.MANIFEST).is_file())


def _bare_transformer_bundle(model: nn.Module, spec: str, weights: bool) -> ModelBundle:
    # A bare transformer folder does not say what its channels mean. Rule: 3 output channels is pixel space
    # (it decodes to RGB by itself); anything else is taken as Wan VAE latents (4x in time, 8x in space).
    if model.config.out_channels == 3:
        return ModelBundle(model, spec, "transformer-folder", PIXEL_SPACE, WAN_TEXT_LEN, None, PixelDecoder(),
                           None, weights)  # fmt: skip
    return ModelBundle(model, spec, "transformer-folder", WAN_VAE, WAN_TEXT_LEN, None, None, WAN_DEFAULT_SHAPE,
                       weights)  # fmt: skip


def _pipeline_latent(path: Path, model: nn.Module) -> LatentSpace:
    vae_config = path / "vae" / "config.json"
    if not vae_config.is_file():
        return WAN_VAE
    cfg = _read_json(vae_config)
    return LatentSpace(cfg.get("scale_factor_temporal") or 4, cfg.get("scale_factor_spatial") or 8, cfg["z_dim"])


def _load_pare_folder(folder: Path, spec: str, weights: bool, device, dtype) -> ModelBundle:
    manifest = artifacts.read_manifest(folder)
    model = _load_transformer(folder / "transformer", weights, device, dtype)
    # What the manifest does not state (text encoder, decoder, latent space) is inherited from the model it was
    # made from; the base is resolved without weights, so this costs nothing.
    base = None
    if manifest["base"]:
        try:
            base = load_bundle(resolve_base(manifest["base"], folder), weights=False)
        except PareError as exc:
            raise PareError(f"{folder} was made from {manifest['base']}, which cannot be loaded any more: {exc}") from None
    latent = LatentSpace(**manifest["latent"]) if "latent" in manifest else base.latent if base else PIXEL_SPACE
    encoder = _manifest_component(folder, manifest, "text_encoder", TEXT_ENCODERS, "text encoder") or (
        base.prompt_encoder if base else None)
    decoder = _manifest_component(folder, manifest, "decoder", DECODERS, "decoder") or (
        PixelDecoder() if latent.is_pixel else base.decoder if base else None)
    images = _manifest_component(folder, manifest, "image_encoder", IMAGE_ENCODERS, "image encoder") or (
        base.image_encoder if base else None)
    text_tokens = manifest.get("text_tokens") or (encoder.text_tokens if encoder else WAN_TEXT_LEN)
    shape = tuple(manifest["default_shape"]) if "default_shape" in manifest else base.default_shape if base else None
    kind = "builtin" if spec.startswith("builtin:") else f"pare:{manifest['kind']}"
    sampler = manifest.get("sampler") or (base.sampler_defaults if base else {})
    reference = base.full_model if base else None
    return ModelBundle(model, spec, kind, latent, text_tokens, encoder, decoder, shape, weights, manifest, sampler,
                       reference, images)  # fmt: skip


def resolve_base(base: str, folder: Path) -> str:
    """A base recorded as a relative path is relative to the folder that records it."""
    if base.startswith("builtin:") or base.lower() in WAN_CONFIGS or Path(base).is_absolute():
        return base
    return str((folder / base).resolve())


def _manifest_component(folder: Path, manifest: dict, key: str, registry: dict, what: str):
    """The text encoder or decoder a manifest names under `key` ({"type", "path"}), built by its registry's
    factory; None when the manifest names none."""
    entry = manifest.get(key)
    if not entry:
        return None
    factory = registry.get(entry.get("type"))
    require(factory is not None, f"{folder}/pare.json names an unknown {what} type {entry.get('type')!r}")
    require((folder / entry["path"]).exists(), f"{folder} is incomplete: its {what} {entry['path']} is missing")
    return factory(folder, entry)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PareError(f"cannot read {path}: {exc}") from None


def _model_class(config: dict, folder: Path) -> type:
    name = config.get("_class_name")
    if name in STAGE_CLASSES and name not in MODEL_CLASSES:
        importlib.import_module(STAGE_CLASSES[name])
    cls = MODEL_CLASSES.get(name)
    require(
        cls is not None,
        f"{folder} holds a {name or 'model without _class_name'}; supported are "
        f"{', '.join(sorted({*MODEL_CLASSES, *STAGE_CLASSES}))}",
    )
    return cls


def _build_meta(cls: type, config: dict) -> nn.Module:
    with init_empty_weights():
        try:
            model = cls.from_config(config)
        except (TypeError, ValueError) as exc:
            raise PareError(f"invalid {cls.__name__} config: {exc}") from None
    arch.check_supported(model)
    return model


def cast_copy(model: nn.Module, device, dtype: torch.dtype) -> nn.Module:
    """A copy of `model` with its floating-point weights in `dtype` on `device`, built without a second copy in the
    model's own dtype (meta structure, weights assigned tensor by tensor); buffers keep their dtype."""
    copy = _build_meta(type(model), dict(model.config))
    state = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in model.state_dict().items()}
    copy.load_state_dict(state, assign=True)
    return copy.to(device).train(model.training)


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a diffusers model folder (one file, or shards listed in an index)."""
    single = folder / "diffusion_pytorch_model.safetensors"
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        require(not missing, f"{folder} is a partial checkpoint: shard(s) {', '.join(missing)} are missing")
        return [folder / s for s in shards]
    raise PareError(f"{folder} has a config.json but no diffusion_pytorch_model.safetensors (or sharded index)")


def _check_complete(folder: Path, expected: nn.Module) -> None:
    """Refuse a checkpoint whose tensors do not cover the model: diffusers would silently initialise them."""
    found: dict[str, tuple] = {}
    for f in _weight_files(folder):
        try:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    found[k] = tuple(st.get_slice(k).get_shape())
        except Exception as exc:  # safetensors raises its own types for a damaged or truncated header
            raise PareError(f"cannot read {f}: {exc}") from None
    want = {k: tuple(v.shape) for k, v in expected.state_dict().items()}
    missing = sorted(set(want) - set(found))
    require(
        not missing,
        f"{folder} is a partial checkpoint: {len(missing)} of {len(want)} tensors missing (e.g. {missing[0] if missing else ''})",
    )
    wrong = [k for k in want if found[k] != want[k]]
    require(
        not wrong,
        f"{folder}: {len(wrong)} tensors do not match config.json (e.g. {wrong[0] if wrong else ''}: "
        f"{found[wrong[0]] if wrong else ''} vs {want[wrong[0]] if wrong else ''})",
    )


def _load_transformer(folder: Path, weights: bool, device, dtype) -> nn.Module:
    require((folder / "config.json").is_file(), f"{folder} has no config.json: {_EXPECTED}")
    config = _read_json(folder / "config.json")
    cls = _model_class(config, folder)
    meta = _build_meta(cls, config)
    if not weights:
        return meta
    _check_complete(folder, meta)
    try:
        _read_weights(meta, _weight_files(folder), dtype)
    except Exception as exc:  # safetensors and diffusers raise their own types for damaged files
        raise PareError(f"cannot load {folder}: {str(exc).splitlines()[0]}") from None
    return meta.to(device).eval()


CHUNK_BYTES = 256 * 2**20  # weights assigned per call of diffusers' loader


def _read_weights(model: nn.Module, files: list[Path], dtype) -> None:
    """Fill the meta-device `model` with the weights of `files`, tensor by tensor, each in memory of its own.

    What `from_pretrained(folder, torch_dtype=dtype)` gives (diffusers' own `load_model_dict_into_meta` casts and
    assigns, keeping the class's `_keep_in_fp32_modules` in fp32), except for where the weights live: from_pretrained
    leaves them in the memory-mapped file when the dtypes agree, and the file's pages then stay resident until its
    last tensor is freed, so a command that replaces weights (pruning slices every block) holds the old and the new
    ones at once. Each tensor here is copied out of a mapping opened for it alone and closed at once."""
    from diffusers.models.model_loading_utils import load_model_dict_into_meta

    keep = list(type(model)._keep_in_fp32_modules or [])
    chunk: dict[str, torch.Tensor] = {}

    def assign() -> None:  # in chunks: each call of diffusers' function walks the whole model's state dict
        load_model_dict_into_meta(model, chunk, dtype=dtype, keep_in_fp32_modules=keep)
        chunk.clear()

    for file in files:
        with safe_open(str(file), framework="pt") as st:
            names = list(st.keys())
        for name in names:
            with safe_open(str(file), framework="pt") as st:
                chunk[name] = st.get_tensor(name).clone()
            if sum(t.nbytes for t in chunk.values()) > CHUNK_BYTES:  # bounds what a cast holds twice
                assign()
    assign()
