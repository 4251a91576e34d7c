"""Stage 1: distil the width-pruned student from the full teacher on teacher-trajectory data. The loop
(accelerate, checkpoints, resume, logging) is `pare.training.run`; this module supplies the loss: velocity MSE
on both CFG branches, optionally plus MSE of the guided velocity (what the sampler integrates) and per-block
hidden-state alignment to the teacher run online."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .. import arch, artifacts
from ..errors import require
from ..io import atomic_dir
from ..training import LoopConfig, run, split_data
from .data import read_index


@dataclass
class DistillConfig(LoopConfig):
    """Knobs of `pare distill` (and those of every training loop)."""

    lr: float = 2e-4
    weight_decay: float = 0.0
    align_weight: float = 0.0  # weight of per-block hidden-state alignment (runs the teacher online)
    guided_weight: float = 0.0  # weight of the guided velocity's MSE, v_u + g (v_c - v_u), g the data's guidance

    def validate(self) -> None:
        super().validate()
        require(self.lr > 0, f"--lr must be positive, got {self.lr}")
        require(self.align_weight >= 0, f"--align-weight must be >= 0, got {self.align_weight}")
        require(self.guided_weight >= 0, f"--guided-weight must be >= 0, got {self.guided_weight}")


def _block_outputs(model):
    """Forward hooks that collect every block's output; returns (list, handles)."""
    outs, handles = [], []
    for block in arch.blocks(model):
        handles.append(block.register_forward_hook(lambda m, a, o: outs.append(o)))
    return outs, handles


def stack_examples(items: list[dict], device) -> dict:
    """Examples of a trajectory dataset as one batch on `device`."""
    return {k: torch.stack([it[k] for it in items]).to(device) for k in items[0]}


def branches(example: dict) -> int:
    """Branches of a trajectory example (or batch): 2 (cond, uncond) from a teacher sampled with guidance, 1 (cond)
    from a guidance-free one."""
    return 2 if "v_uncond" in example else 1


def pair_inputs(batch: dict) -> tuple[dict, torch.Tensor]:
    """Forward inputs of the cond and uncond branches in one batch of 2B, and the teacher's velocities; of the
    cond branch alone (B rows) for a guidance-free teacher's data."""
    x, image = model_input(batch), batch.get("image_embeds")
    if branches(batch) == 1:
        t, text, target = batch["timestep"], batch["text"], batch["v_cond"]
    else:
        x, image = torch.cat([x, x]), None if image is None else torch.cat([image, image])
        t = torch.cat([batch["timestep"], batch["timestep"]])
        text = torch.cat([batch["text"], batch["null_text"]])
        target = torch.cat([batch["v_cond"], batch["v_uncond"]])
    inputs = {"hidden_states": x, "timestep": t, "encoder_hidden_states": text, "return_dict": False}
    return inputs | ({} if image is None else {"encoder_hidden_states_image": image}), target


def image_kwargs(batch: dict) -> dict:
    """The forward's image tokens of an I2V teacher's examples (none for T2V ones)."""
    return {"encoder_hidden_states_image": batch["image_embeds"]} if "image_embeds" in batch else {}


def model_input(batch: dict, x: torch.Tensor | None = None) -> torch.Tensor:
    """The transformer's `hidden_states` for x_t (`x`, else the batch's): an I2V teacher's examples carry the
    latent condition, concatenated along channels as Wan2.1 I2V takes it."""
    x = batch["x_t"] if x is None else x
    return torch.cat([x, batch["latent_condition"].to(x)], dim=1) if "latent_condition" in batch else x


def guided(v: torch.Tensor, guidance: float) -> torch.Tensor:
    """(2B, ...) velocities in `pair_inputs` order -> (B, ...) the classifier-free-guided velocity that the sampler
    integrates, v_u + g (v_c - v_u). Prompt-specific content (the colour of an object) lives in v_c - v_u, a small
    part of each branch that guidance multiplies by g: the plain branch MSE barely sees its errors."""
    cond, uncond = v.chunk(2)
    return uncond + guidance * (cond - uncond)


