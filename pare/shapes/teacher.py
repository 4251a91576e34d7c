"""Training the embedded teacher `builtin:shapes-t2v`: diffusers' own `WanTransformer3DModel` with a tiny
config, on the latents of a per-frame autoencoder (`autoencoder.py`), learned jointly with the shapes text
encoder by flow matching with prompt dropout.

Recipe: train the frame autoencoder (or load it from the run folder: it is trained once, the same for a given
seed) and freeze it; build model + text encoder as one module (`TeacherNet`); then `training.run`, the loop of
every PARE stage (accelerate, several processes, EMA with warm-up, learning-rate warm-up then a half cosine to 0,
atomic checkpoints with model/ rewritten at each, resume, SIGTERM stop), with `TeacherStage`: each step renders a
fresh seeded batch on the training device, encodes it, noises it, and regresses the velocity; every
`eval_every` steps the domain evaluator scores model/ on held-out prompts (eval.jsonl, eval_curve.png).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel

from .. import arch, artifacts
from ..errors import optional_module, require
from ..io import atomic_dir, save_figure, write_json
from ..training import LoopConfig, check_launch, resume_state, run
from . import domain
from .autoencoder import AutoencoderTrainConfig, FrameAutoencoder, train_autoencoder
from .image import MASK_CHANNELS, first_frame_condition, image_dim
from .text import TEXT_TOKENS, WORD_ID, BOS, PAD, ShapesTextEncoder, pad_text, tokenize_scenes


@dataclass(frozen=True)
class Preset:
    """A teacher design: the transformer config and the frame autoencoder whose latents it denoises."""

    transformer: dict
    autoencoder: str  # a name of `autoencoder.CONFIGS`
    autoencoder_steps: int
    image: bool = False  # image-to-video: conditioned on the first frame as Wan2.1 I2V is (`image.py`)


# "shapes-t2v" is the shipped teacher's design: 8 blocks x 8 heads of 16 (width 128), FFN 512, on 16x16x4 latents
# with patch (2, 2, 2): an 8x32x32 video is 4 x 8 x 8 = 256 tokens of 32 values (two frames of 4x4 latent pixels
# each), so that a frame's motion of 1.2-2.4 pixels is 0.6-1.2 tokens between token-frames: tokens that span two
# frames let it see motion (docs/teacher.md). "shapes-t2v-p222" is the name its first runs were recorded under.
PRESETS: dict[str, Preset] = {
    "shapes-t2v": Preset(dict(patch_size=(2, 2, 2), num_attention_heads=8, attention_head_dim=16, in_channels=4,
                              out_channels=4, text_dim=64, freq_dim=64, ffn_dim=512, num_layers=8,
                              rope_max_seq_len=64), "frame-ae", 1000),
    # The design shipped before: patch (1, 4, 4), 8 x 4 x 4 = 128 tokens of 64 values, whole objects inside a token
    # of one frame: it draws shapes and cannot read direction.
    "shapes-t2v-p144": Preset(dict(patch_size=(1, 4, 4), num_attention_heads=8, attention_head_dim=16, in_channels=4,
                                   out_channels=4, text_dim=64, freq_dim=64, ffn_dim=512, num_layers=8,
                                   rope_max_seq_len=64), "frame-ae", 1000),
    # Experimental: patch (2, 4, 4), 4 x 4 x 4 = 64 tokens of 128 values (two frames of 8x8 pixels each), 12 heads
    # (width 192): a quarter of the tokens of shapes-t2v, whole objects inside a token as in shapes-t2v-p144.
    "shapes-t2v-p244": Preset(dict(patch_size=(2, 4, 4), num_attention_heads=12, attention_head_dim=16, in_channels=4,
                                   out_channels=4, text_dim=64, freq_dim=64, ffn_dim=768, num_layers=8,
                                   rope_max_seq_len=64), "frame-ae", 1000),
    # Experimental: patch (2, 2, 2) with heads of 24. Wan's RoPE gives each spatial axis 2 * (head_dim // 6) of a
    # head's dims: at 16 that is two frequencies, 1 and 1/100 rad per token, so on an 8-token axis positions 0
    # and 6 look alike and nothing tells them apart at long range; at 24, four (1, 1/10, 1/100, 1/1000).
    "shapes-t2v-p222-h24": Preset(dict(patch_size=(2, 2, 2), num_attention_heads=6, attention_head_dim=24,
                                       in_channels=4, out_channels=4, text_dim=64, freq_dim=64, ffn_dim=576,
                                       num_layers=8, rope_max_seq_len=64), "frame-ae", 1000),
    "tiny": Preset(dict(patch_size=(1, 4, 4), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                        out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=64),
                   "tiny", 4),
}  # fmt: skip
PRESETS["shapes-t2v-p222"] = PRESETS["shapes-t2v"]
# "shapes-i2v" is shapes-t2v with Wan2.1 I2V's inputs: the noisy latents, a mask channel and the first frame's
# latents (4 + 1 + 4 channels), and 64 image tokens of 16 values in every cross-attention (`image.py`). It starts
# from the T2V teacher (--init-from builtin:shapes-t2v): the new input channels and the image branch's value
# projection start at zero, so the first step's model is the T2V teacher given its text padded to 512 tokens
# (which Wan's I2V attention needs; the T2V teacher was trained on 16, so that much is new to it).
PRESETS["shapes-i2v"] = Preset({**PRESETS["shapes-t2v"].transformer, "in_channels": 4 + MASK_CHANNELS + 4,
                                "image_dim": image_dim(4), "added_kv_proj_dim": 128}, "frame-ae", 1000, image=True)
PRESETS["tiny-i2v"] = Preset({**PRESETS["tiny"].transformer, "in_channels": 4 + MASK_CHANNELS + 4,
                              "image_dim": image_dim(4), "added_kv_proj_dim": 16}, "tiny", 4, image=True)
SAMPLER_DEFAULTS = {"steps": 25, "guidance_scale": 2.0, "flow_shift": 3.0}  # CFG 2: the lowest FD (docs/teacher.md)
RUN_FILE, OLD_CHECKPOINT = "run.json", "checkpoint.pt"  # the settings as run; the checkpoint of the loop before `training.run`
AUTOENCODER_DIR, CURVE_FILE = "autoencoder", "eval_curve.png"


@dataclass(kw_only=True)
class TeacherTrainConfig(LoopConfig):
    """Knobs of `pare teacher train`: those of every training loop (`LoopConfig`; `steps` follows from
    `samples`), with the teacher's defaults, and the recipe's own."""

    preset: str = "shapes-t2v"
    samples: int = 100_000  # total training videos; raise it and re-run to train further
    lr: float = 1e-3
    warmup_steps: int = 200
    lr_schedule: str = "cosine"  # after warm-up: constant | cosine (to 0 at the last step)
    weight_decay: float = 0.01
    ema_decay: float = 0.999  # cap of the warmed-up EMA decay
    prompt_dropout: float = 0.1  # share of prompts replaced by the empty prompt (for CFG)
    timestep_shift: float = 3.0  # training sigmas shifted like the sampler's flow shift (1: plain logit-normal)
    qk_gain: float = 2.0  # initial weight of the q/k RMSNorms of a fresh model (see `build`)
    frame_noise: float = 0.5  # share of videos with a noise level per frame (see `flow_matching_batch`)
    context_frames: float = 0.0  # share of videos whose first 1-3 frames are almost clean (see `flow_matching_batch`)
    two_objects: float = 0.5  # share of training scenes with two objects (binding colour, shape and motion per object)
    circling: float | None = None  # share of training scenes that circle (None: 1 in 11, as every motion)
    object_tokens: bool = False  # the text encoder's object-phrase path (see `ShapesTextEncoder`)
    eval_every: int = 500  # steps; 0 = only at the end
    eval_prompts: int = 32
    checkpoint_every: int = 250
    export_checkpoints: bool = True  # model/ is rewritten with every checkpoint
    log_every: int = 20
    val_examples: int = 64  # held-out videos of the validation loss (fixed noise and noise levels)
    compile: bool = False
    init_from: str | None = None  # a teacher model folder to continue from (a later sitting), optimiser re-warmed
    first_frame_weight: float = 1.0  # I2V: weight of frame 0's velocity error against every other frame's 1

    RESUMABLE: ClassVar[tuple[str, ...]] = (*LoopConfig.RESUMABLE, "samples", "eval_prompts", "compile")

    def __post_init__(self):
        self.steps = math.ceil(self.samples / self.batch_size) if self.samples > 0 and self.batch_size > 0 else 0

    def validate(self) -> None:
        require(self.preset in PRESETS, f"--preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        require(self.samples > 0 and self.batch_size > 0, "--samples and --batch-size must be positive")
        super().validate()
        require(0 <= self.prompt_dropout < 1, f"--prompt-dropout must be in [0, 1), got {self.prompt_dropout}")
        require(self.lr > 0, f"--lr must be positive, got {self.lr}")
        require(self.timestep_shift > 0, f"--timestep-shift must be positive, got {self.timestep_shift}")
        require(self.qk_gain > 0, f"--qk-gain must be positive, got {self.qk_gain}")
        require(0 <= self.frame_noise <= 1, f"--frame-noise must be in [0, 1], got {self.frame_noise}")
        require(0 <= self.context_frames <= 1 - self.frame_noise,
                f"--context-frames must be in [0, 1 - frame noise], got {self.context_frames}")  # fmt: skip
        require(0 <= self.two_objects <= 1, f"--two-objects must be in [0, 1], got {self.two_objects}")
        require(self.circling is None or 0 <= self.circling <= 1, f"--circling must be in [0, 1], got {self.circling}")
        require(self.warmup_steps >= 1, f"--warmup-steps must be at least 1, got {self.warmup_steps}")
        require(self.eval_prompts >= 2, f"--eval-prompts must be at least 2, got {self.eval_prompts}")
        require(self.val_examples >= 1, f"--val-examples must be at least 1, got {self.val_examples}")
        require(self.first_frame_weight > 0, f"--first-frame-weight must be positive, got {self.first_frame_weight}")
        require(self.first_frame_weight == 1 or PRESETS[self.preset].image,
                "--first-frame-weight is for image-to-video presets (shapes-i2v)")  # fmt: skip
        if self.init_from:
            earlier = ShapesTextEncoder.load(teacher_folder(self.init_from) / "text_encoder.safetensors").config
            require(self.object_tokens or not earlier.get("object_tokens"),
                    f"--init-from {self.init_from}: its text encoder has object tokens: add --object-tokens")  # fmt: skip


class TeacherNet(torch.nn.Module):
    """The transformer and the text encoder, trained as one model: velocity of (x_t, timestep, token ids), and for
    an I2V transformer of the first frame's image tokens and latent condition too."""

    def __init__(self, transformer: WanTransformer3DModel, text: ShapesTextEncoder):
        super().__init__()
        self.transformer, self.text = transformer, text

    def forward(self, x_t, timestep, ids, image=None, condition=None):
        text = self.text(ids)
        if condition is not None:  # I2V: Wan's attention takes what precedes the last 512 text tokens as image tokens
            text, x_t = pad_text(text, arch.WAN_TEXT_LEN), torch.cat([x_t, condition], dim=1)
        return self.transformer(x_t, timestep, text, encoder_hidden_states_image=image, return_dict=False)[0]


