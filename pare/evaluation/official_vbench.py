"""Official VBench on `pare eval`'s videos, for users who have VBench's weights.

The `vbench` package (0.1.5) pins libraries this project cannot share (transformers 4.33, numpy < 2, a CUDA
torch of its own), so it runs in its own virtual environment, created on request (`setup_environment`), as a
subprocess: `python -m vbench.launch.evaluate --mode custom_input`. Custom-input mode scores any folder of
videos on the dimensions that need no per-prompt metadata; the prompt of each video comes from a JSON file
(file name -> prompt), so file names here are `{prompt, made safe}-{index}.mp4` and need not spell the prompt.

VBench downloads a missing checkpoint with wget when it needs it; PARE never downloads, so every file the
chosen dimensions need is checked under `--vbench-cache` before anything is generated (`missing_files`), and
a missing one is an error that lists them. Two quirks of VBench 0.1.5 handled here: its launcher initialises
NCCL on `cuda` (a GPU is required, checked up front), and subject_consistency checks the DINO checkpoint in
the cache but loads it through torch.hub from `$TORCH_HOME/hub/checkpoints` (a link to the cached file is
made there, in the output folder).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from ..errors import require
from ..video import write_video

VBENCH_VERSION = "0.1.5"
# What the environment gets: VBench's wheel asks for no torch, its README wants a CUDA build (11.8 / 12.1), and
# its repository pins pyiqa 0.1.10 (later pyiqa releases need newer transformers than VBench's 4.33.2).
ENVIRONMENT_PACKAGES = ("torch==2.1.2", "torchvision==0.16.2", f"vbench=={VBENCH_VERSION}", "pyiqa==0.1.10",
                        "numpy<2", "decord==0.6.0")  # fmt: skip

_DINO = "dino_model/dino_vitbase16_pretrain.pth"
_VICLIP = ("ViCLIP/ViClip-InternVid-10M-FLT.pth", "ViCLIP/bpe_simple_vocab_16e6.txt.gz")
# Files each dimension loads with --load_ckpt_from_local, relative to the VBench cache (vbench/utils.py,
# init_submodules). Dimensions custom-input mode refuses, or that read labels from file names
# (human_action), are left out.
WEIGHTS: dict[str, tuple[str, ...]] = {
    "subject_consistency": ("dino_model/facebookresearch_dino_main/hubconf.py", _DINO),
    "background_consistency": ("clip_model/ViT-B-32.pt",),
    "aesthetic_quality": ("aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth", "clip_model/ViT-L-14.pt"),
    "imaging_quality": ("pyiqa_model/musiq_spaq_ckpt-358bb6af.pth",),
    "motion_smoothness": ("amt_model/amt-s.pth",),
    "dynamic_degree": ("raft_model/models/raft-things.pth",),
    "temporal_flickering": (),
    "overall_consistency": _VICLIP,
    "temporal_style": _VICLIP,
}
# The six VBench's README lists for custom input (temporal_flickering and the ViCLIP two can be asked for).
DEFAULT_DIMENSIONS = ("subject_consistency", "background_consistency", "motion_smoothness", "dynamic_degree",
                      "aesthetic_quality", "imaging_quality")  # fmt: skip


def parse_dimensions(text: str) -> list[str]:
    dims = [d.strip() for d in text.split(",") if d.strip()]
    bad = [d for d in dims if d not in WEIGHTS]
    require(dims and not bad, f"--vbench-dimensions takes a comma-separated list from {', '.join(WEIGHTS)}; "
            f"got {text!r}")  # fmt: skip
    return dims


def missing_files(cache: Path, dimensions: list[str]) -> list[str]:
    """The files under `cache` that `dimensions` need and that are not there, each once, in order."""
    needed = dict.fromkeys(f for d in dimensions for f in WEIGHTS[d])
    return [f for f in needed if not (Path(cache) / f).is_file()]


def check_cache(cache: Path | None, dimensions: list[str]) -> Path:
    require(cache is not None, "--vbench needs --vbench-cache DIR: the folder holding VBench's checkpoints "
            "(its VBENCH_CACHE_DIR, by default ~/.cache/vbench)")  # fmt: skip
    cache = Path(cache).expanduser()
    require(cache.is_dir(), f"--vbench-cache {cache}: no such folder (expected VBench's checkpoint cache)")
    missing = missing_files(cache, dimensions)
    require(not missing, f"--vbench-cache {cache} lacks {len(missing)} file(s) VBench needs for "
            f"{', '.join(dimensions)}: {', '.join(missing)} (PARE never downloads; fetch them as VBench's README "
            "says, or choose other --vbench-dimensions)")  # fmt: skip
    return cache


def environment_python(env: Path) -> Path:
    return Path(env) / "bin" / "python"


def setup_environment(env: Path, python: str) -> None:
    """Create the virtual environment VBench runs in and install it there (several GB: a CUDA torch)."""
    env = Path(env).expanduser()
    require(not env.exists() or not any(env.iterdir()), f"--vbench-env {env} exists and is not empty: remove it "
            "or pass another folder to set up")  # fmt: skip
    try:
        subprocess.run([python, "-m", "venv", str(env)], check=True)
        subprocess.run([str(environment_python(env)), "-m", "pip", "install", *ENVIRONMENT_PACKAGES], check=True)
    except FileNotFoundError:
        require(False, f"--vbench-python {python}: no such interpreter (VBench {VBENCH_VERSION} needs Python 3.10 "
                "or 3.11: its transformers pin has no wheels for 3.12)")  # fmt: skip
    except subprocess.CalledProcessError as e:
        require(False, f"setting up VBench in {env} failed ({' '.join(map(str, e.cmd[:4]))} ... exited "
                f"{e.returncode}); see the output above")  # fmt: skip


def check_environment(env: Path) -> Path:
    """The environment's python, after checking that it imports vbench and sees a CUDA GPU."""
    python = environment_python(Path(env).expanduser())
    require(python.is_file(), f"no VBench environment at {env}: add --vbench-setup to create it (installs "
            f"vbench=={VBENCH_VERSION} and a CUDA torch there, several GB)")  # fmt: skip
    probe = "import vbench, torch; print(torch.cuda.is_available())"
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
    require(done.returncode == 0, f"the VBench environment at {env} cannot import vbench: "
            f"{(done.stderr.strip().splitlines() or ['no output'])[-1]}")  # fmt: skip
    require(done.stdout.strip().endswith("True"), f"VBench runs on a CUDA GPU only (its launcher starts NCCL on "
            f"cuda) and the environment at {env} sees none")  # fmt: skip
    return python