def velocity_loss(student, batch, teacher=None, align_weight: float = 0.0, guided_weight: float = 0.0,
                  guidance: float = 1.0) -> tuple[torch.Tensor, dict]:  # fmt: skip
    """MSE of the student's cond and uncond velocities to the teacher's, in one forward of 2B; plus, with
    `guided_weight`, the MSE of the guided velocity (guidance scale `guidance`); plus, with `align_weight`, the
    per-block hidden-state MSE to the teacher (relative to the teacher's energy)."""
    inputs, target = pair_inputs(batch)
    # hooks go on the model inside a DDP/FSDP wrapper, which has no `blocks` of its own
    outs, handles = _block_outputs(getattr(student, "module", student)) if align_weight else ([], [])
    try:
        v = student(**inputs)[0]
    finally:
        for h in handles:
            h.remove()
    v, target = v.float(), target.float()
    loss = torch.nn.functional.mse_loss(v, target)
    parts = {"velocity": loss.detach()}
    if guided_weight:  # (a guidance-free teacher's one branch is what its sampler integrates)
        g_loss = (torch.nn.functional.mse_loss(guided(v, guidance), guided(target, guidance)) if branches(batch) == 2
                  else loss)  # fmt: skip
        parts["guided"] = g_loss.detach()
        loss = loss + guided_weight * g_loss
    if align_weight:
        t_outs, t_handles = _block_outputs(getattr(teacher, "module", teacher))
        with torch.no_grad():
            teacher(**inputs)
        for h in t_handles:
            h.remove()
        align = sum(((s.float() - q.float()) ** 2).mean() / (q.float() ** 2).mean() for s, q in zip(outs, t_outs))
        align = align / len(outs)
        parts["align"] = align.detach()
        loss = loss + align_weight * align
    return loss, parts


@torch.no_grad()
def velocity_error_sums(model, data, rows: list[int], device, guidance: float, batch_size: int = 32) -> dict:
    """On the examples `rows`, [||model - teacher||^2, ||teacher||^2] of the velocities of both branches
    ("error") and of the guided velocity ("guided_error"): sums, so that processes' shares add up."""
    sums = {"error": [0.0, 0.0], "guided_error": [0.0, 0.0], "examples": len(rows)}
    for i in range(0, len(rows), batch_size):
        batch = stack_examples([data[j] for j in rows[i : i + batch_size]], device)
        inputs, target = pair_inputs(batch)
        v, target = model(**inputs)[0].float(), target.float()
        sampled = (guided(v, guidance), guided(target, guidance)) if branches(batch) == 2 else (v, target)
        for key, (a, b) in (("error", (v, target)), ("guided_error", sampled)):
            sums[key][0] += ((a - b) ** 2).sum().item()
            sums[key][1] += (b**2).sum().item()
    return sums


def velocity_errors(model, data, rows: list[int], device, guidance: float, batch_size: int = 32) -> dict:
    """||model - teacher||^2 / ||teacher||^2 of `velocity_error_sums`."""
    sums = velocity_error_sums(model, data, rows, device, guidance, batch_size)
    return {key: sums[key][0] / sums[key][1] for key in ("error", "guided_error")}


def export_model(folder: Path, trained, weights: dict, base: str, kind: str, record: dict, **manifest) -> None:
    """A trained student as a PARE folder, built from its full state dict (so alike after DDP and FSDP). Its
    base is the full model the pruned student came from, so compute is reported against it. `manifest`: more
    entries of its pare.json (a few-step model's "sampler")."""
    config = {k: v for k, v in trained.config.items() if not k.startswith("_")}
    with torch.device("meta"):  # private keys (e.g. _use_default_values) would reset entries to their defaults
        model = type(trained).from_config(config)
    model.load_state_dict({k: v.detach().cpu() for k, v in weights.items()}, assign=True)
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp / "transformer")
        artifacts.write_manifest(tmp, kind=kind, base=base, settings=record["config"], training=record, **manifest)


class DistillStage:
    """Stage 1: the student learns the teacher's velocities."""

    name = "distill"

    def __init__(self, config: DistillConfig, teacher, base: str, guidance: float, manifest: dict | None = None):
        self.config, self.teacher, self.base, self.guidance = config, teacher, base, guidance
        self.manifest = manifest or {}  # pare.json entries the export keeps (see `student_manifest`)

    def prepare(self, accelerator) -> None:
        if self.teacher is None:
            return
        dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32
        self.teacher = self.teacher.to(accelerator.device, dtype)
        if accelerator.distributed_type.name == "FSDP":
            # Sharded like the student, block by block, with torch's fully_shard: frozen, it stays out of accelerate
            # (whose FSDP2 prepare wants an optimiser with every model, and whose save_state would write it into
            # every checkpoint and pair it with the student's optimiser).
            from torch.distributed.fsdp import fully_shard

            for block in self.teacher.blocks:
                fully_shard(block)
            fully_shard(self.teacher)

    def param_groups(self, model) -> list[dict]:
        return [{"params": list(model.parameters()), "lr": self.config.lr, "weight_decay": self.config.weight_decay}]

    def loss(self, model, batch, step):
        return velocity_loss(model, batch, self.teacher, self.config.align_weight, self.config.guided_weight,
                             self.guidance)  # fmt: skip

    def validate(self, model, data, rows, device, batch_size) -> dict:
        return velocity_error_sums(model, data, rows, device, self.guidance, batch_size)

    def summarize(self, sums: dict) -> dict:
        return {"error": sums["error"][0] / sums["error"][1], "guided_error": sums["guided_error"][0] / sums["guided_error"][1],
                "examples": sums["examples"]}  # fmt: skip

    def export(self, folder, model, weights, record) -> None:
        export_model(folder, model, weights, self.base, "distilled", record, **self.manifest)


