"""Stage 1: distil the width-pruned student from the full teacher on teacher-trajectory data.

Recipe, in set-up order: the Accelerator first (it decides device, process group, mixed precision); then the
student (and, for hidden-state alignment, the teacher), the optimiser and the data loader, all handed to
`accelerator.prepare` so that the same code runs in one process, data-parallel, or under FSDP (`accelerate
launch --use_fsdp ...`); then the last checkpoint, if the output folder has one. The data order is a pure
function of the step (`StepBatches`), so a resumed run sees exactly the batches an uninterrupted one would, and
with `split_batches` every process takes its slice of the same global batch.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import arch, artifacts
from ..errors import PareError, require
from ..io import atomic_dir, replace_dir, write_json
from .data import TrajectoryData, read_index

CHECKPOINT, LOG_FILE, STATE_FILE = "checkpoint", "log.jsonl", "state.json"


@dataclass
class DistillConfig:
    """Knobs of `pare distill`."""

    steps: int = 2000
    batch_size: int = 32  # global batch (all processes together)
    lr: float = 2e-4
    warmup_steps: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.0  # 0 turns EMA off
    align_weight: float = 0.0  # weight of per-block hidden-state alignment (runs the teacher online)
    gradient_checkpointing: bool = False
    bf16: bool | None = None  # default: on for CUDA
    checkpoint_every: int = 200
    log_every: int = 10
    val_examples: int = 256
    seed: int = 0

    def validate(self) -> None:
        require(self.steps >= 1 and self.batch_size >= 1, "--steps and --batch-size must be at least 1")
        require(self.lr > 0, f"--lr must be positive, got {self.lr}")
        require(0 <= self.ema_decay < 1, f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        require(self.align_weight >= 0, f"--align-weight must be >= 0, got {self.align_weight}")


class StepBatches(torch.utils.data.Sampler):
    """Batch sampler whose batch at step s is a pure function of (seed, s): epochs are fresh permutations."""

    def __init__(self, n: int, batch: int, seed: int, start: int, stop: int):
        self.n, self.batch, self.seed, self.start, self.stop = n, batch, seed, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self):
        perms: dict[int, torch.Tensor] = {}
        for step in range(self.start, self.stop):
            rows = []
            for g in range(step * self.batch, (step + 1) * self.batch):
                epoch = g // self.n
                if epoch not in perms:
                    perms.clear()
                    perms[epoch] = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
                rows.append(int(perms[epoch][g % self.n]))
            yield rows


class EMA:
    """Exponential moving average of parameters, checkpointed with the Accelerator."""

    def __init__(self, params, decay: float):
        self.decay = decay
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self, params) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach() for p in params], 1 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        for s, v in zip(self.shadow, state["shadow"]):
            s.copy_(v)


def _block_outputs(model):
    """Forward hooks that collect every block's output; returns (list, handles)."""
    outs, handles = [], []
    for block in arch.blocks(model):
        handles.append(block.register_forward_hook(lambda m, a, o: outs.append(o)))
    return outs, handles


