"""`pare eval`: a model against a reference on the same prompts, seeds, scheduler, steps and guidance.

Reports fidelity to the reference (PSNR, SSIM per video and mean), VBench dimensions that need no downloaded
network (temporal flickering exactly; dynamic degree and motion smoothness through named proxies, see
`pare.evaluation.vbench`), the shapes evaluator's scores for models of that domain, and compute: FLOPs per
step, blocks run per step, measured seconds per video.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..generate import generate, heldout_images
from ..loading import ModelBundle
from ..sampling import SamplerConfig
from .fidelity import mean_psnr, psnr, ssim
from .vbench import PROXIES, dynamic_degree, motion_smoothness, temporal_flickering


@dataclass
class EvalConfig:
    """Knobs of `pare eval`; sampler settings default to the reference model's."""

    steps: int | None = None
    guidance_scale: float | None = None
    seed: int = 0
    batch_size: int = 16


def run_model(bundle: ModelBundle, prompts: list[str], sampler: SamplerConfig, batch_size: int,
              progress: bool = False, desc: str = "generate") -> dict:  # fmt: skip
    """Videos (B, F, H, W, 3) uint8, the per-step compute record and the wall time of generating them."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(prompts) * sampler.steps, desc=desc, unit="video-step", disable=not progress)
    images = heldout_images(bundle, prompts)
    videos, steps, start = [], [], time.perf_counter()
    for lo in range(0, len(prompts), batch_size):
        chunk = SamplerConfig(**{**vars(sampler), "seed": sampler.seed + lo})  # video i keeps seed + i
        batch = prompts[lo : lo + batch_size]
        gen = generate(bundle, batch, chunk, progress=False, on_step=lambda _, n=len(batch): bar.update(n),
                       images=None if images is None else images[lo : lo + batch_size])  # fmt: skip
        videos.append(gen.videos)
        steps.append(gen.result.steps)
    seconds = time.perf_counter() - start
    bar.close()
    n_steps = len(steps[0])
    merged = [{"flops": sum(s[i].flops for s in steps), "full_flops": sum(s[i].full_flops for s in steps),
               "forwards": sum(s[i].forwards for s in steps),
               "blocks_run": sum(s[i].blocks_run * s[i].forwards for s in steps) / sum(s[i].forwards for s in steps)}
              for i in range(n_steps)]  # fmt: skip
    return {"videos": torch.cat(videos).numpy(), "steps": merged, "seconds": seconds}


def _summary(run: dict, n: int) -> dict:
    v = run["videos"]
    steps = run["steps"]
    return {
        "temporal_flickering": float(np.mean([temporal_flickering(x) for x in v])),
        "dynamic_degree": dynamic_degree(v),
        "motion_smoothness": float(np.mean([motion_smoothness(x) for x in v])),
        "flops_per_step": float(np.mean([s["flops"] for s in steps])) / n,  # per video, both CFG branches
        "flops_per_video": float(sum(s["flops"] for s in steps)) / n,  # every step (a few-step model: its K)
        "flops_ratio": float(sum(s["flops"] for s in steps) / sum(s["full_flops"] for s in steps)),
        "blocks_run_per_step": [round(s["blocks_run"], 3) for s in steps],
        "seconds_per_video": run["seconds"] / n,
    }


def paired_sampler(reference: ModelBundle, config: EvalConfig) -> SamplerConfig:
    """The sampler every compared model uses: the reference's defaults, with the steps, guidance and seed asked for."""
    chosen = {k: v for k, v in (("steps", config.steps), ("guidance_scale", config.guidance_scale)) if v is not None}
    sampler = SamplerConfig(**{**reference.sampler_defaults, **chosen, "seed": config.seed})
    sampler.validate()
    return sampler


def own_sampler(bundle: ModelBundle, paired: SamplerConfig) -> SamplerConfig:
    """The sampler a compared model runs with: the paired one (the reference's, with the seeds every model shares),
    except for a few-step model, which samples on its own schedule (its steps, levels and guidance) from the same
    seeds."""
    own = bundle.sampler_defaults
    if own.get("sigmas") is None:
        return paired
    return SamplerConfig(**{**vars(paired), **own, "seed": paired.seed})