def build(preset: str, device, qk_gain: float = 1.0, object_tokens: bool = False) -> tuple[WanTransformer3DModel, ShapesTextEncoder]:
    """A fresh transformer and text encoder. `qk_gain` is the initial weight of every attention's q/k RMSNorm.

    Wan normalises queries and keys (RMSNorm over all heads), so an attention logit is at most about
    g^2 sqrt(head_dim) for norm weights g: 11 for Wan2.1's heads of 128 at g = 1, but 4 for heads of 16, too
    soft to single out one position among 128 tokens (e^4 against 127 others). AdamW moves g by about the
    learning rate per step, so the norms stay near 1 for thousands of steps (g 0.85-1.7 in a 2,152-step run).
    """
    config = PRESETS[preset].transformer
    model = WanTransformer3DModel(**config).to(device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm_q.weight", "norm_k.weight")):
                p.fill_(qk_gain)
    return model, ShapesTextEncoder(text_dim=config["text_dim"], object_tokens=object_tokens).to(device)


def flow_matching_batch(scenes: domain.Scenes, seed: int, dropout: float, encode=None, shift: float = 1.0,
                        frame_noise: float = 0.0, tokens_per_frame: int = 1, context_frames: float = 0.0,
                        frames_per_token: int = 1, autoencoder: FrameAutoencoder | None = None):  # fmt: skip
    """x_t, timestep, token ids and velocity target for a batch of scenes (all on the scenes' device); with
    `autoencoder` (an I2V teacher's), also the image tokens and latent condition of each video's first frame.

    Rectified flow as Wan/diffusers use it: x_t = (1 - s) x_0 + s eps, target v = eps - x_0, timestep 1000 s,
    with s ~ logit-normal(0, 1) (more weight on the middle of the path, where structure is decided), then
    shifted as the sampler's flow shift shifts its sigmas, s -> shift s / (1 + (shift - 1) s) (SD3, section 5.3.2:
    redundant inputs, here 8 frames of one scene, keep their structure up to higher noise). x_0 is the
    rendered video, or `encode(video)` (its latents) when given.

    With `frame_noise` > 0 that share of the videos gets its own noise level in every frame (drawn from the same
    distribution; Diffusion Forcing, arXiv 2407.01392), and the timestep becomes (B, frames x
    tokens_per_frame), one per token, which Wan's transformer in diffusers takes as it is (Wan2.2 TI2V's
    per-token timesteps). A frame that is almost noise beside a cleaner one is denoised far better by finding
    the object in the cleaner frame and moving it as the prompt says, so these videos reward binding frames
    together; with one noise level in every frame that reward is small, because every frame is equally faint.
    """
    dev = scenes.motion.device
    g = torch.Generator(device=dev).manual_seed(seed + 1)
    x0 = domain.render(scenes, seed=seed)  # (B, 3, F, H, W)
    image = () if autoencoder is None else first_frame_condition(autoencoder, x0[:, :, 0], x0.shape[2])
    if encode is not None:
        with torch.no_grad():
            x0 = encode(x0)  # (B, C, F, H/4, W/4)
    ids = tokenize_scenes(scenes)  # (B, L)
    drop = torch.rand(scenes.batch, generator=g, device=dev) < dropout
    empty = torch.full_like(ids, WORD_ID[PAD])
    empty[:, 0] = WORD_ID[BOS]
    ids = torch.where(drop[:, None], empty, ids)
    sigma = _shifted(torch.sigmoid(torch.randn(scenes.batch, generator=g, device=dev)), shift)
    noise = torch.randn(x0.shape, generator=g, device=dev)
    if not frame_noise and not context_frames:
        s = sigma.view(-1, 1, 1, 1, 1)
        return ((1 - s) * x0 + s * noise, sigma * 1000, ids, noise - x0, *image)
    g2 = torch.Generator(device=dev).manual_seed(seed + 2)  # own stream: the draws above stay as without it
    # a "frame" here is a token-frame: `frames_per_token` latent frames (the temporal patch) share one level
    B, frames = scenes.batch, x0.shape[2] // frames_per_token
    own = _shifted(torch.sigmoid(torch.randn(B, frames, generator=g2, device=dev)), shift)
    u = torch.rand(B, generator=g2, device=dev)
    per_frame = u < frame_noise
    sigma = torch.where(per_frame[:, None], own, sigma[:, None])  # (B, F)
    if context_frames:
        # Context videos: frames before k (1-3) almost clean, the rest at the video's level. The later frames
        # are then best denoised by moving the visible objects as the prompt says.
        g3 = torch.Generator(device=dev).manual_seed(seed + 3)
        context = (u >= frame_noise) & (u < frame_noise + context_frames)
        k = torch.randint(1, 4, (B, 1), generator=g3, device=dev)
        clean = 0.1 * torch.rand(B, frames, generator=g3, device=dev)
        prefix = torch.arange(frames, device=dev)[None] < k
        sigma = torch.where(context[:, None] & prefix, clean, sigma)
    s = sigma.repeat_interleave(frames_per_token, dim=1).view(B, 1, frames * frames_per_token, 1, 1)
    timestep = (sigma * 1000).repeat_interleave(tokens_per_frame, dim=1)  # (B, token-frames x tokens per frame)
    return ((1 - s) * x0 + s * noise, timestep, ids, noise - x0, *image)


def frame_weighted_mse(v: torch.Tensor, target: torch.Tensor, first_weight: float = 1.0) -> torch.Tensor:
    """MSE of (B, C, F, H, W) velocities, frame 0's squared errors weighted `first_weight` against 1 for every
    other frame (a weighted mean: the plain MSE at weight 1). An I2V teacher must copy its given frame 0 exactly
    (the evaluator's first-frame PSNR), a small share of the plain loss once the rest is learnt."""
    if first_weight == 1:
        return F.mse_loss(v, target)
    w = torch.ones(v.shape[2], device=v.device)
    w[0] = first_weight
    per_frame = ((v - target) ** 2).mean(dim=(0, 1, 3, 4))  # (F,)
    return (w * per_frame).sum() / w.sum()


def _shifted(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * sigma / (1 + (shift - 1) * sigma)


VAE_DIR = "vae"


def export_model(folder: Path, model, text, autoencoder: FrameAutoencoder, record: dict) -> None:
    """Write a loadable PARE folder: `transformer/` (diffusers format), `vae/` (the frame autoencoder, also the
    image encoder of an I2V model), `text_encoder.safetensors`, `pare.json`."""
    i2v = arch.is_image_to_video(model)
    tokens = arch.WAN_TEXT_LEN if i2v else TEXT_TOKENS
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp / "transformer")
        autoencoder.save(tmp / VAE_DIR)
        text.save(tmp / "text_encoder.safetensors")
        artifacts.write_manifest(
            tmp, kind="teacher", base="", settings=record.get("config", {}),
            latent={"temporal": 1, "spatial": autoencoder.spatial, "channels": autoencoder.channels},
            decoder={"type": "frame-ae", "path": VAE_DIR},
            text_encoder={"type": "shapes-text", "path": "text_encoder.safetensors", "tokens": tokens},
            text_tokens=tokens, default_shape=[domain.FRAMES, domain.HEIGHT, domain.WIDTH],
            sampler=SAMPLER_DEFAULTS, training=record,
            **({"image_encoder": {"type": "shapes-frame-ae", "path": VAE_DIR}} if i2v else {}),
        )  # fmt: skip


def _autoencoder(out: Path, preset: Preset, cfg: TeacherTrainConfig, device, progress: bool) -> FrameAutoencoder:
    """The run's frame autoencoder: trained once (deterministic for a seed) and kept in `RUN/autoencoder`; with
    --init-from, the one the earlier model was trained on."""
    folder, record_file = out / AUTOENCODER_DIR, out / "autoencoder.json"
    if cfg.init_from:
        if not (folder / "config.json").is_file():
            FrameAutoencoder.load(teacher_folder(cfg.init_from) / VAE_DIR).save(folder)
            write_json(record_file, {"from": cfg.init_from})
        return _frozen(FrameAutoencoder.load(folder).to(device))
    made = json.loads(record_file.read_text()) if record_file.is_file() and (folder / "config.json").is_file() else {}
    if (made.get("config"), made.get("steps"), made.get("seed")) != (preset.autoencoder, preset.autoencoder_steps, cfg.seed):
        ae_cfg = AutoencoderTrainConfig(preset.autoencoder, preset.autoencoder_steps, seed=cfg.seed)
        ae, record = train_autoencoder(ae_cfg, device=device, progress=progress)
        ae.save(folder)
        write_json(record_file, {**record, "seed": cfg.seed})
    return _frozen(FrameAutoencoder.load(folder).to(device))


def _frozen(ae: FrameAutoencoder) -> FrameAutoencoder:
    ae.vae.requires_grad_(False)
    return ae


def teacher_folder(spec: str) -> Path:
    """The folder of a teacher spec: builtin:<name> or a directory holding pare.json."""
    from ..loading import BUILTIN_DIR

    folder = BUILTIN_DIR / spec.removeprefix("builtin:") if spec.startswith("builtin:") else Path(spec)
    require((folder / artifacts.MANIFEST).is_file(),
            f"--init-from {spec}: expected builtin:shapes-t2v or a teacher model folder (with pare.json)")  # fmt: skip
    return folder


def _init_from(spec: str, preset: str, model, text) -> dict:
    """Load an earlier teacher's weights into a fresh model and text encoder; returns its training record."""
    folder = teacher_folder(spec)
    manifest = artifacts.read_manifest(folder)
    require(manifest["kind"] == "teacher" and (folder / VAE_DIR).is_dir(),
            f"--init-from {folder}: expected a teacher model folder of this design (with {VAE_DIR}/)")  # fmt: skip
    earlier = WanTransformer3DModel.from_pretrained(folder / "transformer")
    want = PRESETS[preset].transformer
    differ = [k for k, v in want.items() if earlier.config.get(k) != (list(v) if isinstance(v, tuple) else v)]
    if PRESETS[preset].image and not arch.is_image_to_video(earlier):
        differ = [k for k in differ if k not in I2V_KEYS]  # a T2V teacher starts an I2V one
        state = earlier.state_dict()
        require(not differ, f"--init-from {folder}: its transformer differs from preset {preset!r} in {', '.join(differ)}")
        model.load_state_dict(t2v_to_i2v(state, model), strict=True)
    else:
        require(not differ, f"--init-from {folder}: its transformer differs from preset {preset!r} in {', '.join(differ)}")
        model.load_state_dict(earlier.state_dict())
    earlier_text = ShapesTextEncoder.load(folder / "text_encoder.safetensors")  # object tokens checked by `validate`
    # an encoder trained without object tokens loads into one with them unchanged: their map starts at zero
    missing = text.load_state_dict(earlier_text.state_dict(), strict=False).missing_keys
    assert set(missing) <= {"objects.weight"}, missing
    return manifest.get("training", {})


I2V_KEYS = ("in_channels", "image_dim", "added_kv_proj_dim")


def t2v_to_i2v(state: dict, model: WanTransformer3DModel) -> dict:
    """A T2V transformer's state dict made into one of the I2V `model`: the patch embedding's extra input channels
    (mask and condition) at zero, the image branch as `model` has it but for the value projection at zero. The
    result computes what the T2V model computes on the same (512-token) text, whatever the condition and image
    tokens."""
    own = model.state_dict()
    state = dict(state)
    patch = own["patch_embedding.weight"].clone().zero_()
    old = state["patch_embedding.weight"]
    patch[:, : old.shape[1]] = old
    state["patch_embedding.weight"] = patch
    for name, value in own.items():
        if name not in state:  # the image embedder, add_k_proj / add_v_proj, norm_added_k
            state[name] = torch.zeros_like(value) if ".add_v_proj." in name else value
    return state


class SceneRows(torch.utils.data.Dataset):
    """The teacher's data stream, rendered on the fly: row g is video g % B of step g // B's batch, which
    `TeacherStage` draws from the step's seed. The rows are read in order (`shuffle`), so step s's batch is rows
    s B to (s + 1) B - 1 and under several processes each takes its slice of it."""

    shuffle = False

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, g: int) -> int:
        return g