def video_name(prompt: str, index: int) -> str:
    """`{prompt}-{index}.mp4` with the prompt reduced to characters every file system takes."""
    safe = re.sub(r"[^A-Za-z0-9 ,._-]+", "_", prompt).strip(" .")[:150] or "video"
    return f"{safe}-{index}.mp4"


def save_videos(folder: Path, videos: np.ndarray, prompts: list[str]) -> tuple[Path, list[str]]:
    """Videos as `folder/{name}.mp4` (upscaled like `pare generate`'s) and `folder.json`: file name -> prompt.
    Returns the prompt file and the file names, in prompt order."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [video_name(p, i) for i, p in enumerate(prompts)]
    for name, frames in zip(names, videos):
        write_video(folder / name, frames)
    prompt_file = folder.with_suffix(".json")
    prompt_file.write_text(json.dumps(dict(zip(names, prompts)), indent=1))
    return prompt_file, names


def _free_port() -> int:
    """A free TCP port for the launcher's rendezvous (its default 29500 clashes between concurrent runs)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_vbench(python: Path, cache: Path, videos: Path, prompt_file: Path, dimensions: list[str], out: Path) -> dict:
    """Run VBench on a folder of videos; returns {dimension: {"score", "per_video": {file name: value}}}."""
    out.mkdir(parents=True, exist_ok=True)
    torch_home = out / "torch_home"
    dino = torch_home / "hub" / "checkpoints" / Path(_DINO).name
    if "subject_consistency" in dimensions and not dino.exists():
        dino.parent.mkdir(parents=True, exist_ok=True)
        dino.symlink_to((cache / _DINO).resolve())
    env = {**os.environ, "VBENCH_CACHE_DIR": str(cache), "TORCH_HOME": str(torch_home), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port()), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}  # fmt: skip
    # --load_ckpt_from_local is argparse type=bool in VBench: any non-empty value means True
    cmd = [str(python), "-m", "vbench.launch.evaluate", "--videos_path", str(videos), "--dimension", *dimensions,
           "--mode", "custom_input", "--prompt_file", str(prompt_file), "--output_path", str(out),
           "--load_ckpt_from_local", "True"]  # fmt: skip
    log = out / "vbench.log"
    with log.open("w") as f:
        done = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    results = sorted(out.glob("*_eval_results.json"), key=lambda p: p.stat().st_mtime)
    if done.returncode != 0 or not results:
        tail = (log.read_text().strip().splitlines() or ["no output"])[-1]
        require(False, f"VBench failed on {videos} (exit {done.returncode}): {tail} (full log: {log})")
    raw = json.loads(results[-1].read_text())
    scores = {}
    for dim in dimensions:
        require(dim in raw, f"VBench's {results[-1]} has no {dim!r} score (full log: {log})")
        aggregate, per_video = raw[dim]
        # per-video values are numbers, or booleans (dynamic_degree)
        scores[dim] = {"score": float(aggregate),
                       "per_video": {Path(v["video_path"]).name: float(v["video_results"]) for v in per_video}}  # fmt: skip
    return scores


def official_scores(python: Path, cache: Path, videos: dict[str, np.ndarray], prompts: list[str],
                    dimensions: list[str], folder: Path) -> dict:  # fmt: skip
    """Save each model's videos with VBench's naming, score them, and return
    {label: {dimension: score}, "per_video": {label: {dimension: [value per prompt]}}, "dimensions", "version"}.
    VBench's aggregates are kept as it reports them (imaging_quality: /100; the consistencies: over frames)."""
    merged: dict = {"version": VBENCH_VERSION, "dimensions": dimensions, "per_video": {}}
    for label, frames in videos.items():
        prompt_file, names = save_videos(folder / "videos" / label, frames, prompts)
        scores = run_vbench(python, cache, folder / "videos" / label, prompt_file, dimensions, folder / "results" / label)
        merged[label] = {d: s["score"] for d, s in scores.items()}
        merged["per_video"][label] = {d: [s["per_video"].get(n, float("nan")) for n in names] for d, s in scores.items()}
    return merged


def main_python() -> str:
    """The interpreter `--vbench-setup` uses by default: python3.11 when there is one, else this one."""
    from shutil import which

    return which("python3.11") or which("python3.10") or sys.executable
