"""`pare eval --vbench`: the weight check, and the whole round trip through a stand-in VBench environment (a
`bin/python` that answers like `python -m vbench.launch.evaluate` does: the real package needs a CUDA GPU)."""

import json
import sys

import pytest

from pare.cli import VBENCH_DIMENSIONS, main
from pare.evaluation.official_vbench import DEFAULT_DIMENSIONS, missing_files, video_name
from pare.video import read_video

STAND_IN = r'''
import argparse, json, os, sys
from pathlib import Path

args = sys.argv[1:]
if args[0] == "-c":  # the environment probe: imports vbench and torch, prints torch.cuda.is_available()
    print("False" if os.environ.get("STAND_IN_NO_GPU") else "True")
    sys.exit(0)
assert args[:2] == ["-m", "vbench.launch.evaluate"], args
if os.environ.get("STAND_IN_FAIL"):
    print("RuntimeError: CUDA out of memory")
    sys.exit(1)
p = argparse.ArgumentParser()
for flag in ("--videos_path", "--mode", "--prompt_file", "--output_path", "--load_ckpt_from_local"):
    p.add_argument(flag)
p.add_argument("--dimension", nargs="+")
a = p.parse_args(args[2:])
assert a.mode == "custom_input" and a.load_ckpt_from_local == "True"
assert Path(os.environ["VBENCH_CACHE_DIR"]).is_dir()
from pare.video import read_video

per = []
for name, prompt in json.loads(Path(a.prompt_file).read_text()).items():  # every video must have its prompt
    frames = read_video(Path(a.videos_path) / name)
    per.append({"video_path": os.path.join(a.videos_path, name), "video_results": 1000 * len(frames) + len(prompt)})
scores = {d: [sum(v["video_results"] for v in per) / len(per), per] for d in a.dimension}
Path(a.output_path, "results_2026-01-01-00:00:00_eval_results.json").write_text(json.dumps(scores))
'''


@pytest.fixture
def stand_in_env(tmp_path):
    env = tmp_path / "vbench-env"
    (env / "bin").mkdir(parents=True)
    script = tmp_path / "stand_in_vbench.py"
    script.write_text(STAND_IN)
    python = env / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" "$@"\n')
    python.chmod(0o755)
    return env


@pytest.fixture
def cache(tmp_path):
    c = tmp_path / "vbench-cache"
    (c / "amt_model").mkdir(parents=True)
    (c / "amt_model" / "amt-s.pth").write_bytes(b"")
    return c


def test_cli_default_dimensions_match_the_module():
    assert VBENCH_DIMENSIONS == DEFAULT_DIMENSIONS


def test_missing_files_known_answer(tmp_path):
    (tmp_path / "clip_model").mkdir()
    (tmp_path / "clip_model" / "ViT-L-14.pt").write_bytes(b"")
    assert missing_files(tmp_path, ["temporal_flickering"]) == []
    assert missing_files(tmp_path, ["aesthetic_quality", "background_consistency"]) == [
        "aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth", "clip_model/ViT-B-32.pt"]
    # a file two dimensions share is listed once
    assert missing_files(tmp_path, ["overall_consistency", "temporal_style"]) == [
        "ViCLIP/ViClip-InternVid-10M-FLT.pth", "ViCLIP/bpe_simple_vocab_16e6.txt.gz"]


def test_video_names_are_safe_and_keep_the_index():
    assert video_name("a red circle moving right", 3) == "a red circle moving right-3.mp4"
    assert video_name("cats/dogs: \"fight\"?", 0) == "cats_dogs_ _fight_-0.mp4"


def test_missing_weights_stop_before_generating(stage_inputs, tmp_path, capsys):
    _, teacher = stage_inputs
    empty = tmp_path / "empty-cache"
    empty.mkdir()
    out = tmp_path / "eval"
    assert main(["eval", "--model", teacher, "--reference", teacher, "--n", "2", "--steps", "2", "--out", str(out),
                 "--vbench", "--vbench-cache", str(empty)]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    for f in ("dino_model/dino_vitbase16_pretrain.pth", "raft_model/models/raft-things.pth", "amt_model/amt-s.pth",
              "pyiqa_model/musiq_spaq_ckpt-358bb6af.pth", "clip_model/ViT-B-32.pt"):
        assert f in err
    assert not out.exists()


@pytest.mark.parametrize("extra, message", [
    (["--vbench-dimensions", "color"], "--vbench-dimensions takes"),
    (["--vbench-cache", "/nonexistent/cache"], "no such folder"),
])  # fmt: skip
def test_vbench_bad_input(stage_inputs, tmp_path, capsys, extra, message):
    _, teacher = stage_inputs
    args = ["eval", "--model", teacher, "--reference", teacher, "--out", str(tmp_path / "o"), "--vbench"]
    assert main(args + extra) == 2
    assert message in capsys.readouterr().err
    assert main(args[:-1] + extra) == 2  # the same option without --vbench would be ignored: refused
    assert "go with --vbench" in capsys.readouterr().err


def test_vbench_round_trip_through_its_environment(stage_inputs, tmp_path, stand_in_env, cache, capsys):
    _, teacher = stage_inputs
    out = tmp_path / "eval"
    dims = "temporal_flickering,motion_smoothness"
    assert main(["eval", "--model", teacher, "--reference", teacher, "--n", "2", "--steps", "2", "--out", str(out),
                 "--vbench", "--vbench-cache", str(cache), "--vbench-env", str(stand_in_env),
                 "--vbench-dimensions", dims]) == 0  # fmt: skip
    r = json.loads((out / "results.json").read_text())
    prompts = r["prompts"]
    for label in ("model", "reference"):
        folder = out / "vbench" / "videos" / label
        assert json.loads(folder.with_suffix(".json").read_text()) == {video_name(p, i): p for i, p in enumerate(prompts)}
        frames = len(read_video(folder / video_name(prompts[0], 0)))
        expected = [1000 * frames + len(p) for p in prompts]  # what the stand-in scores each video
        assert r["vbench"]["per_video"][label]["motion_smoothness"] == expected
        assert r["vbench"][label]["temporal_flickering"] == pytest.approx(sum(expected) / len(expected))
    assert r["vbench"]["dimensions"] == dims.split(",")
    assert "VBench motion_smoothness (official)" in (out / "results.md").read_text()


def test_vbench_failures_are_one_line(stage_inputs, tmp_path, stand_in_env, cache, capsys, monkeypatch):
    _, teacher = stage_inputs
    args = ["eval", "--model", teacher, "--reference", teacher, "--n", "1", "--steps", "2", "--vbench",
            "--vbench-cache", str(cache), "--vbench-env", str(stand_in_env), "--vbench-dimensions", "motion_smoothness"]
    monkeypatch.setenv("STAND_IN_NO_GPU", "1")
    assert main(args + ["--out", str(tmp_path / "a")]) == 2
    assert "CUDA GPU only" in capsys.readouterr().err
    monkeypatch.delenv("STAND_IN_NO_GPU")
    monkeypatch.setenv("STAND_IN_FAIL", "1")
    assert main(args + ["--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    # generation's progress bars come first (carriage returns); the failure itself is one line, no traceback
    message = [line for line in err.splitlines() if line.startswith("pare: error:")]
    assert len(message) == 1 and err.endswith(message[0]) and "Traceback" not in err
    assert "CUDA out of memory" in message[0] and "vbench.log" in message[0]
    assert not (tmp_path / "b" / "results.json").exists()
    assert main(args + ["--out", str(tmp_path / "c"), "--vbench-env", str(tmp_path / "none")]) == 2
    assert "--vbench-setup" in capsys.readouterr().err