VAL_SEED = 999_983  # the validation videos' seed (held-out prompts, one noise level each, fixed noise)


class TeacherStage:
    """`training.run`'s stage for the teacher: flow matching on a seeded batch per step (one data stream,
    whatever the number of processes), a held-out validation loss, the domain evaluation of model/."""

    name = "teacher"

    def __init__(self, cfg: TeacherTrainConfig, autoencoder: FrameAutoencoder, evaluate=None, earlier: dict | None = None):
        self.cfg, self.autoencoder, self.evaluator, self.earlier = cfg, autoencoder, evaluate, earlier or {}
        self.rank, self.val_batch, self.compiled, self.grid = 0, None, None, None

    def prepare(self, accelerator) -> None:
        self.autoencoder.to(accelerator.device)
        self.rank, self.device = accelerator.process_index, accelerator.device

    def param_groups(self, model) -> list[dict]:
        # no weight decay on gains and biases: it would pull the q/k norm weights (the attention's sharpness) to 0
        params = list(model.parameters())
        common = {"lr": self.cfg.lr, "betas": (0.9, 0.99)}
        return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": self.cfg.weight_decay, **common},
                {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, **common}]  # fmt: skip

    def _batch(self, scenes: domain.Scenes, seed: int, transformer, dropout: float, frame_noise: float,
               context_frames: float):  # fmt: skip
        cfg = self.cfg
        if self.grid is None:  # the same for every batch
            latent = arch.LatentSpace(1, self.autoencoder.spatial, self.autoencoder.channels)
            self.grid = arch.token_grid(transformer.config, latent, domain.FRAMES, domain.HEIGHT, domain.WIDTH)
        grid = self.grid
        return flow_matching_batch(scenes, seed, dropout, self.autoencoder.encode, cfg.timestep_shift, frame_noise,
                                   grid.tokens_per_frame, context_frames, transformer.config.patch_size[0],
                                   self.autoencoder if PRESETS[cfg.preset].image else None)  # fmt: skip

    def _forward(self, model, *inputs):
        if self.cfg.compile and self.compiled is None:
            self.compiled = torch.compile(model)
        return (model if self.compiled is None else self.compiled)(*inputs)  # not `or`: a compiled module has no truth value

    def loss(self, model, batch, step):
        cfg, rows = self.cfg, batch
        require(bool((rows // cfg.batch_size == step).all()), f"the teacher's data rows {rows.tolist()} are not step {step}'s")
        seed = cfg.seed * 1_000_003 + step
        # every process draws the whole step's batch (the same on each) and takes its rows
        scenes = domain.sample_scenes(cfg.batch_size, "train", seed=seed, device=self.device,
                                      two_objects=cfg.two_objects, circling=cfg.circling)  # fmt: skip
        transformer = _unwrapped(model).transformer
        inputs = self._batch(scenes, seed, transformer, cfg.prompt_dropout, cfg.frame_noise, cfg.context_frames)
        if len(rows) < cfg.batch_size:
            pick = (rows % cfg.batch_size).to(inputs[0].device)
            inputs = [t[pick] for t in inputs]
        x_t, timestep, ids, target, *image = inputs
        v = self._forward(model, x_t, timestep, ids, *image)
        return frame_weighted_mse(v.float(), target, cfg.first_frame_weight), {}

    @torch.no_grad()
    def validate(self, model, data, rows, device, batch_size) -> dict:
        """Sums of the squared velocity error on held-out-prompt videos (fixed scenes, noise and noise levels)."""
        if self.val_batch is None:
            scenes = domain.sample_scenes(len(data), "heldout", seed=VAL_SEED, device=device,
                                          two_objects=self.cfg.two_objects)  # fmt: skip
            self.val_batch = self._batch(scenes, VAL_SEED, _unwrapped(model).transformer, 0.0, 0.0, 0.0)
        x_t, timestep, ids, target, *image = self.val_batch
        sums = {"squared_error": 0.0, "values": 0, "examples": len(rows)}
        for i in range(0, len(rows), batch_size):
            pick = torch.tensor(rows[i : i + batch_size], device=x_t.device)
            v = model(x_t[pick], timestep[pick], ids[pick], *(t[pick] for t in image)).float()
            sums["squared_error"] += ((v - target[pick]) ** 2).sum().item()
            sums["values"] += target[pick].numel()
        return sums

    def summarize(self, sums: dict) -> dict:
        return {"loss": sums["squared_error"] / max(1, sums["values"]), "examples": sums["examples"]}

    def export(self, folder, model, weights, record) -> None:
        transformer, text = copy.deepcopy(model.transformer), copy.deepcopy(model.text)
        TeacherNet(transformer, text).load_state_dict({k: v.detach().cpu() for k, v in weights.items()})
        export_model(folder, transformer.cpu(), text.cpu(), self.autoencoder, self.record(record))

    def record(self, record: dict) -> dict:
        """`training.run`'s record with the videos seen and, after --init-from, every earlier sitting and the
        totals over all of them."""
        record = {**record, "samples_seen": record["steps"] * self.cfg.batch_size}
        if self.earlier:
            earlier = self.earlier
            record["earlier_sittings"] = earlier.get("earlier_sittings", []) + [
                {k: earlier[k] for k in ("config", "steps", "samples_seen", "train_seconds", "sessions") if k in earlier}]
            record["total_samples_seen"] = earlier.get("total_samples_seen", earlier["samples_seen"]) + record["samples_seen"]
            record["total_train_seconds"] = round(earlier.get("total_train_seconds", earlier["train_seconds"])
                                                  + record["train_seconds"], 1)  # fmt: skip
        return record

    def evaluate(self, folder: Path, step: int) -> dict | None:
        if self.evaluator is None:
            return None
        return {"samples": step * self.cfg.batch_size, **self.evaluator(folder)}

    def evaluated(self, eval_file: Path) -> None:
        plot_eval_curve(eval_file, eval_file.parent / CURVE_FILE)


def _unwrapped(model):
    return getattr(model, "module", model)  # inside DDP


def train_teacher(cfg: TeacherTrainConfig, out: Path, command: str = "", progress: bool = True, evaluate=None) -> dict:
    """Train (or resume) a teacher in `out` with `training.run`; returns the training record (with "stopped"
    when a signal ended it early). `evaluate(model_folder)` -> scores is called every `eval_every` steps and at
    the end (the CLI passes the domain evaluator)."""
    cfg.validate()
    out = Path(out)
    require(not (out / OLD_CHECKPOINT).is_file(), f"{out} holds a checkpoint of an earlier PARE's teacher loop "
            f"({OLD_CHECKPOINT}): pick a new --out")  # fmt: skip
    record = {"command": command}
    resume_state(out, cfg, record)  # a refused resume must not retrain the autoencoder
    from accelerate import PartialState

    ranks = PartialState(cpu=cfg.device == "cpu")
    check_launch(ranks.num_processes)
    # under several processes the main one trains and writes the autoencoder; the others then load it
    with ranks.main_process_first():
        if ranks.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            write_json(out / RUN_FILE, asdict(cfg))
        autoencoder = _autoencoder(out, PRESETS[cfg.preset], cfg, ranks.device, progress and ranks.is_main_process)
    torch.manual_seed(cfg.seed)
    transformer, text = build(cfg.preset, "cpu", cfg.qk_gain, cfg.object_tokens)
    earlier = _init_from(cfg.init_from, cfg.preset, transformer, text) if cfg.init_from else {}
    stage = TeacherStage(cfg, autoencoder, evaluate, earlier)
    record = run(stage, TeacherNet(transformer, text), SceneRows(cfg.steps * cfg.batch_size),
                 SceneRows(cfg.val_examples), out, cfg, record, progress)  # fmt: skip
    return stage.record(record)


CURVE_METRICS = ("colour", "shape", "direction", "speed", "count")


def plot_eval_curve(eval_file: Path, png: Path, xlabel: str = "training videos seen") -> None:
    """Held-out accuracies (percent) against training samples seen, one line per metric, drawn to `png`."""
    matplotlib = optional_module("matplotlib")  # an extra: pare[eval]
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in eval_file.read_text().splitlines() if line.strip()]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 3.6))
    x = [r.get("samples", r["step"]) for r in rows]
    for metric in CURVE_METRICS:
        ax.plot(x, [r.get(metric, float("nan")) for r in rows], marker="o", ms=3, label=metric)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=3, loc="lower right")
    save_figure(fig, png)


