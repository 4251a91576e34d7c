"""Peak memory per GPU and wall time of the stages `pare profile`, `prune`, `data`, `distill` and `route`, at any
model config and video shape, read off the model's structure on the meta device (no weights are loaded).

Memory. Each stage goes through phases (sampling calibration trajectories, Taylor importance, the optimiser
step, ...); a phase is what that phase's code keeps alive at its peak, by component, and the stage's peak is its
largest phase. Weights are counted from the parameters; activations per token from the widths of every block
(hidden D, self-attention q width, cross-attention q width, FFN width F), by following diffusers'
`WanTransformerBlock.forward` and `WanAttnProcessor` (0.42) tensor by tensor: what is alive at the widest point
of a no-grad forward, what autograd saves for the backward. Attention is the fused kernel (flash on a GPU,
`_scaled_dot_product_flash_attention_for_cpu` on a CPU), whose memory is linear in the tokens; the q/k norms are
`torch.nn.RMSNorm`, whose fused kernel keeps no fp32 copy and saves only its input, except under bf16 autocast
(the training stages on a GPU), where torch >= 2.12 runs it in fp32: an fp32 copy in, fp32 out, and the
attention then takes bf16 copies of q and k.

Time. FLOPs of the work the stage does, each forward counted by `pare.flops.count_flops` (2 x multiply-adds of
every matmul plus attention; an image-to-video model's `image_tokens` per video, by default Wan2.1's 257), a
training step as forward + backward (TRAIN_PASSES forwards' worth, one more with gradient checkpointing),
divided by a sustained rate per GPU times the processes.

Not counted: the CUDA context and the allocator's fragmentation (a few GiB on a GPU), host memory, and, under
FSDP, the communication buffers. The numbers are estimates of what the code allocates, checked against measured
peaks on the CPU (tests/test_estimate.py); the bf16/FSDP regime has not been measured on a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from . import arch
from .arch import TokenGrid
from .errors import require
from .flops import count_flops

FP32, BF16 = 4, 2
GIB = 2**30
# Forward + backward of a training step, in forwards: the backward computes gradients of the activations and of
# the weights, each about one forward's worth of matmuls.
TRAIN_PASSES = 3
# Forward + the backward of the Taylor pass: gradients of the activations only (autograd.grad asks for the gates'
# gradients, so the weights' gradients are never computed).
TAYLOR_PASSES = 2
DEFAULT_TFLOPS = 400.0  # sustained bf16 TFLOP/s of an H100-class GPU on large matmuls
# AdamW keeps two fp32 moments per parameter; its multi-tensor (foreach) step makes one more parameter-sized
# temporary (the square root of the second moment).
ADAM_MOMENTS, ADAM_STEP_TEMPORARIES = 2, 1
# FSDP keeps the block being computed and the one prefetched gathered (unsharded, in bf16), and the gradient of
# the block being reduced.
FSDP_GATHERED_BLOCKS, FSDP_GATHERED_GRADS = 2, 1
# Latents the UniPC scheduler holds while sampling: its last `solver_order` (2) converted outputs, the last
# sample, and the step being formed.
SCHEDULER_LATENTS = 4
# UMT5-XXL, Wan2.1's text encoder (text_encoder/config.json of the Wan-AI *-Diffusers checkpoints, stored in bf16):
# used for the public configs, which come without a folder to read it from.
WAN_TEXT_ENCODER = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                        feed_forward_proj="gated-gelu")  # fmt: skip


# --- what a stage keeps alive ----------------------------------------------------------------------------------


@dataclass
class Phase:
    """What one phase of a stage keeps alive at its peak, in bytes per GPU by component."""

    name: str
    parts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.parts.values())


@dataclass
class StageEstimate:
    """Memory per GPU (the largest phase) and FLOPs (all processes together) of one stage."""

    stage: str
    phases: list[Phase]
    flops: float
    processes: int = 1
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> Phase:
        return max(self.phases, key=lambda p: p.total)

    @property
    def total(self) -> int:
        return self.peak.total

    def hours(self, tflops: float) -> float:
        """Wall time at `tflops` sustained TFLOP/s per GPU, the work split evenly over the processes."""
        require(tflops > 0, f"--tflops must be positive, got {tflops}")
        return self.flops / (tflops * 1e12 * self.processes) / 3600

    def table(self, tflops: float) -> str:
        """The peak phase by component (GiB per GPU), then the time."""
        p = self.peak
        width = max(len(k) for k in [*p.parts, "total"])
        gpus = f"{self.processes} GPUs" if self.processes > 1 else "1 GPU"
        lines = [f"pare {self.stage}: estimated peak per GPU ({gpus}), in the phase: {p.name}",
                 f"  {'component':<{width}}  {'GiB':>7}"]  # fmt: skip
        lines += [f"  {k:<{width}}  {v / GIB:>7.2f}" for k, v in p.parts.items()]
        lines.append(f"  {'total':<{width}}  {p.total / GIB:>7.2f}")
        lines.append(f"  time: {self.flops:.3g} FLOP, about {format_hours(self.hours(tflops))} at {tflops:g} TFLOP/s "
                     f"per GPU")  # fmt: skip
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def format_hours(h: float) -> str:
    return f"{h * 60:.0f} min" if h < 1 else f"{h:.1f} h"


# --- activations of the Wan blocks -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Widths:
    """Per-token widths of one block: hidden, self-attention q/k/v, cross-attention q, FFN."""

    hidden: int
    self_q: int
    cross_q: int
    ffn: int


def block_widths(block: nn.Module) -> Widths:
    a1, a2 = arch.self_attention(block), arch.cross_attention(block)
    return Widths(a1.to_out[0].out_features, a1.to_q.out_features, a2.to_q.out_features, arch.ffn_width(block))


def _copy32(act: int) -> int:
    """Bytes per element of an explicit `.float()` copy: none when activations are fp32 already (a no-op)."""
    return FP32 if act < FP32 else 0


def _norm_bytes(act: int, autocast: bool) -> int:
    """Bytes per element of the q/k norms' input and output: fp32 under autocast (its fp32 policy for rms_norm)."""
    return FP32 if autocast else act


