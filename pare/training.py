"""The training loop that stage 1 (distillation) and stage 2 (routing) share.

Set-up order: the Accelerator first (it decides device, process group, mixed precision); then the model, the
optimiser and the data loader, all handed to `accelerator.prepare`, so the same code runs in one process,
data-parallel, or under FSDP (`accelerate launch --use_fsdp ...`); then what the stage holds (a frozen teacher),
kept out of accelerate's checkpoints; then the last checkpoint, if the output folder has one. The data order
is a pure function of the step (`StepBatches`), so a resumed run sees exactly the batches an uninterrupted one
would, and with `split_batches` every process takes its slice of the same global batch. A stage supplies what
differs: parameter groups, the loss, validation metrics, the export, and optionally an evaluation of the exported
model (every `eval_every` steps and at the end, logged to eval.jsonl). SIGTERM or Ctrl-C stops the run after the
step in progress with a checkpoint and model/ written; the same command resumes it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar, Protocol

import torch
from tqdm.auto import tqdm

from .errors import PareError, require
from .io import atomic_path, recover_dir, replace_dir, write_json

CHECKPOINT, LOG_FILE, STATE_FILE, EVAL_FILE = "checkpoint", "log.jsonl", "state.json", "eval.jsonl"
KILL_AFTER_CHECKPOINT = "PARE_KILL_AFTER_CHECKPOINT"  # tests only: the step after whose checkpoint processes die


@dataclass
class LoopConfig:
    """Knobs every training stage has."""

    steps: int = 2000
    batch_size: int = 32  # global batch (all processes together)
    warmup_steps: int = 50
    lr_schedule: str = "constant"  # after warm-up: constant | cosine (to 0 at `steps`)
    grad_clip: float = 1.0
    ema_decay: float = 0.0  # 0 turns EMA off
    gradient_checkpointing: bool = False
    bf16: bool | None = None  # default: on for CUDA
    checkpoint_every: int = 200
    export_checkpoints: bool = False  # also write model/ at every checkpoint (else once, at the end)
    log_every: int = 10
    val_examples: int = 256
    eval_every: int = 0  # steps between evaluations of the exported model (stages that have one); 0: at the end only
    device: str | None = None  # "cpu" keeps the run on the CPU; default: the device accelerate picks
    seed: int = 0
    stop_at_step: int = 0  # end this sitting after that step of the `steps` schedule (0: at the last step)

    # knobs a resumed run may change (they do not change what it computes)
    RESUMABLE: ClassVar[tuple[str, ...]] = ("steps", "checkpoint_every", "export_checkpoints", "log_every",
                                            "val_examples", "eval_every", "device", "stop_at_step")  # fmt: skip
    STEPS_FLAG: ClassVar[str] = "--steps"  # the command's name for `steps`

    @property
    def uses_bf16(self) -> bool:
        """bf16 autocast: as asked, else on CUDA."""
        return self.bf16 if self.bf16 is not None else torch.cuda.is_available()

    def validate(self) -> None:
        require(self.steps >= 1, f"{self.STEPS_FLAG} must be at least 1, got {self.steps}")
        require(self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}")
        require(self.checkpoint_every >= 1 and self.log_every >= 1, "--checkpoint-every must be at least 1")
        require(self.eval_every >= 0, f"--eval-every must be >= 0, got {self.eval_every}")
        require(0 <= self.stop_at_step <= self.steps,
                f"--stop-at-step must be in [0, {self.steps}] (the run's steps), got {self.stop_at_step}")  # fmt: skip
        require(self.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        require(0 <= self.ema_decay < 1, f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        require(self.lr_schedule in LR_SCHEDULES,
                f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")  # fmt: skip


LR_SCHEDULES = ("constant", "cosine")


def lr_factor(cfg: LoopConfig, step: int) -> float:
    """Multiplier of the peak learning rate at optimiser step `step` (0-based): linear warm-up to 1 over
    `warmup_steps`, then constant, or a half cosine that reaches 0 at `steps`. Written out rather than taken
    from diffusers' `get_cosine_schedule_with_warmup` so that both schedules share the warm-up exactly (that
    one starts at 0, ours at 1/warmup, which the recorded losses of existing runs depend on). A resumed run
    with more --steps stretches the rest of the cosine to the new end."""
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    if cfg.lr_schedule == "constant":
        return warm
    # 0 on the last warm-up step, 1 (factor 0) once `steps` steps are done: the last step still learns
    progress = min(1.0, max(0, step + 1 - cfg.warmup_steps) / max(1, cfg.steps + 1 - cfg.warmup_steps))
    return warm * 0.5 * (1.0 + math.cos(math.pi * progress))


class Stage(Protocol):
    """What a training stage supplies to `run`."""

    name: str

    def prepare(self, accelerator) -> None: ...  # move what the stage holds (a teacher) to the process's device

    def param_groups(self, model) -> list[dict]: ...

    def loss(self, model, batch: dict, step: int) -> tuple[torch.Tensor, dict]: ...

    def validate(self, model, data, rows: list[int], device, batch_size: int) -> dict: ...  # additive sums

    def summarize(self, sums: dict) -> dict: ...  # the validation record from the sums of every process

    def export(self, folder: Path, model, weights: dict, record: dict) -> None: ...

    # Optional: `evaluate(folder, step) -> dict | None`, scores of the model exported to `folder` (run on the main
    # process), `evaluated(eval_file)`, called after each row is logged (to draw the curve), and `clip_groups(model)`,
    # the parameter lists whose gradients are clipped each on its own (default: all of the model's together).


class StepBatches(torch.utils.data.Sampler):
    """Batch sampler whose batch at step s is a pure function of (seed, s): epochs are fresh permutations, or,
    with `shuffle=False`, the rows in order (step s: rows s B to (s + 1) B - 1, modulo n)."""

    def __init__(self, n: int, batch: int, seed: int, start: int, stop: int, shuffle: bool = True):
        self.n, self.batch, self.seed, self.start, self.stop, self.shuffle = n, batch, seed, start, stop, shuffle
        self.batch_size = batch  # what accelerate's split_batches reads to cut every batch into processes' slices

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self):
        perms: dict[int, torch.Tensor] = {}
        for step in range(self.start, self.stop):
            rows = []
            for g in range(step * self.batch, (step + 1) * self.batch):
                if not self.shuffle:
                    rows.append(g % self.n)
                    continue
                epoch = g // self.n
                if epoch not in perms:
                    perms.clear()
                    perms[epoch] = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
                rows.append(int(perms[epoch][g % self.n]))
            yield rows


EMA_POWER = 2 / 3  # EMAModel warm-up: decay 1 - (1 + step)^(-2/3), 0.99 at step 1,000, capped at --ema-decay


def make_ema(params, decay: float):
    """diffusers' `EMAModel` with warm-up, the one EMA of every training loop in PARE (a fixed decay from step 0
    would leave a short run's export mostly its initial weights)."""
    from diffusers.training_utils import EMAModel

    return EMAModel(params, decay=decay, use_ema_warmup=True, power=EMA_POWER, foreach=True)