# What a teacher must score on the 64 held-out prompts (`pare eval-shapes --n 64`) to ship as final: the
# accuracies in percent, and the Frechet distance at most FD_FACTOR times that of real videos to real videos.
BAR = {"colour": 90.0, "shape": 80.0, "direction": 85.0, "count": 85.0}
FD_FACTOR = 5.0
BAR_PROMPTS = 64
BAR_PSNR = 30.0  # an I2V teacher's frame 0 against the given frame, dB


def below_bar(evaluation: dict) -> list[str]:
    """What an `pare eval-shapes` scores.json misses of the bar, as "direction 13.3 < 85" (empty: it passes)."""
    scores, missing = evaluation["scores"], []
    if len(evaluation["prompts"]) < BAR_PROMPTS:
        missing.append(f"{len(evaluation['prompts'])} prompts < {BAR_PROMPTS}")
    missing += [f"{k} {scores[k]:.1f} < {v:g}" for k, v in BAR.items() if scores[k] < v]
    if scores["fd"] > FD_FACTOR * evaluation["real"]["fd"]:
        missing.append(f"FD {scores['fd']:.0f} > {FD_FACTOR:g} x {evaluation['real']['fd']:.0f}")
    if "first_frame_psnr" in scores and scores["first_frame_psnr"] < BAR_PSNR:
        missing.append(f"first-frame PSNR {scores['first_frame_psnr']:.1f} < {BAR_PSNR:g} dB")
    return missing