def velocity_loss(student, batch, teacher=None, align_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """MSE of the student's cond and uncond velocities to the teacher's, in one forward of 2B; plus, with
    `align_weight`, the per-block hidden-state MSE to the teacher (relative to the teacher's energy)."""
    x = torch.cat([batch["x_t"], batch["x_t"]])
    t = torch.cat([batch["timestep"], batch["timestep"]])
    text = torch.cat([batch["text"], batch["null_text"]])
    target = torch.cat([batch["v_cond"], batch["v_uncond"]])
    outs, handles = _block_outputs(student) if align_weight else ([], [])
    try:
        v = student(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    finally:
        for h in handles:
            h.remove()
    loss = torch.nn.functional.mse_loss(v.float(), target.float())
    parts = {"velocity": loss.detach()}
    if align_weight:
        t_outs, t_handles = _block_outputs(teacher)
        with torch.no_grad():
            teacher(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)
        for h in t_handles:
            h.remove()
        align = sum(((s.float() - q.float()) ** 2).mean() / (q.float() ** 2).mean() for s, q in zip(outs, t_outs))
        align = align / len(outs)
        parts["align"] = align.detach()
        loss = loss + align_weight * align
    return loss, parts


@torch.no_grad()
def relative_error(student, data: TrajectoryData, rows: list[int], device, batch_size: int = 32) -> float:
    """||student - teacher||^2 / ||teacher||^2 of the velocities (both branches) on the examples `rows`."""
    num = den = 0.0
    for i in range(0, len(rows), batch_size):
        items = [data[j] for j in rows[i : i + batch_size]]
        batch = {k: torch.stack([it[k] for it in items]).to(device) for k in items[0]}
        x = torch.cat([batch["x_t"], batch["x_t"]])
        t = torch.cat([batch["timestep"], batch["timestep"]])
        text = torch.cat([batch["text"], batch["null_text"]])
        target = torch.cat([batch["v_cond"], batch["v_uncond"]])
        v = student(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0].float()
        num += ((v - target) ** 2).sum().item()
        den += (target**2).sum().item()
    return num / den


def distill(teacher_spec: str, student_dir: Path, data_dir: Path, out: Path, config: DistillConfig,
            command: str = "", progress: bool = True) -> dict:  # fmt: skip
    """Run (or resume) stage-1 distillation; returns the final record. Works under `accelerate launch` and
    `torchrun` as in one process."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from ..loading import load_bundle
    from ..profiling import fingerprint

    config.validate()
    out = Path(out)
    use_cuda = torch.cuda.is_available()
    bf16 = config.bf16 if config.bf16 is not None else use_cuda
    acc = Accelerator(split_batches=True, mixed_precision="bf16" if bf16 else "no")
    require(config.batch_size % acc.num_processes == 0,
            f"--batch-size {config.batch_size} must be divisible by the {acc.num_processes} processes")  # fmt: skip
    set_seed(config.seed)

    index = read_index(data_dir)
    student_bundle = load_bundle(str(student_dir))
    teacher_bundle = load_bundle(teacher_spec, weights=config.align_weight > 0)
    if config.align_weight > 0:  # the teacher runs online: it must be the one that made the data
        require(index["fingerprint"] == fingerprint(teacher_bundle.transformer),
                f"{data_dir} was made by another teacher than {teacher_spec}")  # fmt: skip
    require(student_bundle.full_model.config.num_layers == teacher_bundle.transformer.config.num_layers,
            f"{student_dir} was not made from a model with {teacher_spec}'s depth")  # fmt: skip
    shards = list(range(len(index["shards"])))
    val_shards = shards[-1:] if len(shards) > 1 else shards
    train = TrajectoryData(data_dir, shards[:-1] if len(shards) > 1 else shards)
    val = TrajectoryData(data_dir, val_shards)
    val_rows = list(range(0, len(val), max(1, len(val) // config.val_examples)))[: config.val_examples]

    student = student_bundle.transformer.train()
    if config.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    teacher = teacher_bundle.transformer.eval().requires_grad_(False) if config.align_weight > 0 else None
    opt = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, config.warmup_steps)))

    state = {"step": 0, "elapsed": 0.0, "val_error_start": None}
    ckpt = out / CHECKPOINT
    if (ckpt / STATE_FILE).is_file():
        state = json.loads((ckpt / STATE_FILE).read_text())
    loader = torch.utils.data.DataLoader(
        train, batch_sampler=StepBatches(len(train), config.batch_size, config.seed, state["step"], config.steps),
        num_workers=0,
    )
    student, opt, loader, sched = acc.prepare(student, opt, loader, sched)
    if teacher is not None:
        teacher = acc.prepare(teacher) if acc.distributed_type.name == "FSDP" else teacher.to(acc.device)
    require(not (config.ema_decay and acc.distributed_type.name == "FSDP"),
            "--ema-decay is not supported under FSDP (each process holds only a shard of the weights)")  # fmt: skip
    ema = EMA(acc.unwrap_model(student).parameters(), config.ema_decay) if config.ema_decay else None
    if ema is not None:
        acc.register_for_checkpointing(ema)
    if (ckpt / STATE_FILE).is_file():
        acc.load_state(str(ckpt))

    if state["val_error_start"] is None:
        state["val_error_start"] = relative_error(student, val, val_rows, acc.device)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if state["step"] == 0:
            (out / LOG_FILE).unlink(missing_ok=True)
        else:  # drop what a killed session logged past its last checkpoint
            _truncate_log(out / LOG_FILE, state["step"])
    log = (out / LOG_FILE).open("a") if acc.is_main_process else None

    def check_finite(value: float) -> None:
        if not math.isfinite(value):
            bar.close()
            raise PareError(f"the loss became {value} by step {state['step']}; stopped, the last good checkpoint "
                            f"is in {ckpt}: lower --lr or check the data")  # fmt: skip

    def save() -> dict:
        """Checkpoint into a temporary folder (every process writes its part), then swap it in. Only weights
        whose every loss since the last log was finite are saved."""
        window = acc.reduce(running, reduction="mean").item()
        check_finite(window)
        record = _record(config, state, acc, teacher_spec, student_dir, data_dir, command)
        # the loss window of the log, so that a resumed run logs what an uninterrupted one would
        state["running"] = [window, n_running]
        tmp = ckpt.with_name(f".{ckpt.name}.tmp")
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        weights = acc.get_state_dict(student)  # every process takes part (FSDP gathers the shards)
        if acc.is_main_process:
            write_json(tmp / STATE_FILE, state)
            replace_dir(tmp, ckpt)
            if ema is not None:  # the exported model holds the EMA weights
                names = [n for n, _ in acc.unwrap_model(student).named_parameters()]
                weights = {**weights, **dict(zip(names, ema.shadow))}
            _export(out / "model", acc.unwrap_model(student).config, weights, student_bundle, record)
        acc.wait_for_everyone()
        return record

    t0, session_elapsed = time.time(), state["elapsed"]
    window_sum, n_running = state.get("running", [0.0, 0])
    running = torch.tensor(float(window_sum), device=acc.device)
    bar = tqdm(total=config.steps, initial=state["step"], desc="distill", unit="step",
               disable=not (progress and acc.is_main_process))  # fmt: skip
    for batch in loader:
        with acc.autocast():
            loss, parts = velocity_loss(student, batch, teacher, config.align_weight)
        acc.backward(loss)
        if config.grad_clip:
            acc.clip_grad_norm_(student.parameters(), config.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(acc.unwrap_model(student).parameters())
        running += loss.detach()
        n_running += 1
        state["step"] += 1
        bar.update()
        if state["step"] % config.log_every == 0 or state["step"] == config.steps:
            mean = acc.reduce(running / n_running, reduction="mean").item()
            running.zero_()
            n_running = 0
            check_finite(mean)
            state["elapsed"] = session_elapsed + time.time() - t0
            if log is not None:
                log.write(json.dumps({"step": state["step"], "loss": round(mean, 8),
                                      "lr": sched.get_last_lr()[0], "elapsed_s": round(state["elapsed"], 1)}) + "\n")  # fmt: skip
                log.flush()
            bar.set_postfix(loss=f"{mean:.5f}")
        if state["step"] % config.checkpoint_every == 0 and state["step"] < config.steps:
            save()
    bar.close()
    state["val_error_end"] = relative_error(student, val, val_rows, acc.device)
    record = save()
    if log is not None:
        log.close()
    return record


def _truncate_log(path: Path, step: int) -> None:
    if path.is_file():
        from ..io import atomic_path

        kept = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= step]
        with atomic_path(path) as tmp:
            tmp.write_text("".join(l + "\n" for l in kept))


def _record(config, state, acc, teacher_spec, student_dir, data_dir, command) -> dict:
    hardware = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return {"config": asdict(config), "teacher": teacher_spec, "student": str(Path(student_dir).resolve()),
            "data": str(Path(data_dir).resolve()), "steps": state["step"], "train_seconds": round(state["elapsed"], 1),
            "processes": acc.num_processes, "distributed": acc.distributed_type.name, "hardware": hardware,
            "val_error_start": state["val_error_start"], "val_error_end": state.get("val_error_end"),
            "command": command}  # fmt: skip


def _export(folder: Path, config, weights: dict, student_bundle, record: dict) -> None:
    """The distilled student as a PARE folder; its base is the full model the pruned student came from, so
    compute is reported against it. Built from the full state dict, so it works alike after DDP and FSDP."""
    from ..loading import MODEL_CLASSES

    cls = MODEL_CLASSES[config["_class_name"]]
    with torch.device("meta"):  # private keys (e.g. _use_default_values) would reset entries to their defaults
        model = cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    model.load_state_dict({k: v.detach().cpu() for k, v in weights.items()}, assign=True)
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp / "transformer")
        base = (student_bundle.manifest or {}).get("base") or student_bundle.spec
        artifacts.write_manifest(tmp, kind="distilled", base=base, settings=record["config"], training=record)
