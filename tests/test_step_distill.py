"""Step distillation: a few-step, guidance-free student regressing the teacher's guided trajectories."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pare import PareError, load_bundle
from pare.cli import main
from pare.sampling import Conditioning, SamplerConfig, few_step_levels, sample
from pare.stepdistill import SegmentData, segment_boundaries
from pare.training import KILL_AFTER_CHECKPOINT

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_segment_boundaries_known_answer():
    grid = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    # shift 1: the 3-step levels are 1, 2/3, 1/3 -> the nearest grid levels, in order
    assert segment_boundaries(grid, 3, 1.0) == [0, 3, 7]
    # shift 2 (2s / (1 + s)) moves 1, 0.75, 0.5, 0.25 to 1, 0.857, 0.667, 0.4 -> 1, 0.9, 0.7, 0.4
    assert segment_boundaries(grid, 4, 2.0) == [0, 1, 3, 6]
    assert segment_boundaries(grid, 1, 3.0) == [0]
    assert segment_boundaries(grid, 10, 3.0) == list(range(10))  # every level, each after the one before
    with pytest.raises(PareError, match="a student takes 1 to 10"):
        segment_boundaries(grid, 11, 3.0)
    # the 4-step Wan distillations' schedule: timesteps 1000, 750, 500, 250 at shift 5
    assert [round(1000 * s, 1) for s in few_step_levels(4, 5.0)] == [1000.0, 937.5, 833.3, 625.0]


def test_profile_keeps_five_steps_spread_over_the_model_s_own():
    from pare.profiling import ProfileConfig, spread_steps

    assert spread_steps(25) == (0, 6, 12, 18, 24) and spread_steps(4) == (0, 1, 2, 3) and spread_steps(1) == (0,)
    assert ProfileConfig().resolved({}).steps == 25  # a model that names no steps: the library's sampler's
    few = ProfileConfig().resolved({"steps": 4, "sigmas": [1.0, 0.9, 0.75, 0.5]})
    assert (few.steps, few.timesteps) == (4, (0, 1, 2, 3))
    chosen = ProfileConfig(steps=10, timesteps=(0, 9)).resolved({"steps": 4})
    assert (chosen.steps, chosen.timesteps) == (10, (0, 9))  # what is asked for stays


def test_a_model_samples_on_its_own_schedule():
    """SamplerConfig.sigmas: Euler through the given levels to 0, timesteps = level x 1000, no shift applied."""
    seen = []

    class Constant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))
            self.blocks = torch.nn.ModuleList()  # what the sampler's compute record counts

        def forward(self, hidden_states, timestep, encoder_hidden_states, **kw):
            seen.append(timestep[0].item())
            return (torch.full_like(hidden_states, 2.0) + self.w,)

    noise = torch.randn(1, 2, 1, 2, 2)
    cond = Conditioning(torch.zeros(1, 3, 4))
    config = SamplerConfig(steps=2, guidance_scale=1.0, scheduler="euler", flow_shift=3.0, sigmas=[0.9, 0.4])
    out = sample(Constant(), cond, (2, 1, 2, 2), config, noise=noise, progress=False).latents
    assert seen == pytest.approx([900.0, 400.0])
    assert torch.allclose(out, noise + (0.0 - 0.9) * 2.0, atol=1e-6)  # v = 2 carried from 0.9 to 0
    for bad, message in [({"steps": 3}, "own 2-step schedule"), ({"scheduler": "unipc"}, "sampled with euler"),
                         ({"sigmas": [0.4, 0.9]}, "must decrease"), ({"sigmas": [1.5, 0.4]}, "must decrease")]:  # fmt: skip
        with pytest.raises(PareError, match=message):
            SamplerConfig(**{**vars(config), **bad}).validate()


def test_segment_targets_carry_the_teacher_trajectory_to_its_final_latent(stage_inputs):
    """Euler steps with the targets, from each video's starting noise, land on the teacher's stored inputs at the
    boundaries and, at the end, on the teacher's final latent."""
    d, _ = stage_inputs
    data = SegmentData(d / "data", [0, 2])  # 4-step trajectories, a 2-step student
    grid = data.grid()
    assert len(grid) == 4 and grid[0] == pytest.approx(1.0, abs=1e-5) and data.levels == [grid[0], grid[2]]
    assert len(data) == 6 * 2  # 6 videos x 2 segments
    shard = load_file(str(d / "data" / "shard-00001.safetensors"))  # videos 2 and 3
    for p in range(2):
        first, second = data[data.offsets[1] + p], data[data.offsets[1] + 2 + p]
        assert data.locate(data.offsets[1] + p) == (1, p, 0) and data.locate(data.offsets[1] + 2 + p) == (1, p, 1)
        assert torch.equal(first["x_t"], shard["x_t"][p].float()) and first["timestep"] == pytest.approx(grid[0] * 1000)
        x = first["x_t"] + (grid[2] - grid[0]) * first["target"]
        assert torch.allclose(x, shard["x_t"][2 * 2 + p].float(), atol=1e-5)  # the teacher's input at step 2
        x = second["x_t"] + (0.0 - grid[2]) * second["target"]
        assert torch.allclose(x, shard["final"][p].float(), atol=1e-5)
        assert torch.equal(data.final(data.offsets[1] + p), shard["final"][p].float())