def evaluate_pair(model: ModelBundle, reference: ModelBundle, prompts: list[str], config: EvalConfig,
                  videos: dict | None = None, progress: bool = False) -> dict:  # fmt: skip
    """Generate with both models on the same prompts and seeds and compare (see the module docstring). A
    `videos` dict receives the frames, (N, F, H, W, 3) uint8, under "model" and "reference"."""
    sampler = paired_sampler(reference, config)
    samplers = {"model": own_sampler(model, sampler), "reference": own_sampler(reference, sampler)}
    ref = run_model(reference, prompts, samplers["reference"], config.batch_size, progress, "reference")
    out = run_model(model, prompts, samplers["model"], config.batch_size, progress, "model")
    if videos is not None:
        videos.update(model=out["videos"], reference=ref["videos"])
    per_video = [{"prompt": p, "psnr": psnr(a, b), "ssim": ssim(a, b)} for p, a, b in zip(prompts, out["videos"], ref["videos"])]
    mean, identical = mean_psnr([r["psnr"] for r in per_video])
    result = {
        "model": model.spec, "reference": reference.spec, "prompts": prompts, "sampler": vars(sampler),
        "samplers": {k: vars(v) for k, v in samplers.items()},  # what each ran with (a few-step model: its own)
        "fidelity": {"psnr": mean, "identical_videos": identical,
                     "ssim": float(np.mean([r["ssim"] for r in per_video]))},
        "model_scores": _summary(out, len(prompts)), "reference_scores": _summary(ref, len(prompts)),
        "proxies": PROXIES, "per_video": per_video,
    }  # fmt: skip
    encoder = reference.prompt_encoder
    scores = encoder.domain_scores(out["videos"], prompts) if encoder is not None else None
    if scores is not None:  # the reference's domain evaluator scores both
        result["model_scores"]["shapes"] = scores
        result["reference_scores"]["shapes"] = encoder.domain_scores(ref["videos"], prompts)
    return result


def evaluate_to_folder(model: ModelBundle, reference: ModelBundle, prompts: list[str], config: EvalConfig, out: Path,
                       official: tuple | None = None) -> str:  # fmt: skip
    """`pare eval`: `evaluate_pair`, the official VBench scores when `official` = (python, cache, dimensions) is
    given, then `out/results.json` and `out/results.md`. Returns the Markdown table."""
    from ..io import atomic_path, write_json

    videos: dict = {}
    result = evaluate_pair(model, reference, prompts, config, videos, progress=True)
    if official:
        from . import official_vbench as ov

        python, cache, dims = official
        result["vbench"] = ov.official_scores(python, cache, videos, prompts, dims, Path(out) / "vbench")
    write_json(Path(out) / "results.json", result)
    table = markdown(result)
    with atomic_path(Path(out) / "results.md") as tmp:
        tmp.write_text(table)
    return table


def table_rows(result: dict) -> list[tuple[str, float, float | None]]:
    """(metric, model, reference) rows of a `pare eval` result: the rows of its Markdown table and of the report."""
    m, r = result["model_scores"], result["reference_scores"]
    rows = [("PSNR to reference (dB)", result["fidelity"]["psnr"], None),
            ("videos identical to the reference (left out of the PSNR mean)", result["fidelity"]["identical_videos"], None),
            ("SSIM to reference", result["fidelity"]["ssim"], None)]  # fmt: skip
    for key in ("temporal_flickering", "dynamic_degree", "motion_smoothness"):
        name = key + (" (proxy)" if key in PROXIES else "")
        rows.append((name, m[key], r[key]))
    for key in ("colour", "shape", "direction", "count", "subject_consistency", "fd"):
        if "shapes" in m and key in m["shapes"]:
            rows.append((f"shapes {key}", m["shapes"][key], r["shapes"][key]))
    rows += [("GFLOP per step (per video, cond + uncond)", m["flops_per_step"] / 1e9, r["flops_per_step"] / 1e9),
             ("FLOPs vs full model", m["flops_ratio"], r["flops_ratio"]),
             ("mean blocks run per step", float(np.mean(m["blocks_run_per_step"])), float(np.mean(r["blocks_run_per_step"]))),
             ("seconds per video (measured)", m["seconds_per_video"], r["seconds_per_video"])]  # fmt: skip
    official = result.get("vbench")
    for dim in official["dimensions"] if official else ():
        rows.append((f"VBench {dim} (official)", official["model"][dim], official["reference"][dim]))
    return rows


def markdown(result: dict) -> str:
    """The result as a Markdown table: one row per metric, model beside reference."""
    lines = [f"| metric | {result['model']} | {result['reference']} |", "|---|---|---|"]
    for name, a, b in table_rows(result):
        lines.append(f"| {name} | {a:.4g} | {'' if b is None else f'{b:.4g}'} |")
    notes = "; ".join(f"{k}: {v}" for k, v in result["proxies"].items())
    return "\n".join(lines) + f"\n\nProxies: {notes}.\n"
