"""`pare bench`: PARE's models and the training-free caches of diffusers, side by side on one teacher.

Every method generates the same prompts with the same seeds, scheduler, steps and guidance as the teacher.
For each one the table reports quality (PSNR and SSIM to the teacher's videos, and for shapes models the
domain evaluator's accuracies), FLOPs per step as really executed (counted by `torch.utils.flop_counter`
around every transformer forward, so a cache that skips work is charged only for what it ran) and measured
seconds per video. The plot puts quality against FLOPs and against seconds, with the Pareto front drawn.

The caches are diffusers' own hooks (`enable_cache`) on the teacher, each at a few settings:
First Block Cache, Pyramid Attention Broadcast (self- and cross-attention of Wan's blocks), TaylorSeer (its
default identifiers do not match Wan's module names, so the attention and FFN branches of `blocks.N` are named
here) and MagCache (its magnitude ratios calibrated on this model and these settings first). A method that
cannot run for a known reason (diffusers refuses its cache on this model, MagCache's calibration yields no
ratios) says why in its row; any other failure stops the benchmark, as a bug should. Finished methods are kept
under OUT/methods, keyed by the model's weights (fingerprint), the method's setting, the sampler and the prompts.
"""

from __future__ import annotations

import ast
import contextlib
import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from ..flops import cpu_sdpa_flop_formula
from ..errors import PareError, optional_module, require
from ..generate import generate, heldout_images
from ..loading import ModelBundle
from ..sampling import SamplerConfig
from . import EvalConfig, own_sampler, paired_sampler
from .fidelity import mean_psnr, psnr, ssim

SHAPES_KEYS = ("colour", "shape", "direction", "count")


class MethodUnavailable(PareError):
    """A method that cannot run on this model for a known reason: reported in its row, the others go on."""


@dataclass
class Method:
    """One row: a model, optionally with a diffusers cache enabled on it while it generates."""

    name: str
    family: str  # teacher | PARE | PARE + cache | baseline | cache
    setting: str
    bundle: ModelBundle
    cache: object = None  # a function (model, sampler) -> diffusers cache config, or None
    why_not: str | None = None  # set when the method cannot run
    weights: str | None = None  # the model's fingerprint (set by `bench`): stored runs are keyed by it


class _TransformerFlops:
    """Counts the FLOPs of every forward of `model` (and only of it: not the text encoder, not the decoder)."""

    def __init__(self, model: torch.nn.Module):
        self.total = 0
        self._mode: FlopCounterMode | None = None
        self._handles = [model.register_forward_pre_hook(self._enter), model.register_forward_hook(self._exit)]

    def _enter(self, module, args):
        self._mode = FlopCounterMode(display=False, custom_mapping=cpu_sdpa_flop_formula())
        self._mode.__enter__()

    def _exit(self, module, args, output):
        self._mode.__exit__(None, None, None)
        self.total += self._mode.get_total_flops()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _timestep_tracker(model: torch.nn.Module):
    """(callback returning the timestep of the forward in progress, hook handle): what PAB needs."""
    state = {"t": 1000}

    def pre(module, args, kwargs):
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if t is not None:
            state["t"] = int(t.flatten()[0])

    return (lambda: state["t"]), model.register_forward_pre_hook(pre, with_kwargs=True)


def _wan_cache_identifiers() -> list[str]:
    return [r"blocks\.\d+\.attn1", r"blocks\.\d+\.attn2", r"blocks\.\d+\.ffn"]