def ship(run_model: Path, dest: Path, evaluation: dict | None = None, guidance: float | None = None) -> list[str]:
    """Copy a run's `model/` folder to `dest` (e.g. pare/builtin/shapes-t2v) with `evaluation` (a `pare
    eval-shapes --out` scores.json) as its evaluator scores and `guidance` as its default CFG scale (the one the
    scores were measured at); it is marked provisional unless those scores meet the bar. Returns what they miss
    of it (["no scores"] without them)."""
    manifest = artifacts.read_manifest(run_model)
    require(manifest["kind"] == "teacher", f"{run_model} is not a teacher model folder")
    missing = below_bar(evaluation) if evaluation is not None else ["no scores"]
    if evaluation is not None and "image_encoder" in manifest and "first_frame_psnr" not in evaluation["scores"]:
        missing.append("no first-frame PSNR (score the I2V model with eval-shapes --model, not --videos)")
    with atomic_dir(dest) as tmp:
        shutil.copytree(run_model, tmp, dirs_exist_ok=True)
        manifest["provisional"] = bool(missing)
        if guidance is not None:
            manifest["sampler"]["guidance_scale"] = guidance
        if evaluation is not None:
            manifest["training"]["eval"] = {"prompts": len(evaluation["prompts"]), **evaluation["scores"],
                                            "real_videos": evaluation["real"]}  # fmt: skip
        write_json(tmp / artifacts.MANIFEST, manifest)
    return missing