def forward_point_bytes(w: Widths, act: int, autocast: bool = False) -> dict[str, int]:
    """Bytes per token and sequence alive at the widest points of one block's no-grad forward, its input
    included (diffusers' block keeps its input, the running hidden state, the last norm output and the last
    attention output alive while it computes the next part). `act`: bytes of the activations' dtype."""
    D, Q, C, F, c, n = w.hidden, w.self_q, w.cross_q, w.ffn, _copy32(act), _norm_bytes(act, autocast)
    return {
        # input + norm1 output; normalised q and k, v, RoPE's output and its three fp32 half-width products
        "self-attention": 2 * act * D + (3 * n + act + 3 * FP32 // 2) * Q,
        # input, norm1 output, attention output; fp32 copy of the hidden state, gated output, their sum
        "self-attention residual": 3 * act * D + (c + 2 * FP32) * D,
        # input, hidden, norm2 output, the last attention output; q and normalised q, or the attention's output
        # and its projection
        "cross-attention": max(4 * act * D + (act + n) * C, 5 * act * D + act * C),
        # input, hidden, norm3 output, cross-attention output; the FFN's hidden layer before and after the GELU
        "FFN": 4 * act * D + 2 * act * F,
        # the same and the FFN output; fp32 copies of hidden and FFN output, their gated sum
        "FFN residual": 5 * act * D + max(2 * c + FP32, c + 2 * FP32) * D,
    }


def saved_bytes(w: Widths, act: int, gates: bool = False, autocast: bool = False) -> int:
    """Bytes per token and sequence that autograd saves for the backward of one block (parameters requiring
    gradients), without the block's output. `gates`: the head and channel gates of the Taylor pass, which add
    a gated copy of each attention output and of the FFN's hidden layer."""
    D, Q, C, F, c, n = w.hidden, w.self_q, w.cross_q, w.ffn, _copy32(act), _norm_bytes(act, autocast)
    # norm1 input (fp32 copy) and output, modulated input of the projections, attention output (saved by the gate
    # multiply), norm2 input (fp32), its output, norm3 input (fp32) and output, FFN input, FFN output (fp32)
    hidden = (c + 4 * act + 5 * FP32) * D
    self_attn = (2 * n + 4 * act) * Q  # the norms' inputs (q, k); the attention's q, k, v and output
    cross_attn = (n + 2 * act) * C  # the norm's input; the attention's q and output
    ffn = 2 * act * F  # before and after the GELU
    gated = act * (Q + C + F) if gates else 0
    return hidden + self_attn + cross_attn + ffn + gated


def backward_bytes(w: Widths, act: int) -> int:
    """Bytes per token and sequence of gradients in flight while one block is back-propagated: the gradient of
    the FFN's hidden layer (before and after the GELU) and of the fp32 hidden state, twice."""
    return 2 * act * w.ffn + 2 * FP32 * w.hidden


@dataclass(frozen=True)
class Activations:
    """Activation memory of a Wan transformer on a token grid, per forward of `seqs` sequences."""

    model: nn.Module
    tokens: int  # S
    text_tokens: int  # L
    act: int  # bytes of the activations' dtype
    autocast: bool = False  # bf16 autocast over fp32 or bf16 weights (the training stages on a GPU)

    @property
    def widths(self) -> list[Widths]:
        return [block_widths(b) for b in arch.blocks(self.model)]

    @property
    def hidden(self) -> int:
        c = self.model.config
        return c.num_attention_heads * c.attention_head_dim

    def _shared(self, seqs: int) -> int:
        """Inputs every block reads: text context (as given and projected), RoPE tables (fp32 cos and sin)."""
        c = self.model.config
        text = seqs * self.text_tokens * (c.text_dim + self.hidden) * self.act
        rope = 2 * self.tokens * c.attention_head_dim * FP32
        return text + rope

    def forward(self, seqs: int) -> int:
        """Peak bytes of a no-grad forward of `seqs` sequences (its widest block)."""
        widest = max(max(forward_point_bytes(w, self.act, self.autocast).values()) for w in self.widths)
        return seqs * self.tokens * widest + self._shared(seqs)

    def block_outputs(self, seqs: int, blocks: int | None = None) -> int:
        """Bytes of `blocks` (default: all) blocks' outputs, i.e. the inputs that gradient checkpointing keeps."""
        n = len(self.widths) if blocks is None else blocks
        return n * seqs * self.tokens * self.hidden * self.act

    def training(self, seqs: int, checkpointing: bool, gates: bool = False) -> dict[str, int]:
        """Bytes alive at the start of the backward of one training forward of `seqs` sequences, by part: every
        block's input, what autograd saved inside the blocks (all of them, or with checkpointing the one being
        recomputed), the output head's, the gradients in flight, the text and RoPE inputs."""
        ws = self.widths
        per_block = [saved_bytes(w, self.act, gates, self.autocast) for w in ws]
        tokens = seqs * self.tokens
        head = (2 * FP32 + self.act) * self.hidden  # norm_out's fp32 input and output, proj_out's input
        return {
            "block inputs": self.block_outputs(seqs),
            ("recomputed block" if checkpointing else "saved in the blocks"): tokens * (
                max(per_block) if checkpointing else sum(per_block)),  # fmt: skip
            "output head": tokens * head,
            "gradients in flight": tokens * max(backward_bytes(w, self.act) for w in ws),
            "text and RoPE": self._shared(seqs),
        }


# --- sizes of what the stages hold ---------------------------------------------------------------------------


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def latent_elements(model: nn.Module, grid: TokenGrid) -> int:
    """Elements of one latent video (C, F', H', W') on this token grid."""
    c = model.config
    return c.out_channels * grid.tokens * math.prod(c.patch_size)


def text_encoder_bytes(spec_or_folder: str | None) -> int:
    """Bytes of the text encoder that the sampling stages move to the GPU and keep there: UMT5 of a Wan pipeline
    folder, or Wan2.1's UMT5-XXL for the public configs, in its stored dtype; 0 for anything else (a built-in
    model's own encoder is tiny; precomputed embeddings need none)."""
    from pathlib import Path

    from .loading import WAN_CONFIGS

    if spec_or_folder is None:
        return 0
    folder = Path(str(spec_or_folder)).expanduser() / "text_encoder"
    if str(spec_or_folder).lower() in WAN_CONFIGS:
        config, dtype_bytes = WAN_TEXT_ENCODER, BF16
    elif (folder / "config.json").is_file():
        import json

        config = json.loads((folder / "config.json").read_text())
        dtype_bytes = FP32 if config.get("dtype", config.get("torch_dtype")) in ("float32", None) else BF16
    else:
        return 0
    from transformers import UMT5Config, UMT5EncoderModel

    known = {k: v for k, v in config.items() if k in UMT5Config().to_dict()}
    with torch.device("meta"):
        encoder = UMT5EncoderModel(UMT5Config(**known))
    return param_count(encoder) * dtype_bytes


def pruned_structure(model: nn.Module, heads: float, ffn: float, multiple_of: int = 1) -> nn.Module:
    """The structure (meta device) of `model` with `heads` of the heads and `ffn` of the FFN channels of every
    block removed, as the uniform allocation of `pare prune` keeps them (the global one keeps as many in all)."""
    from .pruning.model import PrunedWanTransformer3DModel

    c = model.config
    H, F = c.num_attention_heads, c.ffn_dim
    require(0 <= heads < 1 and 0 <= ffn < 1, f"--heads and --ffn must be in [0, 1), got {heads} and {ffn}")
    require(H % multiple_of == 0, f"{H} heads are not a multiple of --heads-multiple-of {multiple_of}")
    keep_h = max(1, round((1 - heads) * (H // multiple_of))) * multiple_of  # in units of K, as `allocate` does
    keep_f = max(1, round((1 - ffn) * F))
    n = c.num_layers
    config = {k: v for k, v in c.items() if not k.startswith("_") and k not in ("self_heads", "cross_heads", "ffn_dims")}
    with torch.device("meta"):
        return PrunedWanTransformer3DModel(**config, self_heads=[keep_h] * n, cross_heads=[keep_h] * n,
                                           ffn_dims=[keep_f] * n)  # fmt: skip


# --- the stages ------------------------------------------------------------------------------------------------


def _cfg(guidance: float) -> int:
    """Sequences per video in a sampling forward: cond and uncond batched together when guidance is on."""
    return 2 if guidance > 1 else 1


def taylor_checkpointing() -> bool:
    """Whether `pare profile`'s Taylor pass recomputes the blocks in its backward: the default of
    `taylor_importance`'s `checkpointing`, which `profile` leaves as it is."""
    import inspect

    from .profiling.importance import taylor_importance

    p = inspect.signature(taylor_importance).parameters.get("checkpointing")
    return bool(p.default) if p is not None else False


def estimate_profile(model: nn.Module, grid: TokenGrid, text_tokens: int, config, *, weight_bytes: int = BF16,
                     guidance: float = 5.0, text_encoder: int = 0, gradient_checkpointing: bool | None = None,
                     image_tokens: int | None = None) -> StageEstimate:  # fmt: skip
    """`pare profile` (`config`: a `pare.profiling.ProfileConfig`): calibration trajectories, the attention
    probe, Taylor importance (a training forward of `batch_size` inputs with gates; `gradient_checkpointing`:
    default as `taylor_checkpointing()`), removal."""
    from .profiling.roles import probe_extra_bytes

    config = config.resolved({})  # unset steps: 25, as the library's sampler (callers that know the model's pass it)
    if gradient_checkpointing is None:
        gradient_checkpointing = taylor_checkpointing()
    W = param_count(model) * weight_bytes
    acts = Activations(model, grid.tokens, text_tokens, weight_bytes)
    base = {"weights": W, "text encoder": text_encoder}
    inputs = config.videos * len(config.timesteps)
    B, cfg = min(config.batch_size, inputs), _cfg(guidance)
    attn = arch.self_attention(arch.blocks(model)[0])
    probe = probe_extra_bytes(arch.num_heads(attn), arch.head_dim(attn), grid, config.queries, B, weight_bytes)
    # the chain's block output, and in fp32 that output, the output without a head and their difference
    removal_chain = B * grid.tokens * acts.hidden * (weight_bytes + 3 * FP32)
    phases = [
        Phase("calibration trajectories", {**base, "activations": acts.forward(cfg * min(B, config.videos))}),
        Phase("attention probe", {**base, "activations": acts.forward(B), "probe": probe}),
        Phase("Taylor importance", {**base, **acts.training(B, gradient_checkpointing, gates=True)}),
    ]
    if config.removal != "none":
        phases.append(Phase(f"removal ({config.removal})", {**base, "activations": acts.forward(B) + removal_chain}))
    report = count_flops(model, grid, text_tokens, image_tokens)
    fwd = report.total()
    heads = arch.num_heads(attn)
    removal = {"block": inputs * ((heads + 1) * report.block_flops() + report.embed),
               "model": inputs * (1 + len(report.blocks) * heads) * fwd, "none": 0}[config.removal]  # fmt: skip
    flops = (config.videos * config.steps * cfg * fwd  # trajectories
             + inputs * fwd  # probe
             + inputs * (TAYLOR_PASSES + gradient_checkpointing) * fwd + removal)  # fmt: skip
    notes = [] if gradient_checkpointing else ["the Taylor pass keeps every block's activations (no gradient "
                                               "checkpointing)"]  # fmt: skip
    return StageEstimate("profile", phases, flops, 1, notes)


def estimate_prune(model: nn.Module, student: nn.Module, grid: TokenGrid, text_tokens: int, config, *,
                   sampling_steps: int, kept_steps: int, weight_bytes: int = BF16, guidance: float = 5.0,
                   text_encoder: int = 0, image_tokens: int | None = None) -> StageEstimate:  # fmt: skip
    """`pare prune` (`config`: a `pare.pruning.PruneConfig`): calibration trajectories of the teacher; its outputs
    and q/k-norm statistics on them (batches of 8); then the teacher sliced in place, block by block (one block's
    slices beside it); then the errors of the pruned model against the kept outputs."""
    W, Ws = param_count(model) * weight_bytes, param_count(student) * weight_bytes
    acts = Activations(model, grid.tokens, text_tokens, weight_bytes)
    cfg, videos = _cfg(guidance), config.calibration_videos
    base = {"teacher weights": W, "text encoder": text_encoder}
    inputs = videos * kept_steps
    batch = min(8, inputs)  # prune_model's error batches
    latent = latent_elements(model, grid)
    on_device = inputs * (latent + text_tokens * model.config.text_dim) * weight_bytes  # every calibration input
    phases = [Phase("calibration trajectories", {**base, "activations": acts.forward(cfg * min(8, videos))})]
    removes = config.heads > 0 or config.ffn > 0
    if removes:
        # the profile's fingerprint is checked first: a position-weighted sum over each tensor (its fp32 copy, the
        # weights, the product and its float64 sum), the largest tensor at the peak
        largest = max(p.numel() for p in model.parameters())
        phases.append(Phase("fingerprint", {**base, "hashing the largest tensor": largest * (
            3 * FP32 + (FP32 if weight_bytes < FP32 else 0))}))  # fmt: skip
        # the q/k-norm statistics hook an fp32 copy of each projection and its square onto the forward
        stats = batch * grid.tokens * arch.self_attention(arch.blocks(model)[0]).to_q.out_features * (
            _copy32(weight_bytes) + FP32)  # fmt: skip
        kept = {"calibration inputs": on_device, "teacher outputs": inputs * latent * FP32}
        block = max(param_count(b) for b in arch.blocks(student)) * weight_bytes
        student_acts = Activations(student, grid.tokens, text_tokens, weight_bytes).forward(batch)
        phases += [Phase("outputs and norm statistics", {**base, **kept, "activations": acts.forward(batch) + stats}),
                   Phase("slicing in place", {**base, **kept, "one block's slices": block}),
                   Phase("errors", {"pruned weights": Ws, "text encoder": text_encoder, **kept,
                                    "activations": student_acts})]  # fmt: skip
    else:
        phases.append(Phase("slicing in place", {**base, "one block's slices": 0}))
    fwd = count_flops(model, grid, text_tokens, image_tokens).total()
    fwd_s = count_flops(student, grid, text_tokens, image_tokens).total()
    passes = (1 + config.correct_norms)  # error of the plain slice, and of the corrected one
    flops = (videos * sampling_steps * cfg * fwd + inputs * ((1 + config.correct_norms) * fwd + passes * fwd_s)
             if removes else 0)  # fmt: skip
    return StageEstimate("prune", phases, flops)


def estimate_data(model: nn.Module, grid: TokenGrid, text_tokens: int, config, *, sampling_steps: int,
                  weight_bytes: int = BF16, guidance: float = 5.0, text_encoder: int = 0,
                  on_cpu: bool = False, image_tokens: int | None = None) -> StageEstimate:  # fmt: skip
    """`pare data` (`config`: a `pare.distill.data.DataConfig`): each shard's trajectories are sampled together
    (CFG batched) and every step's x_t, guided velocity and both branches stay on the device until the shard is
    packed: fp32 concatenations, then storage-dtype copies, one at a time on their way to the host (`on_cpu`: the
    device is the host, and all three stay until the shard is written). With `config.student_steps` K only K
    steps of each trajectory are kept."""
    from .loading import dtype_named

    W = param_count(model) * weight_bytes
    acts = Activations(model, grid.tokens, text_tokens, weight_bytes)
    B, cfg = min(config.shard_videos, config.videos), _cfg(guidance)
    require(cfg == 2, "teacher data needs classifier-free guidance (guidance > 1)")
    elements = latent_elements(model, grid)
    video = elements * FP32  # one fp32 latent
    per_step = (2 + cfg) * B * video  # x_t, guided velocity, and the (2B) output both branches are views of
    require((config.student_steps or 0) <= sampling_steps, f"--student-steps {config.student_steps}: the teacher "
            f"samples in {sampling_steps} steps")  # fmt: skip
    kept = config.student_steps or sampling_steps
    store = dtype_named(config.store, "--store").itemsize
    base = {"weights": W, "text encoder": text_encoder}
    phases = [
        Phase("sampling a shard", {**base, "activations": acts.forward(cfg * B),
                                   "model input (cond and uncond)": cfg * B * elements * weight_bytes,
                                   "scheduler state": SCHEDULER_LATENTS * B * video,
                                   "trajectory so far": (kept - 1) * per_step}),  # fmt: skip
        Phase("packing a shard", {**base, "trajectory": kept * per_step,
                                  "concatenated x_t and velocities": 3 * kept * B * video,
                                  "storage-dtype copies": (3 if on_cpu else 1) * kept * B * elements * store}),  # fmt: skip
    ]
    fwd = count_flops(model, grid, text_tokens, image_tokens).total()
    return StageEstimate("data", phases, config.videos * sampling_steps * cfg * fwd)


def _training_phases(model: nn.Module, grid: TokenGrid, text_tokens: int, config, processes: int, fsdp: bool,
                     extra_saved: int = 0, online: dict | None = None, branches: int = 2) -> list[Phase]:  # fmt: skip
    """The phases of `pare.training.run`: the backward (the training forward's saved tensors) and the optimiser
    step. The trained model is loaded in fp32 (master weights); with bf16 (on a GPU) the forward runs under
    autocast: under FSDP on bf16 gathered copies of one block at a time, otherwise on bf16 copies of every weight
    that autocast caches for the whole forward. `extra_saved`: bytes per token and sequence a stage's forward saves
    besides the model's own (outside the checkpointed blocks); `online`: what a teacher run in the loss adds;
    `branches`: sequences per example (2: the cond + uncond pair of a guided teacher's data, 1: a guidance-free
    one's)."""
    P = param_count(model)
    bf16 = config.bf16 if config.bf16 is not None else True  # the estimate is for a GPU unless told otherwise
    act = BF16 if bf16 else FP32
    shard = processes if fsdp else 1
    require(config.batch_size % processes == 0, f"--batch-size {config.batch_size} must be divisible by the "
            f"{processes} processes")  # fmt: skip
    seqs = branches * (config.batch_size // processes)
    acts = Activations(model, grid.tokens, text_tokens, act, autocast=bf16)
    state = {"master weights (fp32)": P * FP32 // shard}
    if fsdp:
        block = max(param_count(b) for b in arch.blocks(model))
        state["gathered blocks (bf16)"] = (FSDP_GATHERED_BLOCKS + FSDP_GATHERED_GRADS) * block * act
    elif bf16:
        state["autocast bf16 weight copies"] = P * BF16
    if processes > 1 and not fsdp:
        state["DDP gradient buckets"] = P * FP32
    if config.ema_decay:
        state["EMA weights"] = P * FP32
    moments = ADAM_MOMENTS * P * FP32 // shard
    grads = P * FP32 // shard
    activations = acts.training(seqs, config.gradient_checkpointing)
    if extra_saved:
        activations["routed residuals"] = seqs * grid.tokens * extra_saved
    # backward: the saved activations shrink as the gradients fill up; the larger of the two is the peak
    held = activations if sum(activations.values()) >= grads else {"gradients": grads}
    return [
        Phase("backward", {**state, "AdamW moments": moments, **(online or {}), **held}),
        Phase("optimiser step", {**state, "AdamW moments": moments, "gradients": grads,
                                 "AdamW step temporaries": ADAM_STEP_TEMPORARIES * P * FP32 // shard}),  # fmt: skip
    ]


def _train_flops(fwd: float, config, examples_per_step: int, branches: int = 2) -> float:
    passes = TRAIN_PASSES + config.gradient_checkpointing
    return (config.steps * examples_per_step * branches * passes * fwd
            + 2 * branches * config.val_examples * fwd)  # + the two validations  # fmt: skip


def estimate_distill(student: nn.Module, teacher: nn.Module, grid: TokenGrid, text_tokens: int, config, *,
                     processes: int = 1, fsdp: bool | None = None, branches: int = 2,
                     image_tokens: int | None = None) -> StageEstimate:  # fmt: skip
    """`pare distill` (`config`: a `pare.distill.DistillConfig`) on `processes` processes, each holding
    batch_size / processes examples (`branches` sequences each: 2 from a guided teacher, 1 from a guidance-free
    one); FSDP full sharding when `fsdp` (default: more than one process). With --align-weight the teacher runs
    online: sharded like the student under FSDP (fp32 shards, bf16 gathered blocks), else a bf16 copy; both models'
    block outputs are kept for the alignment loss."""
    fsdp = processes > 1 if fsdp is None else fsdp
    bf16 = config.bf16 if config.bf16 is not None else True
    act = BF16 if bf16 else FP32
    online = None
    seqs = branches * (config.batch_size // max(1, processes))
    if config.align_weight:
        t = Activations(teacher, grid.tokens, text_tokens, act)
        Pt = param_count(teacher)
        if fsdp:
            block = max(param_count(b) for b in arch.blocks(teacher))
            weights = Pt * FP32 // processes + FSDP_GATHERED_BLOCKS * block * act
        else:
            weights = Pt * act
        # the student's block outputs (held by the alignment hooks) and the teacher's, next to its forward
        kept = t.block_outputs(seqs) + Activations(student, grid.tokens, text_tokens, act).block_outputs(seqs)
        online = {"teacher weights": weights, "block outputs for alignment": kept}
    phases = _training_phases(student, grid, text_tokens, config, processes, fsdp, online=online, branches=branches)
    fwd = count_flops(student, grid, text_tokens, image_tokens).total()
    flops = _train_flops(fwd, config, config.batch_size, branches)
    if config.align_weight:
        flops += config.steps * config.batch_size * branches * count_flops(teacher, grid, text_tokens, image_tokens).total()
    notes = [f"FSDP over {processes} processes" if fsdp else ("DDP" if processes > 1 else "one process")]
    return StageEstimate("distill", phases, flops, processes, notes)


def estimate_route(student: nn.Module, grid: TokenGrid, text_tokens: int, config, *, processes: int = 1,
                   fsdp: bool | None = None, train_examples: int | None = None, branches: int = 2,
                   image_tokens: int | None = None) -> StageEstimate:  # fmt: skip
    """`pare route` (`config`: a `pare.routing.RouteConfig`): first the block importance of a sample of the
    training examples (on every process a whole copy of the student, bf16 under bf16 else the fp32 student, at
    batch_size / processes examples, one hidden state held beside the forward), then router and student trained
    as in distillation, each routed block adding its gated residual x + g (f(x) - x) to what is saved unless
    gradient checkpointing recomputes it with the block. `branches`: sequences per example, as in distillation."""
    fsdp = processes > 1 if fsdp is None else fsdp
    bf16 = config.bf16 if config.bf16 is not None else True
    act = BF16 if bf16 else FP32
    seqs = branches * max(1, config.batch_size // processes)
    P = param_count(student)
    acts = Activations(student, grid.tokens, text_tokens, act, autocast=bf16)
    D = acts.hidden
    # x + g (f(x) - x) of every routed block saves f(x) - x for the gate's gradient, unless checkpointing
    # recomputes it with the block
    gated = config.router != "static" and not config.gradient_checkpointing
    routed = len(arch.blocks(student)) - config.always_run if gated else 0
    phases = _training_phases(student, grid, text_tokens, config, processes, fsdp, extra_saved=routed * act * D,
                              branches=branches)  # fmt: skip
    importance = config.router == "static" or config.importance_weight > 0
    report = count_flops(student, grid, text_tokens, image_tokens)
    fwd = report.total()
    flops = _train_flops(fwd, config, config.batch_size, branches)
    if importance:
        weights = {"student weights (bf16 copy)": P * BF16} if bf16 else {"student weights (fp32)": P * FP32}
        phases.insert(0, Phase("block importance", {
            **weights, "the skipped block's input": acts.block_outputs(seqs, 1), "activations": acts.forward(seqs)}))
        n = train_examples if train_examples is not None else config.importance_examples
        examples = min(n, config.importance_examples or n)
        L = len(report.blocks)
        # per batch: the full pass, then for each block i the blocks after it (the ones before are replayed)
        skipped = sum(sum(b.total for b in report.blocks[i + 1:]) for i in range(L)) + L * (report.embed + report.head)
        flops += examples * branches * (fwd + skipped)
    if config.router != "static" and config.warm_start_steps > 0:
        # the router fitted alone on every process, before the training phases: the router's inputs (temb, pooled
        # tokens, pooled text) of every measured example, kept on the device, and what computes them (the model
        # but its routed blocks, fp32, which stay home); the router itself is a few MLP layers, left out
        n = train_examples if train_examples is not None else config.importance_examples
        examples = min(n, config.importance_examples or n)
        routed_blocks = sum(param_count(b) for b in arch.blocks(student)[config.always_run:])
        phases.insert(1 if importance else 0, Phase("router warm start", {
            "the model but its routed blocks (fp32)": (P - routed_blocks) * FP32,
            "router inputs of the measured examples": 3 * branches * examples * D * FP32,
            "a batch through the always-run blocks": acts.block_outputs(seqs, max(1, config.always_run))}))
    notes = [f"FSDP over {processes} processes" if fsdp else ("DDP" if processes > 1 else "one process")]
    return StageEstimate("route", phases, flops, processes, notes)