def cache_methods(teacher: ModelBundle, names: list[str], on: tuple[str, ModelBundle] | None = None) -> list[Method]:
    """The training-free caches at two or three settings each, on the teacher; with `on` (label, bundle), on that
    model instead (a PARE model combined with a cache): its rows are named "LABEL + CACHE", family "PARE + cache"."""
    from ..routing import RoutedWanTransformer3DModel

    if on is not None:
        label, bundle = on
        require(not isinstance(bundle.transformer, RoutedWanTransformer3DModel),
                f"{label} is a routed model: diffusers' caches keep one tensor per block for the whole batch, and a "
                "routed block sees only the rows that run it; combine a cache with a width-only (pruned and "
                "distilled) model")  # fmt: skip
        return [Method(f"{label} + {m.name}", "PARE + cache", m.setting, bundle, m.cache)
                for m in cache_methods(bundle, names)]  # fmt: skip
    from diffusers.hooks import (FirstBlockCacheConfig, MagCacheConfig, PyramidAttentionBroadcastConfig,
                                 TaylorSeerCacheConfig)  # fmt: skip

    rows: list[Method] = []
    if "fbc" in names:
        for th in (0.05, 0.1, 0.2):
            rows.append(Method("First Block Cache", "cache", f"threshold {th}", teacher,
                               lambda m, s, th=th: FirstBlockCacheConfig(threshold=th)))  # fmt: skip
    if "pab" in names:
        for skip in (2, 3):
            def pab(m, s, skip=skip):
                return PyramidAttentionBroadcastConfig(
                    spatial_attention_block_skip_range=skip, cross_attention_block_skip_range=skip + 2,
                    spatial_attention_timestep_skip_range=(100, 800), cross_attention_timestep_skip_range=(100, 900),
                    current_timestep_callback=m._pare_timestep)  # fmt: skip
            rows.append(Method("Pyramid Attention Broadcast", "cache", f"self every {skip}, cross every {skip + 2}", teacher, pab))
    if "taylorseer" in names:
        for interval in (2, 4):
            rows.append(Method("TaylorSeer", "cache", f"interval {interval}, order 1", teacher,
                               lambda m, s, i=interval: TaylorSeerCacheConfig(
                                   cache_interval=i, disable_cache_before_step=2, max_order=1,
                                   taylor_factors_dtype=torch.float32,
                                   cache_identifiers=_wan_cache_identifiers())))  # fmt: skip
    if "magcache" in names:
        for th in (0.06, 0.12, 0.24):
            rows.append(Method("MagCache", "cache", f"threshold {th}", teacher,
                               lambda m, s, th=th: MagCacheConfig(threshold=th, num_inference_steps=s.steps,
                                                                  mag_ratios=m._pare_mag_ratios)))  # fmt: skip
    return rows


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


RATIOS_MESSAGE = "MagCache Calibration Results:"


def calibrate_magcache(bundle: ModelBundle, prompts: list[str], sampler: SamplerConfig) -> list[float]:
    """MagCache's magnitude ratios for this model and sampler: one calibration run. diffusers hands them out
    only as its documented log record at the end of the run (and a copy printed to stdout, silenced here), so
    the record is read from its logger; no other handler sees it."""
    from diffusers.hooks import MagCacheConfig

    model = bundle.transformer
    logger = logging.getLogger("diffusers.hooks.mag_cache")
    records, saved = _Records(), (logger.level, logger.propagate)
    logger.addHandler(records)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    model.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=sampler.steps))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            generate(bundle, prompts, sampler, progress=False, images=heldout_images(bundle, prompts))
    finally:
        model.disable_cache()
        logger.removeHandler(records)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
    found = [m for m in records.messages if m.startswith(RATIOS_MESSAGE)]
    if not found:
        raise MethodUnavailable("MagCache's calibration logged no ratios (a diffusers without its calibration log?)")
    return [float(x) for x in ast.literal_eval(found[-1][len(RATIOS_MESSAGE):].strip())]


def run_method(method: Method, prompts: list[str], sampler: SamplerConfig, batch_size: int) -> dict:
    """Videos, seconds (generation only), FLOPs per transformer forward per video, blocks run per step."""
    model = method.bundle.transformer
    if method.cache is not None:
        try:
            model.enable_cache(method.cache(model, sampler))
        except ValueError as e:  # diffusers' refusal: no such cache for this model or this config
            raise MethodUnavailable(f"diffusers refused the cache: {str(e).splitlines()[0]}") from None
    counter = None
    videos, seconds, blocks, flops = [], 0.0, [], 0
    images = heldout_images(method.bundle, prompts)
    frames = lambda lo: None if images is None else images[lo : lo + batch_size]  # noqa: E731
    try:
        for lo in range(0, len(prompts), batch_size):
            if method.cache is not None:
                model._reset_stateful_cache()
            chunk = SamplerConfig(**{**vars(sampler), "seed": sampler.seed + lo})  # video i keeps seed + i
            start = time.perf_counter()
            gen = generate(method.bundle, prompts[lo : lo + batch_size], chunk, progress=False, images=frames(lo))
            seconds += time.perf_counter() - start
            videos.append(gen.videos)
            blocks.append(np.mean([s.blocks_run for s in gen.result.steps]))
        # executed FLOPs: the first batch once more, counted (the counter slows the run, so it is not timed)
        if method.cache is not None:
            model._reset_stateful_cache()
        counter = _TransformerFlops(model)
        first = prompts[:batch_size]
        generate(method.bundle, first, sampler, progress=False, images=frames(0))
        flops = counter.total
    finally:
        if counter is not None:
            counter.remove()
        if method.cache is not None:
            model.disable_cache()
    return {"videos": np.concatenate(videos), "seconds": seconds, "blocks_run": float(np.mean(blocks)),
            "flops_per_step": flops / sampler.steps / len(first), "flops_per_video": flops / len(first),
            "steps": sampler.steps, "passes": 2 if sampler.uses_cfg else 1}  # fmt: skip