def student_base(student_bundle) -> str:
    return (student_bundle.manifest or {}).get("base") or student_bundle.spec


def student_manifest(student_bundle) -> dict:
    """The pare.json entries a trained export of `student_bundle` keeps: a few-step student's own sampler. A
    `pare step-distill` model (or its cut trained by it) records the teacher as its base and its K-step schedule
    in its own pare.json; without it here, its export would sample on the teacher's 25 guided steps."""
    sampler = (student_bundle.manifest or {}).get("sampler")
    return {"sampler": sampler} if sampler else {}


# What a student shares with the teacher it was cut from, whatever its widths: the teacher's data fits it
SHARED_CONFIG = ("in_channels", "out_channels", "patch_size", "text_dim", "image_dim", "num_layers")


def check_student_of(student_bundle, teacher_bundle, student_dir, teacher_spec: str) -> None:
    """Refuse a student that was not made from the teacher (another depth, input, patch or text width): its data
    would not fit, or would train it on another model's trajectories."""
    from ..profiling import config_record

    a, b = config_record(student_bundle.full_model), config_record(teacher_bundle.transformer)
    differ = [k for k in SHARED_CONFIG if a.get(k) != b.get(k)]
    require(not differ, f"{student_dir} was not made from {teacher_spec}: its {', '.join(differ)} differ")


def distill(teacher_spec: str, student_dir: Path, data_dir: Path, out: Path, config: DistillConfig,
            command: str = "", progress: bool = True) -> dict:  # fmt: skip
    """Run (or resume) stage-1 distillation; returns the final record. Works under `accelerate launch` and
    `torchrun` as in one process."""
    from ..loading import load_bundle
    from ..profiling import fingerprint

    config.validate()
    index = read_index(data_dir)
    student_bundle = load_bundle(str(student_dir))
    # frozen, the teacher needs no fp32 copy: bf16 where training computes in bf16 (`pare data`'s default dtype
    # on a GPU, so that the fingerprints of the same weights agree)
    teacher_dtype = torch.bfloat16 if config.uses_bf16 else torch.float32
    teacher_bundle = load_bundle(teacher_spec, weights=config.align_weight > 0, dtype=teacher_dtype)
    teacher = None
    if config.align_weight > 0:  # the teacher runs online: it must be the one that made the data
        require(index["fingerprint"] == fingerprint(teacher_bundle.transformer),
                f"{data_dir} was made by another teacher than {teacher_spec} (or by it loaded in another dtype than "
                f"{'bf16' if config.uses_bf16 else 'fp32'}: make the data with the --dtype training computes in)")  # fmt: skip
        teacher = teacher_bundle.transformer.eval().requires_grad_(False)
    check_student_of(student_bundle, teacher_bundle, student_dir, teacher_spec)
    train, val = split_data(data_dir)
    record = {"teacher": teacher_spec, "student": str(Path(student_dir).resolve()),
              "data": str(Path(data_dir).resolve()), "command": command}  # fmt: skip
    from ..routing import RoutedWanTransformer3DModel
    from ..routing.experts import is_step_experts

    require(not config.align_weight or not isinstance(student_bundle.transformer, RoutedWanTransformer3DModel),
            f"--align-weight pairs each student block with the teacher's: {student_dir} is a routed model (or step "
            "experts), whose blocks run on part of the batch; leave --align-weight out")  # fmt: skip
    stage = DistillStage(config, teacher, student_base(student_bundle), index["sampler"]["guidance_scale"],
                         student_manifest(student_bundle))
    stage.unused_parameters = is_step_experts(student_bundle.transformer)
    return run(stage, student_bundle.transformer, train, val, out, config, record, progress)