@contextmanager
def ema_applied(ema, params):
    """`params` hold the EMA weights inside the block (what is exported is what is validated); the training
    weights come back after it."""
    if ema is None:
        yield
        return
    params = list(params)
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


def resume_state(out: Path, cfg: LoopConfig, record: dict) -> dict:
    """The loop state of the run in `out` (a fresh one if it has no checkpoint). A resumed run must have the same
    settings (knobs outside `cfg.RESUMABLE`, and `record` but its command and notes, facts found on the way):
    else the one-line error says which differ. Callers with set-up work of their own call it first, so that a
    refused run changes nothing."""
    resumable = type(cfg).RESUMABLE
    settings = {"config": {k: v for k, v in asdict(cfg).items() if k not in resumable},
                "inputs": {k: v for k, v in record.items() if k not in ("command", "notes")}}  # fmt: skip
    ckpt = Path(out) / CHECKPOINT
    recover_dir(ckpt)
    if not (ckpt / STATE_FILE).is_file():
        return {"step": 0, "elapsed": 0.0, "val_start": None, "settings": settings, "sessions": []}
    state = {"sessions": [], **json.loads((ckpt / STATE_FILE).read_text())}
    old = json.loads(json.dumps(state.get("settings", {})))
    # a knob added after the run was started counts as left at its default
    defaults = {k: v for k, v in asdict(type(cfg)()).items() if k not in resumable}
    old["config"] = {**defaults, **old.get("config", {})}
    new = json.loads(json.dumps(settings))
    changed = [k for part in ("config", "inputs") for k in {*old.get(part, {}), *new[part]}
               if old.get(part, {}).get(k) != new[part].get(k)]  # fmt: skip
    require(not changed, f"{out} holds a run with other {', '.join(sorted(changed))}: resume it with the same "
            "settings (only the length may grow) or pick a new --out")  # fmt: skip
    require(cfg.steps >= state["step"], f"{out} holds a run at step {state['step']}, past the {cfg.steps} steps "
            "asked for: only the length may grow (pick a new --out for a shorter run)")  # fmt: skip
    return state