def time_method(method: Method, prompts: list[str], sampler: SamplerConfig) -> float:
    """Seconds `method` takes to generate `prompts` (one batch), its cache on and fresh, as `run_method` times each
    of its batches."""
    model = method.bundle.transformer
    if method.cache is not None:
        model.enable_cache(method.cache(model, sampler))
    try:
        images = heldout_images(method.bundle, prompts)
        start = time.perf_counter()
        generate(method.bundle, prompts, sampler, progress=False, images=images)
        return time.perf_counter() - start
    finally:
        if method.cache is not None:
            model.disable_cache()


def _retime(rows: list[dict], methods: list[Method], prompts: list[str], sampler: SamplerConfig, rounds: int,
            progress: bool = True) -> None:
    """Seconds per video of every row that ran, measured side by side: `rounds` rounds, each generating `prompts`
    with every method in turn, so that a change in the machine's load falls on all of them alike; the median round.
    (A benchmark extended over several runs otherwise mixes timings made hours apart, under other loads.)"""
    from tqdm import tqdm

    times = {i: [] for i, row in enumerate(rows) if "why_not" not in row}
    with tqdm(total=rounds * len(times), desc="timing", unit="run", disable=not progress) as bar:
        for _ in range(rounds):
            for i, seconds in times.items():
                seconds.append(time_method(methods[i], prompts, own_sampler(methods[i].bundle, sampler)))
                bar.update()
    for i, seconds in times.items():
        rows[i]["seconds_per_video"] = float(np.median(seconds)) / len(prompts)


def store_slug(name: str, setting: str) -> str:
    """The start of the file name a bench row's run is kept under in its store (`_stored`)."""
    import re

    return re.sub(r"[^a-z0-9]+", "-", f"{name} {setting}".lower()).strip("-")


def _stored(folder, method: Method, sampler: SamplerConfig, prompts: list[str]):
    """(path, key) where a method's finished run is kept, so that an interrupted or extended benchmark only runs
    what it has not run yet."""
    import hashlib
    import json

    from ..io import tensor_digest

    frames = heldout_images(method.bundle, prompts)  # an I2V model's: those of --images, else its own
    images = {"first_frames": tensor_digest(frames)} if frames is not None else {}
    key = json.dumps({"method": method.name, "setting": method.setting, "weights": method.weights,
                      "sampler": vars(sampler), "prompts": prompts, **images}, sort_keys=True)  # fmt: skip
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    return folder / f"{store_slug(method.name, method.setting)}-{digest}.npz", key


def _load_or_run(folder, method: Method, prompts: list[str], sampler: SamplerConfig, batch_size: int) -> dict:
    from ..io import atomic_path

    if folder is None:
        return run_method(method, prompts, sampler, batch_size)
    path, key = _stored(folder, method, sampler, prompts)
    if path.exists():
        with np.load(path) as f:
            if str(f["key"]) == key:
                stored = {k: (f[k] if k == "videos" else f[k].item()) for k in f.files if k != "key"}
                # a run stored before the per-video cost was recorded: it follows from the sampler it ran with
                passes = 2 if sampler.uses_cfg else 1
                return {"steps": sampler.steps, "passes": passes,
                        "flops_per_video": stored["flops_per_step"] * sampler.steps, **stored}  # fmt: skip
    result = run_method(method, prompts, sampler, batch_size)
    with atomic_path(path) as tmp:
        np.savez(tmp, key=np.array(key), **result)
    return result