def test_data_made_before_final_latents_is_refused(stage_inputs, tmp_path):
    d, _ = stage_inputs
    old = tmp_path / "old"
    old.mkdir()
    (old / "index.json").write_text((d / "data" / "index.json").read_text())
    for shard in (d / "data").glob("shard-*.safetensors"):
        save_file({k: v for k, v in load_file(str(shard)).items() if k != "final"}, str(old / shard.name))
    with pytest.raises(PareError, match="no final latents"):
        SegmentData(old, [0, 2])


def step_args(d, teacher, out, train_steps=12):
    return ["step-distill", "--teacher", teacher, "--data", str(d / "data"), "--out", str(out), "--steps", "2",
            "--train-steps", str(train_steps), "--batch-size", "4", "--checkpoint-every", "4", "--lr", "1e-3",
            "--warmup-steps", "2", "--eval-every", "8", "--eval-prompts", "2"]  # fmt: skip


def test_step_distill_end_to_end_and_resume_after_kill(stage_inputs, tmp_path, capsys):
    """The student learns the segments (held-out error falls), exports a folder that samples in 2 steps with one
    forward each and no guidance; a run killed after a checkpoint and resumed ends with the same weights."""
    d, teacher = stage_inputs
    out = tmp_path / "student"
    assert main(step_args(d, teacher, out)) == 0
    bundle = load_bundle(str(out / "model"))
    record = bundle.manifest["training"]
    levels = record["sampler"]["sigmas"]
    assert bundle.kind == "pare:step-distilled" and record["boundaries"] == [0, 2] and record["teacher_steps"] == 4
    assert bundle.sampler_defaults == {"steps": 2, "guidance_scale": 1.0, "scheduler": "euler", "flow_shift": 1.0,
                                       "sigmas": levels}  # fmt: skip
    a, b = record["val_start"], record["val_end"]
    assert (a["examples"], a["videos"]) == (4, 2)  # the held-out shard: 2 videos x 2 segments
    # the domain evaluator on 2 held-out prompts at step 8 and at the end, drawn as a curve
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [(e["step"], e["samples"]) for e in evals] == [(8, 32), (12, 48)] and all("colour" in e for e in evals)
    assert (out / "eval_curve.png").stat().st_size > 0 and record["eval"] == {k: evals[-1][k] for k in record["eval"]}
    assert b["error"] < a["error"] and b["final_error"] < a["final_error"]
    # scripts/step_memorisation.py scores the held-out shard as the run's own last validation did
    check = subprocess.run([sys.executable, str(SCRIPTS / "step_memorisation.py"), "--model", str(out / "model"),
                            "--data", str(d / "data"), "--train-shards", "0"], capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert check.returncode == 0, check.stderr
    held = check.stdout.splitlines()[-1].split()
    assert held[0] == "held-out" and held[2:4] == ["4", "2"]  # 2 videos x 2 segments
    assert float(held[4]) == pytest.approx(b["error"], abs=1e-4)
    assert float(held[5]) == pytest.approx(b["final_error"], abs=1e-4)
    video = tmp_path / "v.gif"
    assert main(["generate", "--model", str(out / "model"), "--prompt", "a red circle bouncing", "--out", str(video)]) == 0
    steps = json.loads(video.with_suffix(".json").read_text())["steps"]
    assert [s["forwards"] for s in steps] == [1, 1] and [s["timestep"] for s in steps] == pytest.approx([l * 1000 for l in levels])
    # compared with the teacher, each on its own sampler from the same seeds: 2 forwards per video against 4 x 2
    assert main(["eval", "--model", str(out / "model"), "--reference", teacher, "--n", "2", "--steps", "4", "--out",
                 str(tmp_path / "eval")]) == 0  # fmt: skip
    ev = json.loads((tmp_path / "eval" / "results.json").read_text())
    m, r = ev["model_scores"], ev["reference_scores"]
    assert (len(m["blocks_run_per_step"]), len(r["blocks_run_per_step"])) == (2, 4)
    assert ev["samplers"]["model"]["sigmas"] == levels and ev["samplers"]["reference"]["steps"] == 4
    assert m["flops_per_video"] / r["flops_per_video"] == pytest.approx(2 / 8, rel=1e-3)
    # profiled and pruned on its own schedule: calibration trajectories of 2 steps, both kept; the pruned model
    # samples as its base does
    assert main(["profile", "--model", str(out / "model"), "--out", str(tmp_path / "prof"), "--videos", "2",
                 "--queries", "16"]) == 0  # fmt: skip
    settings = json.loads((tmp_path / "prof" / "heads.json").read_text())["settings"]
    assert (settings["steps"], settings["timesteps"]) == (2, [0, 1])
    assert main(["prune", "--model", str(out / "model"), "--profile", str(tmp_path / "prof" / "heads.json"), "--heads",
                 "0.5", "--ffn", "0.5", "--calibration-videos", "2", "--out", str(tmp_path / "pruned")]) == 0  # fmt: skip
    assert load_bundle(str(tmp_path / "pruned")).sampler_defaults == bundle.sampler_defaults
    # PARE on top: data of its own 2-step, guidance-free samples (the cond branch alone), distilled and routed
    data = tmp_path / "data2"
    assert main(["data", "--teacher", str(out / "model"), "--out", str(data), "--videos", "6", "--shard-videos", "2"]) == 0
    shard = load_file(str(data / "shard-00000.safetensors"))
    assert "v_uncond" not in shard and "null_text" not in shard and shard["x_t"].shape[0] == 2 * 2  # 2 videos x 2 steps
    assert shard["timestep"].tolist() == pytest.approx([l * 1000 for l in levels for _ in range(2)])
    assert main(["distill", "--teacher", str(out / "model"), "--student", str(tmp_path / "pruned"), "--data", str(data),
                 "--out", str(tmp_path / "distilled"), "--steps", "4", "--batch-size", "4", "--guided-weight", "1"]) == 0  # fmt: skip
    # the memory and time estimate reads the branches from the data: one sequence per example here, two in the
    # guided teacher's data of the same videos' shape, so half the training FLOPs
    def estimated_flops(folder) -> float:
        assert main(["distill", "--teacher", str(out / "model"), "--student", str(tmp_path / "pruned"), "--data",
                     str(folder), "--steps", "4", "--batch-size", "4", "--memory-estimate"]) == 0  # fmt: skip
        return float(re.search(r"time: ([0-9.e+]+) FLOP", capsys.readouterr().out).group(1))

    assert estimated_flops(data) / estimated_flops(d / "data") == pytest.approx(0.5, rel=0.02)
    val = load_bundle(str(tmp_path / "distilled" / "model")).manifest["training"]["val_start"]
    assert val["examples"] == 4 and val["error"] == val["guided_error"]  # one branch: it is what the sampler integrates
    # the memorisation check on a `pare distill` student: its velocities on the held-out shard, as the run validated
    check = subprocess.run([sys.executable, str(SCRIPTS / "step_memorisation.py"), "--model",
                            str(tmp_path / "distilled" / "model"), "--data", str(data), "--train-shards", "0"],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert check.returncode == 0, check.stderr
    held = check.stdout.splitlines()[-1].split()
    end = load_bundle(str(tmp_path / "distilled" / "model")).manifest["training"]["val_end"]
    assert held[:3] == ["held-out", "2", "4"] and float(held[3]) == pytest.approx(end["error"], abs=1e-4)
    # or the cut student trained on the teacher's own trajectories, with the rollout loss: it keeps its widths and
    # its base's 2 levels, and learns (held-out error falls); a cut of the teacher itself is no few-step student
    assert main([*step_args(d, teacher, tmp_path / "cut", train_steps=4), "--init-from", str(tmp_path / "pruned"),
                 "--rollout-weight", "1", "--rollout-examples", "2"]) == 0  # fmt: skip
    cut = load_bundle(str(tmp_path / "cut" / "model"))
    assert cut.transformer.config == load_bundle(str(tmp_path / "pruned")).transformer.config
    assert cut.sampler_defaults == bundle.sampler_defaults and cut.manifest["base"] == teacher
    assert cut.manifest["training"]["val_end"]["error"] < cut.manifest["training"]["val_start"]["error"]
    assert main([*step_args(d, teacher, tmp_path / "cut2", train_steps=1), "--init-from",
                 str(tmp_path / "distilled" / "model")]) == 0  # fmt: skip
    # that cut records the teacher as its base and its 2 levels in its own pare.json: PARE's stages after it keep
    # them (they took the base's 4 guided steps)
    assert main(["distill", "--teacher", str(out / "model"), "--student", str(tmp_path / "cut" / "model"), "--data",
                 str(data), "--out", str(tmp_path / "cut-distilled"), "--steps", "1", "--batch-size", "4"]) == 0  # fmt: skip
    assert main(["route", "--teacher", str(out / "model"), "--student", str(tmp_path / "cut" / "model"), "--data",
                 str(data), "--out", str(tmp_path / "cut-routed"), "--steps", "1", "--batch-size", "4", "--budget", "0.6",
                 "--warm-start-steps", "0"]) == 0  # fmt: skip
    for folder in ("cut-distilled", "cut-routed"):
        later = load_bundle(str(tmp_path / folder / "model"))
        assert later.sampler_defaults == bundle.sampler_defaults and later.manifest["base"] == teacher
    capsys.readouterr()
    assert main([*step_args(d, teacher, tmp_path / "x", train_steps=1), "--init-from", str(d / "student")]) == 2
    assert "or its `pare prune` / `pare distill` / `pare experts` output" in capsys.readouterr().err
    assert main(["route", "--teacher", str(out / "model"), "--student", str(tmp_path / "distilled" / "model"), "--data",
                 str(data), "--out", str(tmp_path / "routed"), "--steps", "4", "--batch-size", "4", "--budget", "0.6",
                 "--warm-start-steps", "20"]) == 0  # fmt: skip
    # what routing can gain on it: scripts/route_ceiling.py scores one branch per example on such data
    ceiling = subprocess.run([sys.executable, str(SCRIPTS / "route_ceiling.py"), "--student",
                              str(tmp_path / "distilled" / "model"), "--data", str(data), "--all-shards", "--budget", "0.6"],
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert ceiling.returncode == 0, ceiling.stderr
    lines = ceiling.stdout.splitlines()
    assert "on 12 held-out examples x 1 CFG branch(es)" in lines[0] and "6 rows per (timestep, CFG branch)" in lines
    static, per_t, per_row = (float(line.rsplit(" ", 1)[1]) for line in lines[-3:])
    assert per_row <= per_t <= static  # each oracle picks from the routes the one before it could pick
    importance = load_file(str(next(data.glob("block_importance-*"))))["importance"]
    assert importance.shape[1] == 1  # one branch per example
    routed = load_bundle(str(tmp_path / "routed" / "model"))
    assert routed.sampler_defaults == bundle.sampler_defaults
    warm = routed.manifest["training"]["notes"]["warm_start"]
    assert warm["rows"] + warm["held_out_rows"] == 8  # the 8 training examples of the 4 videos' 2 steps, one branch each
    # the bench: the teacher at its 4 guided steps, the students on their own 2 unguided ones, from the same seeds
    assert main(["bench", "--model", teacher, "--variant", f"2-step={out / 'model'}", "--variant",
                 f"2-step + PARE={tmp_path / 'routed' / 'model'}", "--caches", "none", "--n", "2", "--batch-size", "2",
                 "--steps", "4", "--out", str(tmp_path / "bench")]) == 0  # fmt: skip
    rows = {r["method"]: r for r in json.loads((tmp_path / "bench" / "results.json").read_text())["rows"]}
    assert [(r["steps"], r["passes"]) for r in rows.values()] == [(4, 2), (2, 1), (2, 1)]
    # the same architecture: per step one pass of two, per video 2 x 1 of 4 x 2 forwards
    assert rows["2-step"]["flops_ratio"] == pytest.approx(0.5, rel=1e-3)
    assert rows["2-step"]["video_flops_ratio"] == pytest.approx(0.25, rel=1e-3)
    assert rows["2-step + PARE"]["video_flops_ratio"] < 0.25 / 1.5  # pruned by half, then routed
    assert_resumes_after_kill(lambda folder: step_args(d, teacher, folder), out, tmp_path / "killed")


def assert_resumes_after_kill(args, out: Path, killed: Path) -> None:
    """The run of `args(killed)`, killed right after its checkpoint at step 4 (the loop's fault injection), then
    resumed by the same command, ends with the weights of the uninterrupted run in `out`."""
    cmd = [sys.executable, "-m", "pare.cli", *args(killed)]
    run = subprocess.run(cmd, env={**os.environ, KILL_AFTER_CHECKPOINT: "4"}, capture_output=True, text=True, timeout=300)
    assert run.returncode == -9 and json.loads((killed / "checkpoint" / "state.json").read_text())["step"] == 4
    assert main(args(killed)) == 0
    w1, w2 = (load_file(str(p / "model" / "transformer" / "diffusion_pytorch_model.safetensors")) for p in (out, killed))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_step_distill_refuses_data_of_another_teacher(stage_inputs, tmp_path, capsys):
    d, _ = stage_inputs
    assert main(["step-distill", "--teacher", str(d / "student"), "--data", str(d / "data"), "--out",
                 str(tmp_path / "x"), "--train-steps", "2"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "made by another teacher" in err and "Traceback" not in err


def test_more_data_pools_the_shards_of_another_seed_and_refuses_another_sampler(stage_inputs, tmp_path, capsys):
    """--more-data: every shard of a folder made with another --seed joins the training examples, read from that
    folder; the held-out shard stays --data's last; a folder of another sampler is refused in one line."""
    d, teacher = stage_inputs
    more = tmp_path / "more"
    assert main(["data", "--teacher", teacher, "--shard-videos", "2", "--steps", "4", "--out", str(more),
                 "--videos", "4", "--seed", "6"]) == 0  # fmt: skip
    data = SegmentData(d / "data", [0, 2], [0, 1], [more])
    assert len(data) == (4 + 4) * 2 and data.offsets[2] == 8  # 2 + 2 shards of 2 videos x 2 segments
    shard = load_file(str(more / "shard-00001.safetensors"))
    assert data.locate(data.offsets[3] + 3) == (3, 1, 1)
    assert torch.equal(data[data.offsets[3] + 1]["x_t"], shard["x_t"][1].float())  # video 1 of more's second shard
    out = tmp_path / "student"
    assert main([*step_args(d, teacher, out, train_steps=2), "--more-data", str(more)]) == 0
    record = load_bundle(str(out / "model")).manifest["training"]
    assert record["more_data"] == [str(more.resolve())] and record["val_end"]["videos"] == 2
    other = tmp_path / "other"
    assert main(["data", "--teacher", teacher, "--shard-videos", "2", "--steps", "3", "--out", str(other),
                 "--videos", "2"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main([*step_args(d, teacher, tmp_path / "x", train_steps=2), "--more-data", str(other)]) == 2
    err = capsys.readouterr().err
    assert "pooled folders differ only in `pare data --seed`" in err and "Traceback" not in err


def test_data_for_a_k_step_student_keeps_its_steps_and_trains_the_same_student(stage_inputs, tmp_path, capsys):
    """`pare data --student-steps 2` keeps, of 4-step trajectories, the rows of the teacher steps a 2-step student
    starts at (0 and 2), equal to those of the full data, and the final latents; step distillation on it trains
    the very same student as on the full data. What the kept steps cannot serve is refused in one line."""
    d, teacher = stage_inputs
    args = ["data", "--teacher", teacher, "--videos", "6", "--shard-videos", "2", "--steps", "4"]
    slim = tmp_path / "slim"
    assert main([*args, "--out", str(slim), "--student-steps", "2"]) == 0
    index = json.loads((slim / "index.json").read_text())
    full_index = json.loads((d / "data" / "index.json").read_text())
    assert index["steps_kept"] == [0, 2] and len(index["grid"]) == 4 and index["grid"][0] == pytest.approx(1.0, abs=1e-5)
    assert [s["examples"] for s in index["shards"]] == [4, 4, 4]  # 2 videos x 2 kept steps
    for name in ("shard-00000.safetensors", "shard-00002.safetensors"):
        full, kept = load_file(str(d / "data" / name)), load_file(str(slim / name))
        for key in ("x_t", "v_cond", "v_uncond", "timestep", "sigma"):  # step-major rows: 2 videos a step
            assert torch.equal(kept[key], torch.cat([full[key][0:2], full[key][4:6]])), key
        for key in ("final", "text", "null_text"):
            assert torch.equal(kept[key], full[key]), key
        assert kept["step"].tolist() == [0, 0, 2, 2] and full["step"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
        assert (slim / name).stat().st_size < 0.6 * (d / "data" / name).stat().st_size
    assert [round(g, 6) for g in index["grid"]] == [round(float(full["sigma"][2 * j]), 6) for j in range(4)]
    students = {}
    for name, folder in (("full", d / "data"), ("slim", slim)):
        out = tmp_path / f"student-{name}"
        run = [a if a != str(d / "data") else str(folder) for a in step_args(d, teacher, out, train_steps=2)]
        assert main(run) == 0
        students[name] = load_bundle(str(out / "model"))
    records = [students[k].manifest["training"] for k in ("full", "slim")]
    assert [(r["boundaries"], r["teacher_steps"]) for r in records] == [([0, 2], 4)] * 2
    assert records[0]["val_end"] == records[1]["val_end"]
    a, b = (students[k].transformer.state_dict() for k in ("full", "slim"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # an old folder's index, without the knobs added since, resumes as before
    old = tmp_path / "old"
    shutil.copytree(d / "data", old)
    (old / "index.json").write_text(json.dumps({**full_index, "config": {
        k: v for k, v in full_index["config"].items() if k not in ("student_steps", "student_shift")}}))
    assert main([*args, "--out", str(old)]) == 0
    capsys.readouterr()
    refusals = [
        (["step-distill", "--teacher", teacher, "--data", str(slim), "--out", str(tmp_path / "x"), "--steps", "3",
          "--train-steps", "2"], "holds only the teacher steps [0, 2]"),
        ([*step_args(d, teacher, tmp_path / "y", train_steps=2), "--more-data", str(slim)], "or --student-steps than"),
        (["distill", "--teacher", teacher, "--student", str(d / "student"), "--data", str(slim), "--out",
          str(tmp_path / "z"), "--steps", "2"], "only `pare step-distill` trains on"),
        ([*args, "--out", str(tmp_path / "w"), "--student-steps", "5"], "a student takes 1 to 4"),
        ([*args, "--out", str(tmp_path / "v"), "--student-shift", "5"], "--student-shift needs --student-steps"),
    ]
    for argv, message in refusals:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def test_two_processes_split_the_batch_and_the_validation(stage_inputs, tmp_path):
    """Under torchrun, two processes share each global batch and the held-out videos: the same starting error as one
    process (the validation's sums add up), weights at the end as one process's up to float reduction order."""
    from conftest import two_processes

    d, teacher = stage_inputs
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(step_args(d, teacher, one, train_steps=8)) == 0
    two_processes(step_args(d, teacher, two, train_steps=8), two)
    records = [load_bundle(str(p / "model")).manifest["training"] for p in (one, two)]
    assert (records[1]["processes"], records[1]["distributed"]) == (2, "MULTI_CPU")
    for key in ("error", "final_error"):
        assert records[0]["val_start"][key] == pytest.approx(records[1]["val_start"][key], rel=1e-5)
    assert records[0]["val_start"]["videos"] == records[1]["val_start"]["videos"] == 2
    a, b = (load_file(str(p / "model" / "transformer" / "diffusion_pytorch_model.safetensors")) for p in (one, two))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 10 * 1e-3  # 10 x lr: Adam amplifies sign noise near 0


class Still(torch.nn.Module):
    """A student whose velocity is 0: it never moves."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, hidden_states, **kw):
        return (hidden_states * self.w,)


def test_rollout_loss_known_answer():
    """A student whose velocity is 0 never moves: its rollout ends where it starts, whatever the levels."""
    from pare.stepdistill import rollout_loss

    g = torch.Generator().manual_seed(0)
    batch = {"x_t": torch.randn(3, 2, 1, 2, 2, generator=g), "final": torch.randn(3, 2, 1, 2, 2, generator=g),
             "text": torch.zeros(3, 4, 8), "segment": torch.tensor([0, 1, 1])}  # fmt: skip
    want = ((batch["x_t"] - batch["final"]) ** 2).mean()
    assert rollout_loss(Still(), batch, [1.0, 0.5]).item() == pytest.approx(want.item(), rel=1e-6)


def test_salience_weights_known_answer():
    """A flat background and one object on 2 of 16 positions at distance 5 from it: the object's distance is 8x the
    video's mean, so at strength 0.5 its positions weigh 1 + 0.5 x 8 = 5 and the background's 1."""
    from pare.stepdistill import salience_weights, weighted_mse

    final = torch.tensor([0.5, -1.0]).view(1, 2, 1, 1, 1).repeat(1, 1, 1, 4, 4)
    final[0, :, 0, 1, 2] = final[0, :, 0, 3, 0] = torch.tensor([3.5, 3.0])
    want = torch.ones(1, 1, 1, 4, 4)
    want[0, 0, 0, 1, 2] = want[0, 0, 0, 3, 0] = 5.0
    assert torch.allclose(salience_weights(final, 0.5), want)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 2, 1, 4, 4, generator=g), torch.randn(1, 2, 1, 4, 4, generator=g)
    assert weighted_mse(a, b, None).item() == torch.nn.functional.mse_loss(a, b).item()
    assert weighted_mse(a, b, torch.full_like(want, 3.0)).item() == pytest.approx(weighted_mse(a, b, None).item(), rel=1e-6)
    by_hand = ((a - b) ** 2 * want).sum() / (2 * want.sum())  # the weighted mean over positions and channels
    assert weighted_mse(a, b, want).item() == pytest.approx(by_hand.item(), rel=1e-6)
    # the student's latent draws the object where the teacher's does, and a second copy at (0, 0): three positions
    # at distance 5 of 16, a mean of 15/16, so each weighs 1 + 0.5 x 5 / (15/16) = 11/3; where the student draws
    # nothing (its own background) the teacher's objects alone count
    student = final.clone()
    student[0, :, 0, 0, 0] = torch.tensor([3.5, 3.0])
    both = torch.ones(1, 1, 1, 4, 4)
    both[0, 0, 0, 1, 2] = both[0, 0, 0, 3, 0] = both[0, 0, 0, 0, 0] = 11 / 3
    assert torch.allclose(salience_weights(final, 0.5, student), both)
    assert torch.allclose(salience_weights(final, 0.5, torch.zeros_like(final) + final[:, :, :, :1, 1:2]), want)


def test_salience_weighted_rollout_loss_and_run(stage_inputs, tmp_path, capsys):
    """The rollout loss weighs each position by its salience as the segment loss does; a run records the weight
    and trains with it."""
    from pare.stepdistill import rollout_loss, salience_weights

    g = torch.Generator().manual_seed(1)
    batch = {"x_t": torch.randn(3, 2, 1, 2, 2, generator=g), "final": torch.randn(3, 2, 1, 2, 2, generator=g),
             "text": torch.zeros(3, 4, 8), "segment": torch.tensor([0, 1, 1])}  # fmt: skip
    w = salience_weights(batch["final"], 2.0)
    want = ((batch["x_t"] - batch["final"]) ** 2 * w).sum() / (2 * w.sum())
    assert rollout_loss(Still(), batch, [1.0, 0.5], salience=2.0).item() == pytest.approx(want.item(), rel=1e-6)
    # from both: the rollout (here x_t, the model stands still) adds its own objects to the weights
    w = salience_weights(batch["final"], 2.0, batch["x_t"])
    want = ((batch["x_t"] - batch["final"]) ** 2 * w).sum() / (2 * w.sum())
    got = rollout_loss(Still(), batch, [1.0, 0.5], salience=2.0, salience_from="both")
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    d, teacher = stage_inputs
    out = tmp_path / "salient"
    assert main([*step_args(d, teacher, out, train_steps=2), "--salience-weight", "1", "--rollout-weight", "1",
                 "--rollout-examples", "2", "--salience-from", "both"]) == 0  # fmt: skip
    record = json.loads((out / "model" / "pare.json").read_text())
    assert '"salience_weight": 1.0' in json.dumps(record) and '"salience_from": "both"' in json.dumps(record)
    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 2 and log[-1]["segment"] > 0 and log[-1]["rollout"] > 0
    capsys.readouterr()
    for extra, message in [(["--salience-from", "both", "--salience-weight", "1"], "it needs --salience-weight and "
                            "--rollout-weight"), (["--salience-from", "student"], "--salience-from must be one of "
                            "teacher, both"), (["--train-steps", "0"], "--train-steps must be at least 1, got 0"),
                           (["--more-data", str(d / "data")], "name one folder twice")]:  # fmt: skip
        assert main([*step_args(d, teacher, tmp_path / "x"), *extra]) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_a_later_sitting_adds_the_rollout_loss_from_an_earlier_student(stage_inputs, tmp_path, capsys):
    d, teacher = stage_inputs
    first = tmp_path / "first"
    assert main(step_args(d, teacher, first, train_steps=4)) == 0
    later = [*step_args(d, teacher, tmp_path / "later", train_steps=2), "--init-from", str(first / "model"),
             "--rollout-weight", "1", "--rollout-examples", "2"]  # fmt: skip
    later[later.index("--lr") + 1] = "1e-12"  # one step from the loaded weights: the same model up to rounding
    assert main(later) == 0
    a = load_bundle(str(first / "model")).transformer.state_dict()
    b = load_bundle(str(tmp_path / "later" / "model")).transformer.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    log = [json.loads(l) for l in (tmp_path / "later" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["rollout"] > 0 and log[-1]["segment"] > 0  # the last step's two parts (the loss: the window's mean)
    capsys.readouterr()
    assert main([*step_args(d, teacher, tmp_path / "x", train_steps=2), "--init-from", teacher]) == 2
    assert "expected a `pare step-distill` student of this teacher" in capsys.readouterr().err


def test_another_flow_shift_moves_the_student_s_levels_and_may_start_from_a_student_on_others(stage_inputs, tmp_path):
    """--flow-shift picks the student's levels from the teacher's grid at that shift (a low shift: nearer the end);
    --init-from takes a student of the same K on other levels, which then learns the new ones; without --flow-shift
    a sitting keeps the levels of the student it starts from."""
    d, teacher = stage_inputs
    first = tmp_path / "first"
    assert main(step_args(d, teacher, first, train_steps=2)) == 0
    grid = SegmentData(d / "data", [0], [0]).grid()
    later = [*step_args(d, teacher, tmp_path / "later", train_steps=2), "--flow-shift", "0.2", "--init-from",
             str(first / "model")]  # fmt: skip
    assert main(later) == 0
    want = segment_boundaries(grid, 2, 0.2)
    record = load_bundle(str(tmp_path / "later" / "model")).manifest["training"]
    assert want == [0, 3] and record["boundaries"] == want and record["flow_shift"] == 0.2
    assert record["sampler"]["sigmas"] == [grid[0], grid[3]]
    assert record["init_levels"] == load_bundle(str(first / "model")).sampler_defaults["sigmas"] == [grid[0], grid[2]]
    # a sitting after it without --flow-shift keeps its levels, not the teacher's
    third = [*step_args(d, teacher, tmp_path / "third", train_steps=2), "--init-from", str(tmp_path / "later" / "model")]
    assert main(third) == 0
    record = load_bundle(str(tmp_path / "third" / "model")).manifest["training"]
    assert record["boundaries"] == [0, 3] and record["sampler"]["sigmas"] == [grid[0], grid[3]]
    assert main([*step_args(d, teacher, tmp_path / "x", train_steps=2), "--flow-shift", "0"]) == 2
    # a student of another teacher (its base) is refused
    other = tmp_path / "other"
    shutil.copytree(first / "model", other)
    manifest = json.loads((other / "pare.json").read_text())
    (other / "pare.json").write_text(json.dumps({**manifest, "base": str(d / "student")}))
    assert main([*step_args(d, teacher, tmp_path / "y", train_steps=2), "--init-from", str(other)]) == 2


def test_the_rollout_loss_is_refused_under_several_processes():
    from types import SimpleNamespace

    from pare.stepdistill import StepDistillConfig, StepDistillStage

    stage = StepDistillStage(StepDistillConfig(rollout_weight=1.0), "base", {"sigmas": [1.0, 0.5]})
    stage.prepare(SimpleNamespace(process_index=0, num_processes=1))
    with pytest.raises(PareError, match="--rollout-weight is supported in one process only"):
        stage.prepare(SimpleNamespace(process_index=1, num_processes=2))


def test_dmd_surrogate_has_the_distribution_matching_gradient():
    """d/dx0 of DMD's surrogate loss is (fake - real) / mean|x0 - real| per video / numel: known answer."""
    from pare.dmd import dmd_surrogate

    g = torch.Generator().manual_seed(0)
    x0, real, fake = (torch.randn(3, 2, 1, 2, 2, generator=g) for _ in range(3))
    x0.requires_grad_(True)
    dmd_surrogate(x0, real, fake).backward()
    scale = (x0.detach() - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    assert torch.allclose(x0.grad, (fake - real) / scale / x0.numel(), atol=1e-7)
    x0.grad = None
    dmd_surrogate(x0, real, real).backward()  # the critic agrees with the teacher: nothing to move
    assert torch.equal(x0.grad, torch.zeros_like(x0))


def test_dmd_student_sample_is_its_own_euler_steps_then_its_clean_estimate():
    """A student of constant velocity c reaches noise + (s_k - s_0) c at level s_k and estimates x0 = x - s_k c."""
    from pare.dmd import student_sample

    class Constant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c = torch.nn.Parameter(torch.tensor(0.5))

        def forward(self, hidden_states, **kw):
            return (torch.ones_like(hidden_states) * self.c,)

    noise, levels = torch.randn(2, 2, 1, 2, 2), [1.0, 0.75, 0.5, 0.25]
    for k in range(4):
        student = Constant()
        x0 = student_sample(student, noise, torch.zeros(2, 3, 4), levels, k, grad=True)
        assert torch.allclose(x0, noise + (levels[k] - 1.0) * 0.5 - levels[k] * 0.5, atol=1e-6)
        x0.sum().backward()  # the gradient reaches the student through its last forward only: d x0 / d c = -s_k
        assert student.c.grad.item() == pytest.approx(-levels[k] * x0.numel())


def test_dmd_moves_the_student_toward_the_teacher_and_away_from_the_critic():
    """Teacher and critic of constant velocities a and b: the teacher's clean estimate is x_t - t a, the critic's
    x_t - t b. With a > b the teacher's lies below the critic's, so the student's step must lower its x0 = x - s w,
    i.e. raise w (a negative gradient); with a < b the other way. The critic's own loss leaves the student alone."""
    from types import SimpleNamespace

    from pare.dmd import DMDStage, StudentAndCritic
    from pare.stepdistill import StepDistillConfig

    class Constant(torch.nn.Module):
        def __init__(self, value: float):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(value))

        def forward(self, hidden_states, **kw):
            return (torch.ones_like(hidden_states) * self.w,)

    batch = {"x_t": torch.zeros(4, 2, 1, 2, 2), "text": torch.zeros(4, 3, 4)}
    cpu = SimpleNamespace(process_index=0, num_processes=1, mixed_precision="no", device=torch.device("cpu"))
    for a, b, sign in ((1.0, 0.0, -1), (0.0, 1.0, 1)):
        model = StudentAndCritic(Constant(0.0), Constant(b))
        stage = DMDStage(StepDistillConfig(method="dmd", critic_updates=2), "base", {"sigmas": [1.0, 0.5]}, None,
                         Constant(a), None, 1.0)  # fmt: skip
        stage.prepare(cpu)
        loss, parts = stage.loss(model, batch, 1)  # step 1 of 2: the student's
        loss.backward()
        assert torch.sign(model.student.w.grad).item() == sign and "dmd" in parts
        model.zero_grad(set_to_none=True)
        stage.loss(model, batch, 0)[0].backward()  # step 0: the critic's alone
        assert model.student.w.grad is None and model.critic.w.grad is not None


def dmd_args(d, teacher, out, train_steps=6):
    args = step_args(d, teacher, out, train_steps)
    return [*args, "--method", "dmd", "--critic-updates", "2", "--lr", "1e-3"]


def test_dmd_end_to_end_critic_steps_resume_and_refusals(stage_inputs, tmp_path, capsys):
    """--method dmd: the critic learns on every step, the student on every --critic-updates-th (a one-step run
    exports the teacher unchanged); the export samples in K steps without guidance; killed and resumed, the same
    weights; what belongs to the other method, or to several processes, is refused."""
    from types import SimpleNamespace

    from pare.dmd import DMDStage
    from pare.stepdistill import StepDistillConfig

    d, teacher = stage_inputs
    one = tmp_path / "one"
    assert main([*dmd_args(d, teacher, one, train_steps=1), "--gradient-checkpointing"]) == 0  # step 0: the critic's
    a = load_bundle(teacher).transformer.state_dict()
    b = load_bundle(str(one / "model")).transformer.state_dict()
    assert all(torch.equal(a[k].float(), b[k]) for k in a)
    out = tmp_path / "dmd"
    assert main(dmd_args(d, teacher, out)) == 0
    bundle = load_bundle(str(out / "model"))
    record = bundle.manifest["training"]
    assert bundle.kind == "pare:step-distilled" and record["config"]["method"] == "dmd"
    assert record["prompts"]["count"] == 4096  # the built-in domain's training prompts, not the data's 4 videos'
    assert bundle.sampler_defaults["guidance_scale"] == 1.0 and len(bundle.sampler_defaults["sigmas"]) == 2
    assert any(not torch.equal(a[k].float(), v) for k, v in bundle.transformer.state_dict().items())
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 6 and log[-1]["critic"] > 0 and "dmd" in log[-1]  # step 6 trained the student
    assert_resumes_after_kill(lambda folder: dmd_args(d, teacher, folder), out, tmp_path / "killed")
    # from a student (the recipe of scripts/step_student.sh): a critic-only step leaves it as it was; the segment
    # loss rides along on the student's steps
    later = tmp_path / "later"
    common = ["--init-from", str(out / "model"), "--regression-weight", "1"]
    assert main([*dmd_args(d, teacher, later, train_steps=1), *common]) == 0
    c = load_bundle(str(later / "model")).transformer.state_dict()
    assert all(torch.equal(v, c[k]) for k, v in bundle.transformer.state_dict().items())
    assert main([*dmd_args(d, teacher, later, train_steps=2), *common]) == 0
    log = [json.loads(line) for line in (later / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 2 and log[-1]["segment"] > 0 and "dmd" in log[-1]
    capsys.readouterr()
    for extra, message in [(["--rollout-weight", "1"], "--rollout-weight belongs to --method segment"),
                           (["--salience-weight", "1"], "--salience-weight belongs to --method segment"),
                           (["--critic-updates", "0"], "--critic-updates must be at least 1")]:  # fmt: skip
        assert main([*dmd_args(d, teacher, tmp_path / "x"), *extra]) == 2
        assert message in capsys.readouterr().err
    for extra in (["--regression-weight", "1"], ["--critic-updates", "5"], ["--critic-lr", "1e-4"]):
        assert main([*step_args(d, teacher, tmp_path / "x"), *extra]) == 2
        assert "to --method dmd" in capsys.readouterr().err
    (tmp_path / "p.txt").write_text("a red circle\n")
    assert main([*step_args(d, teacher, tmp_path / "x"), "--prompts", str(tmp_path / "p.txt")]) == 2
    assert "--prompts belongs to --method dmd" in capsys.readouterr().err
    (tmp_path / "bad.txt").write_text("a red circle\na zebra grazing\n")  # a word the built-in encoder does not know
    assert main([*dmd_args(d, teacher, tmp_path / "y"), "--prompts", str(tmp_path / "bad.txt")]) == 2
    assert "Traceback" not in capsys.readouterr().err and not (tmp_path / "y").exists()
    stage = DMDStage(StepDistillConfig(method="dmd"), "base", {"sigmas": [1.0, 0.5]}, None, None, None, 1.0)
    with pytest.raises(PareError, match="--method dmd runs in one process"):
        stage.prepare(SimpleNamespace(process_index=1, num_processes=2))


def test_dmd_moves_no_student_weight_when_the_critic_is_the_teacher(stage_inputs):
    """Without guidance, a critic equal to the teacher gives fake == real: the student's gradient is exactly 0."""
    from types import SimpleNamespace

    from pare.dmd import DMDStage, StudentAndCritic
    from pare.stepdistill import StepDistillConfig

    d, teacher = stage_inputs
    data = SegmentData(d / "data", [0, 2], [0])
    batch = {k: torch.stack([data[i][k] for i in range(2)]) for k in data[0]}
    model = StudentAndCritic(*(load_bundle(teacher).transformer.float() for _ in range(2)))
    stage = DMDStage(StepDistillConfig(method="dmd", critic_updates=1), "base", {"sigmas": data.levels}, None,
                     load_bundle(teacher).transformer, None, 1.0)  # fmt: skip
    stage.prepare(SimpleNamespace(process_index=0, num_processes=1, mixed_precision="no", device=torch.device("cpu")))
    loss, parts = stage.loss(model, batch, 0)
    loss.backward()
    assert parts["dmd"].item() == 0.0 and parts["critic"].item() > 0
    assert all(p.grad is None or torch.equal(p.grad, torch.zeros_like(p)) for p in model.student.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.critic.parameters())
