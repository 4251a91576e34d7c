import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import two_processes
from pare import load_bundle
from pare.cli import main
from pare.training import KILL_AFTER_CHECKPOINT, LoopConfig, StepBatches, lr_factor
from pare.distill.data import TrajectoryData, read_index

# accelerate runs several CPU processes (gloo) only when asked to; torchrun would give each process 1 thread
ENV = {**os.environ, "ACCELERATE_USE_CPU": "1"}


@pytest.fixture(scope="module")
def setup(stage_inputs):
    return stage_inputs


def distill_args(d, teacher, out, steps=12, extra=()):
    return ["distill", "--teacher", teacher, "--student", str(d / "student"), "--data", str(d / "data"), "--out",
            str(out), "--steps", str(steps), "--batch-size", "4", "--checkpoint-every", "4", "--lr", "1e-3",
            "--warmup-steps", "2", *extra]  # fmt: skip


def final_weights(out):
    return load_file(out / "model" / "transformer" / "diffusion_pytorch_model.safetensors")


def test_data_shards_index_and_resume(setup):
    d, teacher = setup
    index = read_index(d / "data")
    assert [s["file"] for s in index["shards"]] == [f"shard-0000{i}.safetensors" for i in range(3)]
    assert all(s["examples"] == 2 * 4 for s in index["shards"])  # 2 videos x 4 steps per shard
    data = TrajectoryData(d / "data")
    item = data[5]
    assert item["x_t"].shape == (4, 8, 16, 16) and item["text"].shape == (16, 16)  # latents of the frame autoencoder
    assert (item["null_text"][1:] == 0).all()  # the empty prompt: <bos> only, padded rows zeroed
    # the stored guided step: cond and uncond velocities differ (CFG was on)
    assert not torch.equal(item["v_cond"], item["v_uncond"])
    # every file the stage wrote has the mode of a file the user creates (safetensors alone would give 0600)
    mask = os.umask(0)
    os.umask(mask)
    files = [p for p in (d / "data").iterdir() if p.is_file()]
    assert len(files) >= 4 and {p.name: p.stat().st_mode & 0o777 for p in files} == {p.name: 0o666 & ~mask for p in files}
    mtimes = {p.name: p.stat().st_mtime_ns for p in (d / "data").glob("shard-*")}
    (d / "data" / ".shard-00003.tmp-99999.safetensors").write_bytes(b"half written")  # debris of a killed run
    assert main(["data", "--teacher", teacher, "--out", str(d / "data"), "--videos", "8", "--shard-videos", "2",
                 "--steps", "4"]) == 2  # fmt: skip  # other --videos: refused (settings changed)
    assert main(["data", "--teacher", teacher, "--out", str(d / "data"), "--videos", "6", "--shard-videos", "2",
                 "--steps", "4"]) == 0  # fmt: skip
    assert {p.name: p.stat().st_mtime_ns for p in (d / "data").glob("shard-*")} == mtimes  # finished shards skipped
    assert len(TrajectoryData(d / "data")) == 24


def test_examples_are_read_row_by_row_never_a_whole_shard(setup, monkeypatch):
    """Every example equals its rows in the whole shard, read through slices only: the large tensors (x_t, the
    velocities, the text embeddings) are never loaded whole."""
    import pare.distill.data as data_module

    d, _ = setup
    real = data_module.safe_open

    class RowsOnly:
        def __init__(self, *args, **kwargs):
            self.f = real(*args, **kwargs)

        def get_tensor(self, name):
            assert name in TrajectoryData.SMALL, f"{name} read whole"
            return self.f.get_tensor(name)

        def get_slice(self, name):
            return self.f.get_slice(name)

        def keys(self):
            return self.f.keys()

    monkeypatch.setattr(data_module, "safe_open", RowsOnly)
    data = TrajectoryData(d / "data")
    index = read_index(d / "data")
    for i in (0, 7, 8, 23, 5):  # shard starts and ends, out of order
        s, j = divmod(i, 8)
        whole = load_file(d / "data" / index["shards"][s]["file"])
        item = data[i]
        assert torch.equal(item["x_t"], whole["x_t"][j].float()) and torch.equal(item["v_uncond"], whole["v_uncond"][j].float())
        assert torch.equal(item["v_cond"], whole["v_cond"][j].float()) and item["timestep"] == whole["timestep"][j]
        assert torch.equal(item["text"], whole["text"][whole["prompt"][j]])
    import pickle

    assert pickle.loads(pickle.dumps(data))._open == {}  # data-loader workers open their own files


