"""Every stage at Wan2.1-T2V-1.3B's real widths on the CPU: a randomly initialised 1.3B transformer (30 blocks, 12
heads of 128, width 1,536) at a tiny video shape goes through profile -> prune -> (save, load) -> data -> one
distillation step -> one routing step -> generate, each stage a `pare` command in its own process, with that
process's peak host memory (ru_maxrss) against the model's fp32 size.

    python scripts/real_width_run.py --work /tmp/wan13 [--keep]

Real widths exercise what the tiny test configs do not: RoPE splits of 44/42/42 dims per head, 12-head q/k
norms, 16-channel latents, 512 text tokens of width 4,096, and memory at a real parameter count. The weights
are random (nothing is downloaded): the run checks that the stages work and what they hold in memory, not
quality. A Wan pipeline folder is assembled on the spot: the transformer and a randomly initialised
`AutoencoderKLWan` (diffusers' defaults), prompts as precomputed embeddings (no text encoder).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

MODEL = "wan2.1-t2v-1.3b"
SHAPE = ("--frames", "5", "--height", "32", "--width", "32")  # latents (2, 4, 4): 8 tokens with patch (1, 2, 2)


def build_pipeline_folder(folder: Path) -> int:
    """A Wan pipeline folder of random weights; returns the transformer's parameter count."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel

    from pare.loading import WAN_CONFIGS

    torch.manual_seed(0)
    model = WanTransformer3DModel(**WAN_CONFIGS[MODEL])
    count = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder / "transformer")
    del model
    AutoencoderKLWan().save_pretrained(folder / "vae")
    UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0).save_pretrained(
        folder / "scheduler"
    )
    index = {"_class_name": "WanPipeline", "_diffusers_version": "0.35.0", "transformer": ["diffusers", "WanTransformer3DModel"],
             "vae": ["diffusers", "AutoencoderKLWan"], "scheduler": ["diffusers", "UniPCMultistepScheduler"],
             "text_encoder": [None, None], "tokenizer": [None, None]}  # fmt: skip
    (folder / "model_index.json").write_text(json.dumps(index, indent=1))
    return count


def write_embeds(path: Path) -> None:
    from pare.components import save_embeddings

    g = torch.Generator().manual_seed(1)
    prompts = ["a red circle moving left", "a blue square bouncing"]
    save_embeddings(path, prompts, torch.randn(2, 512, 4096, generator=g) * 0.1, torch.zeros(512, 4096))


class StageFailed(RuntimeError):
    pass


def stage(name: str, args: list[str], log: Path) -> tuple[float, float]:
    """Run `pare ARGS` in a child process; (seconds, peak resident GiB of that process)."""
    t0 = time.time()
    with log.open("a") as f:
        f.write(f"\n$ pare {' '.join(args)}\n")
        f.flush()
        proc = subprocess.Popen([sys.executable, "-m", "pare.cli", *args], stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise StageFailed(f"{name} failed (exit {code}); see {log}")
    return time.time() - t0, usage.ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def run(w: Path, heads: str = "0.5", ffn: str = "0.5", keep: bool = False, echo=print) -> dict:
    """Every stage in `w` (emptied first); returns {"params", "fp32_gib", "stages": [(name, seconds, peak GiB)]},
    also written to w/peaks.json."""
    if w.exists():
        shutil.rmtree(w)
    w.mkdir(parents=True)
    log = w / "log.txt"
    t0 = time.time()
    params = build_pipeline_folder(w / "wan")
    write_embeds(w / "embeds.safetensors")
    fp32_gib = params * 4 / 2**30
    echo(f"{MODEL}, random weights: {params / 1e9:.3f}B parameters, {fp32_gib:.2f} GiB in fp32 "
         f"(built and saved in {time.time() - t0:.0f} s)")  # fmt: skip
    m, e = str(w / "wan"), str(w / "embeds.safetensors")
    stages = [
        ("profile", ["profile", "--model", m, "--embeds", e, "--out", str(w / "profile"), "--videos", "1",
                     "--steps", "2", "--timesteps", "0", "--batch-size", "1", "--removal", "none", *SHAPE]),
        ("prune", ["prune", "--model", m, "--profile", str(w / "profile" / "heads.json"), "--heads", heads,
                   "--ffn", ffn, "--embeds", e, "--calibration-videos", "1", "--out", str(w / "pruned")]),
        ("data", ["data", "--teacher", m, "--embeds", e, "--videos", "2", "--shard-videos", "1", "--steps", "2",
                  "--out", str(w / "data"), *SHAPE]),
        ("distill", ["distill", "--teacher", m, "--student", str(w / "pruned"), "--data", str(w / "data"), "--out",
                     str(w / "distill"), "--steps", "1", "--batch-size", "1", "--warmup-steps", "1"]),
        ("route", ["route", "--teacher", m, "--student", str(w / "distill" / "model"), "--data", str(w / "data"),
                   "--out", str(w / "route"), "--steps", "1", "--batch-size", "1", "--importance-examples", "1"]),
        ("generate", ["generate", "--model", str(w / "route" / "model"), "--embeds", e, "--prompt",
                      "a red circle moving left", "--steps", "2",
                      "--out", str(w / "video.gif"), *SHAPE]),
    ]  # fmt: skip
    rows = []
    for name, args in stages:
        seconds, peak = stage(name, args, log)
        rows.append((name, seconds, peak))
        echo(f"{name:<9} {seconds:6.0f} s   peak {peak:5.2f} GiB = {peak / fp32_gib:.2f} x the fp32 model")
    worst = max(r[2] for r in rows)
    echo(f"largest peak: {worst:.2f} GiB = {worst / fp32_gib:.2f} x the fp32 model ({fp32_gib:.2f} GiB); "
         f"total {time.time() - t0:.0f} s; commands and output in {log}")  # fmt: skip
    result = {"params": params, "fp32_gib": fp32_gib, "stages": rows}
    (w / "peaks.json").write_text(json.dumps(result, indent=1))
    if not keep:
        shutil.rmtree(w / "wan")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="scratch folder (about 12 GB of weights)")
    p.add_argument("--heads", default="0.5")
    p.add_argument("--ffn", default="0.5")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    a = p.parse_args()
    try:
        run(a.work, a.heads, a.ffn, a.keep, echo=lambda line: print(line, flush=True))
    except StageFailed as exc:
        sys.exit(str(exc))


if __name__ == "__main__":
    main()