def check_launch(processes: int) -> None:
    """Refuse a multi-process launch that accelerate runs as lone processes: torchrun on CPU processes without
    ACCELERATE_USE_CPU=1 (or --device cpu) gives every process world size 1, and each would train alone and write
    the same run folder."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    require(processes == launched, f"launched as {launched} processes (WORLD_SIZE), but accelerate runs {processes}: "
            "on CPU processes add --device cpu or set ACCELERATE_USE_CPU=1")  # fmt: skip


def run(stage: Stage, model, train, val, out: Path, cfg: LoopConfig, record: dict, progress: bool = True) -> dict:
    """Train `model` on `train` with `stage`'s loss (or resume the run in `out`); returns the final record, which
    has "stopped" (the signal's name) when SIGTERM or Ctrl-C ended the run before its last step."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, set_seed

    cfg.validate()
    out = Path(out)
    bf16 = cfg.uses_bf16
    # a stage whose forward leaves parameters unused (static routes skip blocks) needs DDP to look for them
    ddp = DistributedDataParallelKwargs(find_unused_parameters=getattr(stage, "unused_parameters", False))
    # split_batches through DataLoaderConfiguration: accelerate >= 1.x ignores Accelerator(split_batches=True)
    # without a word, and each process would then take whole batches of its own (a run of N processes would
    # end after steps / N steps of N x the batch)
    acc = Accelerator(dataloader_config=DataLoaderConfiguration(split_batches=True), cpu=cfg.device == "cpu",
                      mixed_precision="bf16" if bf16 else "no", kwargs_handlers=[ddp])  # fmt: skip
    check_launch(acc.num_processes)
    require(acc.split_batches, "accelerate did not take split_batches: every process must take its slice of the "
            "same global batch")  # fmt: skip
    require(cfg.batch_size % acc.num_processes == 0,
            f"--batch-size {cfg.batch_size} must be divisible by the {acc.num_processes} processes")  # fmt: skip
    set_seed(cfg.seed)
    val_rows = list(range(0, len(val), max(1, len(val) // cfg.val_examples)))[: cfg.val_examples]

    model.train()
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(stage.param_groups(model))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg, s))
    ckpt = out / CHECKPOINT
    state = resume_state(out, cfg, record)
    resuming = (ckpt / STATE_FILE).is_file()
    hardware = torch.cuda.get_device_name() if acc.device.type == "cuda" else "CPU"
    state["sessions"].append({"started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": record.get("command", ""),
                              "from_step": state["step"], "hardware": hardware})  # fmt: skip
    # the loader's own generator: starting an iteration draws a seed from it, and from the global generator without
    # one, which would leave a resumed run one draw off the random stream (Gumbel noise) of an uninterrupted run
    loader = torch.utils.data.DataLoader(
        train, batch_sampler=StepBatches(len(train), cfg.batch_size, cfg.seed, state["step"], cfg.steps,
                                         shuffle=getattr(train, "shuffle", True)),
        generator=torch.Generator().manual_seed(cfg.seed),
    )  # fmt: skip
    model, opt, loader, sched = acc.prepare(model, opt, loader, sched)
    # after the trained model: whatever the stage prepares (a frozen teacher) must not pair with its optimiser
    stage.prepare(acc)
    require(len(acc._models) == 1, f"the {stage.name} stage registered a second model with accelerate: its "
            "checkpoints would hold it and pair the optimiser with it")  # fmt: skip
    require(not (cfg.ema_decay and acc.distributed_type.name == "FSDP"),
            "--ema-decay is not supported under FSDP (each process holds only a shard of the weights)")  # fmt: skip
    ema = make_ema(acc.unwrap_model(model).parameters(), cfg.ema_decay) if cfg.ema_decay else None
    if ema is not None:
        acc.register_for_checkpointing(ema)
    if resuming:
        acc.load_state(str(ckpt))
    def validation() -> dict:
        """Each process validates its share of the rows at its training batch, under autocast; the sums of
        every process are gathered and summarised."""
        from accelerate.utils import gather_object

        rows = val_rows[acc.process_index :: acc.num_processes]
        with torch.no_grad(), acc.autocast():
            sums = stage.validate(model, val, rows, acc.device, max(1, cfg.batch_size // acc.num_processes))
        return stage.summarize(merge_sums(gather_object([sums])))

    if state["val_start"] is None:
        state["val_start"] = validation()
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        for name in (LOG_FILE, EVAL_FILE):
            if not resuming:
                (out / name).unlink(missing_ok=True)
            else:  # drop what a killed session logged past its last checkpoint
                _truncate_log(out / name, state["step"])
    log = (out / LOG_FILE).open("a") if acc.is_main_process else None

    def check_finite(value: float) -> None:
        if not math.isfinite(value):
            bar.close()
            raise PareError(f"the loss became {value} by step {state['step']}; stopped, the last good checkpoint "
                            f"is in {ckpt}: lower the learning rate or check the data")  # fmt: skip

    def full_record() -> dict:
        rec = {**record, "config": asdict(cfg) | record.get("config", {}), "steps": state["step"],
               "train_seconds": round(state["elapsed"], 1), "processes": acc.num_processes,
               "distributed": acc.distributed_type.name, "hardware": hardware, "sessions": state["sessions"],
               "val_start": state["val_start"], "val_end": state.get("val_end")}  # fmt: skip
        return rec | ({"eval": state["eval"]} if state.get("eval") is not None else {})

    if acc.distributed_type.name == "FSDP":  # each process writes its own shard: nothing is gathered to save
        acc.state.fsdp_plugin.set_state_dict_type("SHARDED_STATE_DICT")

    def save(export: bool) -> dict:
        """Checkpoint into a temporary folder (every process writes its part), then swap it in; with `export`,
        also write model/ (under FSDP the one step that gathers the whole model). Only weights whose every loss
        since the last log was finite are saved."""
        window = acc.reduce(running, reduction="mean").item()
        check_finite(window)
        # the loss window of the log, so that a resumed run logs what an uninterrupted one would
        state["running"] = [window, n_running]
        state["elapsed"] = session_elapsed + time.time() - t0
        tmp = ckpt.with_name(f".{ckpt.name}.tmp")
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        weights = acc.get_state_dict(model) if export else None  # every process takes part (FSDP gathers)
        rec = full_record()
        if acc.is_main_process and export:  # before the swap: a checkpoint of step s finds model/ of step s
            if ema is not None:  # the exported model holds the EMA weights
                names = [n for n, _ in acc.unwrap_model(model).named_parameters()]
                weights = {**weights, **dict(zip(names, ema.shadow_params))}
            stage.export(out / "model", acc.unwrap_model(model), weights, rec)
        if acc.is_main_process:
            write_json(tmp / STATE_FILE, state)
            replace_dir(tmp, ckpt)
        acc.wait_for_everyone()
        if os.environ.get(KILL_AFTER_CHECKPOINT) == str(state["step"]):
            # fault injection for the kill-and-resume tests: every process dies as a SIGKILL would leave it, right
            # after this checkpoint; a kill timed from outside races a run of a tiny model that is already past it
            os.kill(os.getpid(), signal.SIGKILL)
        return rec

    def evaluate() -> dict:
        """Checkpoint with model/, score model/ with the stage's evaluation (main process), log the row, and
        checkpoint again so that model/ and the checkpoint carry the scores."""
        from accelerate.utils import broadcast_object_list

        rec = save(export=True)
        evaluate_model = getattr(stage, "evaluate", None)
        scores = evaluate_model(out / "model", state["step"]) if evaluate_model and acc.is_main_process else None
        scores = broadcast_object_list([scores])[0]  # the other processes wait for it, and all save again or none
        if scores is None:
            return rec
        if acc.is_main_process:
            with (out / EVAL_FILE).open("a") as f:
                f.write(json.dumps({"step": state["step"], **scores}) + "\n")
            bar.write(f"step {state['step']}: " + ", ".join(f"{k} {v:.3g}" for k, v in scores.items() if isinstance(v, float)))
            if hasattr(stage, "evaluated"):
                stage.evaluated(out / EVAL_FILE)
        state["eval"] = scores
        return save(export=True)

    # SIGTERM (a scheduler's stop) and Ctrl-C finish the step in progress, then checkpoint and stop
    stop: dict = {"signal": None}
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[sig] = signal.signal(sig, lambda num, _: stop.update(signal=signal.Signals(num).name))
        except ValueError:  # not the main thread: signals stay as they were
            pass

    def stop_asked() -> bool:
        if acc.num_processes == 1:
            return stop["signal"] is not None
        # every process stops at the same step (the signal reaches them at different moments)
        flag = torch.tensor(float(stop["signal"] is not None), device=acc.device)
        return acc.reduce(flag, reduction="sum").item() > 0

    t0, session_elapsed = time.time(), state["elapsed"]
    window_sum, n_running = state.get("running", [0.0, 0])
    running = torch.tensor(float(window_sum), device=acc.device)
    # a sitting may end before the schedule does (--stop-at-step): its learning rate and data are still those of the
    # whole schedule, and a later sitting with a later stop (or none) carries on as if it had not stopped
    end = cfg.stop_at_step or cfg.steps
    bar = tqdm(total=end, initial=state["step"], desc=stage.name, unit="step",
               disable=not (progress and acc.is_main_process))  # fmt: skip
    try:
        if state["step"] >= end and state.get("val_end") is not None:  # a finished run, run again: nothing to do
            bar.close()
            return full_record()
        for batch in loader:
            with acc.autocast():
                loss, parts = stage.loss(model, batch, state["step"])
            acc.backward(loss)
            if cfg.grad_clip:  # a stage that trains two models (DMD) clips each one's gradient on its own
                for params in getattr(stage, "clip_groups", lambda m: [m.parameters()])(model):
                    acc.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if ema is not None:
                ema.step(acc.unwrap_model(model).parameters())
            running += loss.detach()
            n_running += 1
            state["step"] += 1
            bar.update()
            # (not at a --stop-at-step: the checkpoint carries the loss window, and a later sitting logs as one run)
            if state["step"] % cfg.log_every == 0 or state["step"] == cfg.steps:
                mean = acc.reduce(running / n_running, reduction="mean").item()
                running.zero_()
                n_running = 0
                check_finite(mean)
                state["elapsed"] = session_elapsed + time.time() - t0
                if log is not None:
                    extra = {k: round(float(v), 6) for k, v in parts.items()}
                    if ema is not None:  # the warmed-up decay of the last update
                        extra["ema_decay"] = round(ema.cur_decay_value, 6)
                    log.write(json.dumps({"step": state["step"], "loss": round(mean, 8), "lr": sched.get_last_lr()[0],
                                          **extra, "elapsed_s": round(state["elapsed"], 1)}) + "\n")  # fmt: skip
                    log.flush()
                bar.set_postfix(loss=f"{mean:.5f}")
            if state["step"] == end:
                break
            if stop_asked():
                bar.close()
                rec = save(export=True)
                return rec | {"stopped": stop["signal"] or "SIGTERM"}
            if cfg.eval_every and state["step"] % cfg.eval_every == 0:
                evaluate()
            elif state["step"] % cfg.checkpoint_every == 0:
                save(export=cfg.export_checkpoints)
        bar.close()
        with ema_applied(ema, acc.unwrap_model(model).parameters()):  # validate what is exported
            state["val_end"] = validation()
        return evaluate()
    finally:
        bar.close()
        if log is not None:
            log.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def merge_sums(parts: list[dict]) -> dict:
    """Add up the validation sums of several processes: numbers and lists of numbers element by element, sets
    by union."""
    merged: dict = {}
    for part in parts:
        for key, value in part.items():
            if key not in merged:
                merged[key] = set(value) if isinstance(value, set) else value
            elif isinstance(value, set):
                merged[key] |= value
            elif isinstance(value, (list, tuple)):
                merged[key] = [a + b for a, b in zip(merged[key], value)]
            else:
                merged[key] += value
    return merged


def _truncate_log(path: Path, step: int) -> None:
    if path.is_file():
        kept = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= step]
        with atomic_path(path) as tmp:
            tmp.write_text("".join(l + "\n" for l in kept))


def split_data(data_dir: Path):
    """Training and validation sets of a trajectory data folder: the last shard is held out."""
    from .distill.data import TrajectoryData, read_index

    index = read_index(data_dir)
    require("steps_kept" not in index, f"{data_dir} holds only the teacher steps a {len(index.get('steps_kept', []))}-step "
            "student reads (`pare data --student-steps`), which only `pare step-distill` trains on: this stage needs "
            "every step: make its data without --student-steps")  # fmt: skip
    shards = list(range(len(index["shards"])))
    require(len(shards) >= 2, f"{data_dir} has {len(shards)} finished shard(s); training needs at least 2 (the last "
            "is held out for validation): sample more videos or use a smaller --shard-videos")  # fmt: skip
    return TrajectoryData(data_dir, shards[:-1]), TrajectoryData(data_dir, shards[-1:])