def test_step_batches_are_a_function_of_the_step():
    full = list(StepBatches(10, 4, seed=3, start=0, stop=6))
    assert list(StepBatches(10, 4, seed=3, start=4, stop=6)) == full[4:]
    assert sorted(sum(full[:5], [])[:10]) == list(range(10))  # the first epoch covers every example once


def test_lr_schedules_known_values():
    const = LoopConfig(steps=11, warmup_steps=2)
    assert [lr_factor(const, s) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    cos = LoopConfig(steps=11, warmup_steps=2, lr_schedule="cosine")
    # warm-up as constant, 1 on the last warm-up step, half-way (5 of 10 decay steps) 0.5, 0 after the last step
    assert [lr_factor(cos, s) for s in (0, 1, 6, 11)] == pytest.approx([0.5, 1.0, 0.5, 0.0], abs=1e-12)
    assert 0 < lr_factor(cos, 10) < 0.03  # the last step still learns
    factors = [lr_factor(cos, s) for s in range(1, 12)]
    assert all(a > b for a, b in zip(factors, factors[1:]))


def test_cosine_schedule_in_the_log_and_old_runs_resume(setup, tmp_path, capsys):
    d, teacher = setup
    out = tmp_path / "cos"
    assert main(distill_args(d, teacher, out, steps=12, extra=("--lr-schedule", "cosine"))) == 0
    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    cfg = LoopConfig(steps=12, warmup_steps=2, lr_schedule="cosine")
    assert [e["lr"] for e in log] == pytest.approx([1e-3 * lr_factor(cfg, e["step"]) for e in log], abs=1e-15)
    assert log[-1]["lr"] == pytest.approx(0.0, abs=1e-15)
    assert load_bundle(str(out / "model")).manifest["training"]["config"]["lr_schedule"] == "cosine"
    # a run started before --lr-schedule existed (no such key in its state) resumes as constant, not as cosine
    old = tmp_path / "old"
    assert main(distill_args(d, teacher, old, steps=4)) == 0
    state_file = old / "checkpoint" / "state.json"
    state = json.loads(state_file.read_text())
    del state["settings"]["config"]["lr_schedule"]
    state_file.write_text(json.dumps(state))
    capsys.readouterr()
    assert main(distill_args(d, teacher, old, steps=8, extra=("--lr-schedule", "cosine"))) == 2
    assert "other lr_schedule" in capsys.readouterr().err
    assert main(distill_args(d, teacher, old, steps=8)) == 0
    assert json.loads(state_file.read_text())["step"] == 8
    assert main(distill_args(d, teacher, old, steps=8, extra=("--lr-schedule", "linear"))) == 2
    assert "--lr-schedule must be one of constant, cosine, got 'linear'" in capsys.readouterr().err


def test_distill_lowers_the_error_and_exports(setup, tmp_path, capsys):
    d, teacher = setup
    out = tmp_path / "run"
    assert main(distill_args(d, teacher, out, steps=24)) == 0
    record = load_bundle(str(out / "model")).manifest["training"]
    assert record["val_end"]["error"] < 0.8 * record["val_start"]["error"]
    assert record["config"]["lr"] == 1e-3 and record["config"]["warmup_steps"] == 2 and record["steps"] == 24
    bundle = load_bundle(str(out / "model"))
    assert bundle.kind == "pare:distilled" and bundle.transformer.config.self_heads == [1, 1]
    assert bundle.prompt_encoder is not None and bundle.full_model.config.num_attention_heads == 2
    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [10, 20, 24]


def test_guided_loss_known_values():
    from pare.distill import guided, velocity_loss

    cond, uncond = torch.full((1, 2), 3.0), torch.full((1, 2), 1.0)
    assert torch.equal(guided(torch.cat([cond, uncond]), 4.0), torch.full((1, 2), 9.0))  # 1 + 4 (3 - 1)
    batch = {"x_t": torch.zeros(1, 2), "timestep": torch.zeros(1), "text": torch.zeros(1, 1), "null_text": torch.zeros(1, 1),
             "v_cond": cond, "v_uncond": uncond}  # fmt: skip
    # a student that answers 2 on both branches: branch MSE ((2-3)^2 + (2-1)^2) / 2 = 1; guided 2 vs 9: 49
    student = lambda **kw: (torch.full((2, 2), 2.0),)  # noqa: E731
    loss, parts = velocity_loss(student, batch, guided_weight=0.5, guidance=4.0)
    assert (parts["velocity"].item(), parts["guided"].item(), loss.item()) == (1.0, 49.0, 1.0 + 0.5 * 49.0)
    assert "guided" not in velocity_loss(student, batch, guidance=4.0)[1]


def test_guided_weight_trains_and_reports_the_guided_error(setup, tmp_path):
    d, teacher = setup
    out = tmp_path / "guided"
    assert main(distill_args(d, teacher, out, steps=24, extra=("--guided-weight", "1.0"))) == 0
    record = load_bundle(str(out / "model")).manifest["training"]
    assert record["config"]["guided_weight"] == 1.0
    assert record["val_end"]["guided_error"] < 0.8 * record["val_start"]["guided_error"]
    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [10, 20, 24] and all(e["guided"] > 0 for e in log)  # the last step's parts


def test_resume_after_kill_matches_uninterrupted(setup, tmp_path):
    d, teacher = setup
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main(distill_args(d, teacher, straight)) == 0
    # model/ at every checkpoint on request (a resumed run may drop the request: model/ comes at the end anyway)
    # killed right after its checkpoint at step 4 (the loop's fault injection: a kill timed from outside races it)
    run = subprocess.run([sys.executable, "-m", "pare.cli", *distill_args(d, teacher, killed, extra=("--export-checkpoints",))],
                         env={**ENV, KILL_AFTER_CHECKPOINT: "4"}, capture_output=True, timeout=600)  # fmt: skip
    assert run.returncode == -signal.SIGKILL
    step = json.loads((killed / "checkpoint" / "state.json").read_text())["step"]
    assert step == 4
    assert json.loads((killed / "model" / "pare.json").read_text())["training"]["steps"] == step
    assert main(distill_args(d, teacher, killed)) == 0
    a, b = final_weights(straight), final_weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    logs = [[json.loads(l)["loss"] for l in (p / "log.jsonl").read_text().splitlines()] for p in (straight, killed)]
    assert logs[0] == logs[1]


def test_two_processes_match_one_and_resume_in_one(setup, tmp_path):
    d, teacher = setup
    single, dist = tmp_path / "single", tmp_path / "dist"
    assert main(distill_args(d, teacher, single)) == 0
    two_processes(distill_args(d, teacher, dist, steps=8), dist)
    record = json.loads((dist / "model" / "pare.json").read_text())["training"]
    assert record["processes"] == 2 and record["distributed"] == "MULTI_CPU"
    # every step takes one global batch of 4, split between the processes (not a batch of 4 each, which would
    # end the run after 4 steps)
    assert record["steps"] == 8 and [json.loads(l)["step"] for l in (dist / "log.jsonl").read_text().splitlines()] == [8]
    # the distributed checkpoint resumes in one process, and the result matches the single-process run
    assert main(distill_args(d, teacher, dist)) == 0
    # Same global batches, gradients averaged over the two halves: the same run up to float reduction order,
    # which Adam can amplify on weights whose gradient is near 0 (its step is lr-sized whatever the sign noise).
    logs = [{e["step"]: e["loss"] for e in map(json.loads, (p / "log.jsonl").read_text().splitlines())} for p in (single, dist)]
    # the first run of 8 steps logged its end, so its window at step 10 holds steps 9-10 only: compare step 12
    assert list(logs[0]) == [10, 12] and list(logs[1]) == [8, 10, 12]
    assert logs[0][12] == pytest.approx(logs[1][12], rel=1e-2)
    a, b = final_weights(single), final_weights(dist)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 10 * 1e-3  # 10 x lr
    ra, rb = (json.loads((p / "model" / "pare.json").read_text())["training"]["val_end"]["error"] for p in (single, dist))
    assert ra == pytest.approx(rb, rel=2e-2)
    # validation is split between the processes (each its share of the rows) and summed: on the same starting
    # weights both runs see every held-out row once, so the errors agree to float summation order
    sa, sb = (json.loads((p / "model" / "pare.json").read_text())["training"]["val_start"] for p in (single, dist))
    assert sa["error"] == pytest.approx(sb["error"], rel=1e-5) and sa["guided_error"] == pytest.approx(sb["guided_error"], rel=1e-5)
    assert sa["examples"] == sb["examples"] == 8  # the held-out shard's 8 rows, each once over both processes


def test_nan_loss_stops_and_keeps_the_checkpoint(setup, tmp_path, capsys, monkeypatch):
    import pare.distill as stage

    d, teacher = setup
    out = tmp_path / "nan"
    calls = {"n": 0}
    real = stage.velocity_loss

    def poisoned(*args, **kwargs):  # the loss turns NaN from step 6 on
        calls["n"] += 1
        loss, parts = real(*args, **kwargs)
        return (loss * float("nan"), parts) if calls["n"] >= 6 else (loss, parts)

    monkeypatch.setattr(stage, "velocity_loss", poisoned)
    code = main(distill_args(d, teacher, out, steps=40))
    err = capsys.readouterr().err
    assert code == 2 and "the loss became nan by step 8" in err and "last good checkpoint" in err
    # the checkpoint at step 4 (all losses finite) is kept; the one due at step 8 was not written
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 4
    kept = load_file(out / "checkpoint" / "model.safetensors")
    assert kept and all(torch.isfinite(v).all() for v in kept.values())
    assert not (out / "model").exists()  # model/ is written when a run ends well (or with --export-checkpoints)


def test_distill_bad_input(setup, tmp_path, capsys):
    d, teacher = setup
    args = distill_args(d, teacher, tmp_path / "x")
    args[args.index("--data") + 1] = str(tmp_path)  # a folder without data
    assert main(args) == 2
    assert "no trajectory data" in capsys.readouterr().err
    assert main(distill_args(d, teacher, tmp_path / "y", extra=["--batch-size", "0"])) == 2
    assert "--batch-size must be at least 1, got 0" in capsys.readouterr().err
    for command in ("distill", "route"):  # a student (and data) of another teacher: the I2V one takes 9 channels
        assert main([command, "--teacher", "builtin:shapes-i2v", "--student", str(d / "student"), "--data",
                     str(d / "data"), "--out", str(tmp_path / "z"), "--steps", "2", "--batch-size", "4"]) == 2  # fmt: skip
        err = capsys.readouterr().err
        assert "was not made from builtin:shapes-i2v: its in_channels, " in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


def test_resume_with_other_settings_is_refused(setup, tmp_path, capsys):
    d, teacher = setup
    out = tmp_path / "run"
    assert main(distill_args(d, teacher, out, steps=4)) == 0
    capsys.readouterr()
    assert main(distill_args(d, teacher, out, steps=8, extra=["--batch-size", "2"])) == 2
    assert "holds a run with other batch_size" in capsys.readouterr().err
    assert main(distill_args(d, teacher, out, steps=8)) == 0  # more steps: fine
    weights = (out / "model" / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(distill_args(d, teacher, out, steps=4)) == 2  # fewer: the run is past them, refused untouched
    err = capsys.readouterr().err
    assert "holds a run at step 8, past the 4 steps asked for" in err and err.count("\n") == 1, err
    assert (out / "model" / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes() == weights


def test_interrupted_checkpoint_swap_is_recovered(tmp_path):
    from pare.io import recover_dir

    (tmp_path / ".checkpoint.old-123").mkdir()
    (tmp_path / ".checkpoint.old-123" / "state.json").write_text("{}")
    recover_dir(tmp_path / "checkpoint")
    assert (tmp_path / "checkpoint" / "state.json").is_file()


def test_ema_run_validates_what_it_exports(setup, tmp_path):
    """With --ema-decay the exported model holds the EMA weights, and the recorded end error is theirs."""
    from pare.distill import velocity_errors
    from pare.training import split_data

    d, teacher = setup
    out = tmp_path / "ema"
    assert main(distill_args(d, teacher, out, steps=12, extra=("--ema-decay", "0.9"))) == 0
    bundle = load_bundle(str(out / "model"))
    record = bundle.manifest["training"]
    _, val = split_data(d / "data")
    n = record["config"]["val_examples"]
    rows = list(range(0, len(val), max(1, len(val) // n)))[:n]
    guidance = read_index(d / "data")["sampler"]["guidance_scale"]
    exported = velocity_errors(bundle.transformer.eval(), val, rows, "cpu", guidance)
    assert exported["error"] == pytest.approx(record["val_end"]["error"], rel=1e-5)
    # and the EMA is not the raw weights: a run without it ends elsewhere
    raw = tmp_path / "raw"
    assert main(distill_args(d, teacher, raw, steps=12)) == 0
    assert load_bundle(str(raw / "model")).manifest["training"]["val_end"]["error"] != pytest.approx(exported["error"], rel=1e-3)


def test_validation_sums_of_processes_add_up():
    from pare.training import merge_sums

    a = {"error": [1.0, 4.0], "executed": [0.5, 2], "routes": {(1, 0), (1, 1)}}
    b = {"error": [2.0, 4.0], "executed": [1.5, 2], "routes": {(1, 1), (0, 1)}}
    assert merge_sums([a, b]) == {"error": [3.0, 8.0], "executed": [2.0, 4], "routes": {(1, 0), (1, 1), (0, 1)}}
    assert a["routes"] == {(1, 0), (1, 1)}  # the parts are left as they were
    assert merge_sums([a]) == a


def test_fsdp_checkpoints_are_sharded_and_resume_after_kill(setup, tmp_path):
    """A 2-process run under FSDP (CPU processes, tests/fsdp_cpu.py) with --align-weight (the teacher online, sharded
    like the student): every process writes its own shard of the student and its optimiser (nothing gathered, no
    teacher, no model/ before the end); a run killed after a checkpoint and resumed ends with the weights and the
    losses of an uninterrupted one. (Data-parallel runs resume alike: tests/test_routing.py.)"""
    d, teacher = setup
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    extra = ("--align-weight", "0.5")
    two_processes(distill_args(d, teacher, straight, steps=8, extra=extra), straight, fsdp=True)
    assert two_processes(distill_args(d, teacher, killed, steps=8, extra=extra), killed, kill_after=4,
                         fsdp=True) == 4  # fmt: skip
    # one shard per process of the student (model 0) and of its optimiser; no full weights, no second model
    ckpt = killed / "checkpoint"
    shards = ["__0_0.distcp", "__1_0.distcp"]
    assert sorted(p.name for p in (ckpt / "pytorch_model_fsdp_0").iterdir()) == [".metadata", *shards]
    assert sorted(p.name for p in (ckpt / "optimizer_0").iterdir()) == [".metadata", *shards]
    assert not [p for p in ckpt.iterdir() if p.suffix == ".safetensors" or p.name.endswith("_1")]
    record = json.loads((killed / "model" / "pare.json").read_text())["training"]
    assert record["distributed"] == "FSDP" and record["processes"] == 2 and record["config"]["align_weight"] == 0.5
    a, b = final_weights(straight), final_weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    logs = [[json.loads(l)["loss"] for l in (p / "log.jsonl").read_text().splitlines()] for p in (straight, killed)]
    assert logs[0] == logs[1]