def bench(teacher: ModelBundle, methods: list[Method], prompts: list[str], config: EvalConfig, progress=True,
          store=None, keep_videos: bool = False, timing_rounds: int = 0) -> dict:  # fmt: skip
    """Run every method; returns {"sampler", "prompts", "rows": [...], "timing"} with the teacher's row first. With
    `store` (a folder), each finished method's videos and measurements are kept there and reused. With
    `keep_videos`, each row that ran holds its videos, (N, F, H, W, 3) uint8, under "videos". With
    `timing_rounds` R > 0, seconds per video come from R interleaved rounds over the first batch of prompts
    (`_retime`), not from each method's own run."""
    from tqdm import tqdm

    sampler = paired_sampler(teacher, config)
    # what the caches read from the model they run on: the timestep in progress (PAB), MagCache's ratios
    cached = {id(teacher.transformer): teacher} | {id(m.bundle.transformer): m.bundle for m in methods if m.cache is not None}
    handles = []
    for bundle in cached.values():
        bundle.transformer._pare_timestep, handle = _timestep_tracker(bundle.transformer)
        handles.append(handle)
    rows, reference = [], None
    all_methods = [Method("teacher", "teacher", "", teacher)] + methods
    if store is not None:
        from ..profiling import fingerprint

        prints: dict[int, str] = {}  # one read of each model's weights
        for m in all_methods:
            model_id = id(m.bundle.transformer)
            if model_id not in prints:
                prints[model_id] = fingerprint(m.bundle.transformer)
            m.weights = prints[model_id]
    try:
        pending = [m for m in all_methods if store is None or timing_rounds  # timing runs every method again
                   or not _stored(store, m, own_sampler(m.bundle, sampler), prompts)[0].exists()]  # fmt: skip
        for bundle in {id(m.bundle.transformer): m.bundle for m in pending
                       if m.name.endswith("MagCache") and m.why_not is None}.values():  # fmt: skip
            try:
                bundle.transformer._pare_mag_ratios = calibrate_magcache(
                    bundle, prompts[: config.batch_size], own_sampler(bundle, sampler))
            except MethodUnavailable as e:
                for m in all_methods:
                    if m.name.endswith("MagCache") and m.bundle is bundle:
                        m.why_not = str(e)
        for method in tqdm(all_methods, desc="bench", unit="method", disable=not progress):
            row = {"method": method.name, "family": method.family, "setting": method.setting,
                   "model": method.bundle.spec,  # its weights: step experts hold more than one copy of the blocks
                   "parameters": sum(p.numel() for p in method.bundle.transformer.parameters())}  # fmt: skip
            if method.why_not is None:
                try:
                    result = _load_or_run(store, method, prompts, own_sampler(method.bundle, sampler), config.batch_size)
                except MethodUnavailable as e:
                    method.why_not = str(e)
            if method.why_not is not None:
                rows.append({**row, "why_not": method.why_not})
                continue
            if reference is None:
                reference = result
            row.update(_scores(result, reference, prompts, teacher.prompt_encoder))
            if keep_videos:
                row["videos"] = result["videos"]
            rows.append(row)
        if timing_rounds:
            _retime(rows, all_methods, prompts[: config.batch_size], sampler, timing_rounds, progress)
    finally:
        for handle in handles:
            handle.remove()
    base = rows[0]
    require("why_not" not in base, f"the teacher itself could not run: {base.get('why_not')}")
    for r in rows:
        if "why_not" not in r:
            r["flops_ratio"] = r["flops_per_step"] / base["flops_per_step"]
            r["video_flops_ratio"] = r["flops_per_video"] / base["flops_per_video"]
            r["speedup"] = base["seconds_per_video"] / r["seconds_per_video"]
    timing = {"rounds": timing_rounds, "videos": len(prompts[: config.batch_size])} if timing_rounds else None
    return {"sampler": vars(sampler), "prompts": prompts, "rows": rows, "timing": timing}


def _scores(result: dict, reference: dict, prompts: list[str], encoder) -> dict:
    a, b = result["videos"], reference["videos"]
    mean, identical = mean_psnr([psnr(x, y) for x, y in zip(a, b)])
    row = {"psnr": mean, "identical_videos": identical,
           "ssim": float(np.mean([ssim(x, y) for x, y in zip(a, b)])),
           "flops_per_step": result["flops_per_step"], "flops_per_video": result["flops_per_video"],
           "steps": result["steps"], "passes": result["passes"], "seconds_per_video": result["seconds"] / len(prompts),
           "blocks_run": result["blocks_run"]}  # fmt: skip
    scores = encoder.domain_scores(a, prompts) if encoder is not None else None
    if scores is not None:  # the teacher's domain evaluator (the shapes domain's accuracies)
        row["shapes"] = {k: scores[k] for k in SHAPES_KEYS}
        row["shapes_mean"] = float(np.mean([scores[k] for k in SHAPES_KEYS]))
    return row


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: lower cost (x) and higher quality (y), sorted by cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -float("inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def markdown(result: dict) -> str:
    rows = result["rows"]
    shapes = any("shapes" in r for r in rows)
    head = ["method", "setting", "steps x passes", "parameters (M)", "GFLOP / step", "FLOPs vs teacher", "FLOPs / video vs teacher",
            "s / video", "speed-up", "PSNR (dB)", "SSIM"]  # fmt: skip
    if shapes:
        head += ["colour", "shape", "direction", "count"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "why_not" in r:
            lines.append(f"| {r['method']} | {r['setting']} | cannot run: {r['why_not']} |" + " |" * (len(head) - 3))
            continue
        cells = [r["method"], r["setting"], f"{r['steps']} x {r['passes']}", f"{r['parameters'] / 1e6:.2f}",
                 f"{r['flops_per_step'] / 1e9:.3f}",
                 f"{r['flops_ratio']:.3f}", f"{r['video_flops_ratio']:.3f}", f"{r['seconds_per_video']:.3f}", f"{r['speedup']:.2f}x",
                 _psnr_cell(r), f"{r['ssim']:.3f}"]  # fmt: skip
        if shapes:
            cells += [f"{r['shapes'][k]:.1f}" for k in SHAPES_KEYS]
        lines.append("| " + " | ".join(cells) + " |")
    s = result["sampler"]
    return "\n".join(lines) + (
        f"\n\n{len(result['prompts'])} prompts, {s['steps']} steps, guidance {s['guidance_scale']}, seed {s['seed']} (a "
        "few-step model: its own steps and schedule, from the same seeds); FLOPs per step per video (cond + uncond "
        "where guided), counted as executed; per video: steps x passes x per-step FLOPs; PSNR/SSIM to the teacher's videos "
        "(the teacher's own row is its reference: inf / 1), averaged over the videos that differ from the "
        "teacher's, with (k identical) where some do not; accuracies of the shapes evaluator in percent. "
        + _timing_note(result.get("timing"), len(result["prompts"])) + "\n"
    )


def _timing_note(timing: dict | None, videos: int) -> str:
    if timing:
        return (f"Seconds per video: the median of {timing['rounds']} rounds, each generating {timing['videos']} "
                "videos with every method in turn, side by side in one run.")  # fmt: skip
    return (f"Seconds per video: each method's generation of the {videos} videos, in the run that made them (rows "
            "reused from an earlier run keep its timing; `--timing-rounds` measures all side by side).")


def _psnr_cell(row: dict) -> str:
    if not np.isfinite(row["psnr"]):
        return "inf"
    k = row.get("identical_videos", 0)
    return f"{row['psnr']:.2f}" + (f" ({k} identical)" if k else "")


def plot(result: dict, path) -> None:
    """Two panels: PSNR to the teacher vs FLOPs per video and vs seconds per video, Pareto fronts drawn. (FLOPs per
    video: steps x passes x per step, so that a few-step model sits where its whole video's cost puts it; for a
    model on the teacher's sampler it is its FLOPs per step ratio.)"""
    matplotlib = optional_module("matplotlib")  # an extra: pare[eval]
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import save_figure

    rows = [r for r in result["rows"] if "why_not" not in r and r["family"] != "teacher"]
    colours = {"PARE": "tab:red", "PARE + cache": "tab:purple", "baseline": "tab:gray", "cache": "tab:blue"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, key, label in ((axes[0], "video_flops_ratio", "FLOPs per video vs teacher"),
                           (axes[1], "speedup", "measured speed-up vs teacher (CPU)")):  # fmt: skip
        xs = [r[key] if key == "video_flops_ratio" else 1 / r[key] for r in rows]  # cost: lower is better
        ys = [r["psnr"] for r in rows]
        for r, x, y in zip(rows, xs, ys):
            ax.scatter(x, y, color=colours.get(r["family"], "k"), s=30)
            ax.annotate(f"{r['method']} {r['setting']}".strip(), (x, y), fontsize=6, xytext=(3, 2),
                        textcoords="offset points")  # fmt: skip
        front = pareto(list(zip(xs, ys)))
        ax.plot([xs[i] for i in front], [ys[i] for i in front], color="k", lw=0.8, ls="--", label="Pareto front")
        ax.set_xlabel(label if key == "video_flops_ratio" else "seconds per video vs teacher (1 / speed-up)")
        ax.set_ylabel("PSNR to the teacher (dB)")
        ax.grid(alpha=0.3)
        for fam, c in colours.items():
            ax.scatter([], [], color=c, label=fam)
        ax.legend(fontsize=7)
    fig.suptitle(f"quality vs cost, {len(result['prompts'])} prompts", fontsize=10)
    save_figure(fig, path)


def write_bench(result: dict, out: Path) -> str:
    """`pare bench`'s outputs: `out/results.json`, `out/results.md` and `out/pareto.png`; returns the table."""
    from ..io import atomic_path, write_json

    write_json(Path(out) / "results.json", result)
    table = markdown(result)
    with atomic_path(Path(out) / "results.md") as tmp:
        tmp.write_text(table)
    plot(result, Path(out) / "pareto.png")
    return table
