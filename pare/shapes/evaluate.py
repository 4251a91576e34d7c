"""An evaluator that knows the ground truth of the shapes domain.

For each video and its prompt it finds the objects by their palette colour (connected components, OpenCV),
reads each object's shape by matching its silhouette against the renderer's own shapes and its motion from its
centroid track, and compares with what the prompt says. Alongside: VBench's temporal flickering (exact
formula), VBench's motion smoothness formula with DIS-flow frame interpolation in place of AMT, VBench's subject
consistency formula with the shipped domain classifier's frame features in place of DINO, and a Frechet
distance to real (rendered) videos on the classifier's video features (as FVD does with I3D).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import arch
from ..components import to_uint8_video
from ..evaluation.vbench import motion_smoothness, subject_consistency, temporal_flickering
from ..errors import optional_module, require
from . import domain
from .classifier import CLASSIFIER_PATH, ShapesClassifier

cv2 = optional_module("cv2")  # OpenCV is an extra: pare[eval]

COLOUR_TOLERANCE = 0.30  # RGB distance (0..1 units) within which a pixel counts as a palette colour
MIN_AREA = 6  # pixels: smaller components are noise (the smallest object covers about 18)
STILL_TOLERANCE = 1.5  # pixels: a track that never leaves a disc this wide around its mean stands still
FAST_SPEED = 0.5 * sum(domain.SPEEDS.values())  # px/frame between "slowly" and "quickly"
CURVED_MARGIN = 0.5  # bouncing/circling must explain the track twice as well as a straight line


@dataclass
class Track:
    """One object (one palette colour) through a video."""

    colour: int
    centroid: np.ndarray  # (F, 2) x, y in pixels; NaN where not found
    shape_votes: np.ndarray  # (F,) shape code per frame (UNKNOWN_SHAPE: none of the domain's), -1 where not found

    @property
    def present(self) -> np.ndarray:
        return ~np.isnan(self.centroid[:, 0])

    @property
    def shape(self) -> int:
        votes = self.shape_votes[self.shape_votes >= 0]
        return int(np.bincount(votes, minlength=UNKNOWN_SHAPE + 1).argmax()) if len(votes) else -1


def to_frames01(videos) -> np.ndarray:
    """(B, F, H, W, 3) float in [0, 1] from uint8 (B, F, H, W, 3) or float (B, 3, F, H, W) in [-1, 1]."""
    if isinstance(videos, torch.Tensor):
        if videos.dtype == torch.uint8:
            return videos.cpu().numpy().astype(np.float32) / 255
        return ((videos.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1).numpy()
    videos = np.asarray(videos)
    return videos.astype(np.float32) / 255 if videos.dtype == np.uint8 else videos.astype(np.float32)


# Shape templates: a fitted size may be off by this factor (the mask loses anti-aliased edge pixels), and the
# centroid by a fraction of a pixel.
TEMPLATE_SCALES = np.array([0.9, 1.0, 1.1])
TEMPLATE_OFFSETS = np.array([-0.5, 0.0, 0.5])
SHAPE_MIN_IOU = 0.7  # a silhouette that overlaps no template this well is no shape of the domain (a blob)
UNKNOWN_SHAPE = len(domain.SHAPES)  # its vote: the object is there, its shape is none of the prompt's


def _unit_area(name: str) -> float:
    """Area of a shape of half-size 1 as `domain.render` draws it."""
    if name == "circle":
        return math.pi
    if name == "square":
        return 4.0
    return math.sqrt(3.0) * domain.TRIANGLE_SCALE**2  # equilateral, half-side TRIANGLE_SCALE


# Every template once: (shape code, size factor over the unit area's radius, x offset, y offset), flattened.
_T_SHAPE, _T_SCALE, _T_DX, _T_DY = (torch.tensor(a, dtype=torch.float32).flatten() for a in np.meshgrid(
    np.arange(len(domain.SHAPES)), TEMPLATE_SCALES, TEMPLATE_OFFSETS, TEMPLATE_OFFSETS, indexing="ij"))  # fmt: skip
_T_SCALE = _T_SCALE / torch.tensor([math.sqrt(_unit_area(n)) for n in domain.SHAPES])[_T_SHAPE.long()]
_T_SHAPE = _T_SHAPE.long().view(-1, 1, 1)


def _shape_of(component: np.ndarray, centroid: np.ndarray) -> tuple[int, float]:
    """(shape code, IoU) of one component (a bool mask (H, W)): the domain shape whose silhouette, drawn by the
    renderer's own signed distance at the component's centroid with the half-size that gives the component's
    area (times a few scales and sub-pixel offsets), overlaps it best; UNKNOWN_SHAPE when even the best IoU is
    under SHAPE_MIN_IOU. Matching every pixel against a template reads a square with a dim corner pixel as a
    square (a rule on the bounding box's corners read it as a triangle). Written here, not OpenCV's
    `matchShapes`: its Hu moments ignore orientation and size and give no overlap to call a blob no shape."""
    area = float(component.sum())
    ys, xs = np.nonzero(component)
    pad = 3
    y0, y1 = max(ys.min() - pad, 0), min(ys.max() + pad + 1, component.shape[0])
    x0, x1 = max(xs.min() - pad, 0), min(xs.max() + pad + 1, component.shape[1])
    window = torch.from_numpy(component[y0:y1, x0:x1])
    gy, gx = torch.meshgrid(torch.arange(y0, y1, dtype=torch.float32), torch.arange(x0, x1, dtype=torch.float32),
                            indexing="ij")  # fmt: skip
    rel = torch.stack([gx[None] - float(centroid[0]) - _T_DX[:, None, None],
                       gy[None] - float(centroid[1]) - _T_DY[:, None, None]], -1)  # (N, h, w, 2)  # fmt: skip
    inside = domain.sdf(_T_SHAPE, rel, (math.sqrt(area) * _T_SCALE).view(-1, 1, 1)) <= 0  # (N, h, w)
    iou = (inside & window).sum((1, 2)).float() / (inside | window).sum((1, 2)).clamp_min(1).float()
    best = int(iou.argmax())
    score = float(iou[best])
    return (int(_T_SHAPE[best]) if score >= SHAPE_MIN_IOU else UNKNOWN_SHAPE), score


def palette_pixels(video: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(F, H, W) index of each pixel's nearest palette colour and whether it lies within COLOUR_TOLERANCE of it,
    for one video (F, H, W, 3) in [0, 1]."""
    palette = np.array(list(domain.COLOURS.values()), dtype=np.float32)  # (C, 3)
    dist = np.linalg.norm(video[..., None, :] - palette, axis=-1)  # (F, H, W, C)
    return dist.argmin(-1), dist.min(-1) < COLOUR_TOLERANCE


def find_objects(video: np.ndarray) -> tuple[list[Track], int]:
    """Tracks of the palette-coloured objects in one video (F, H, W, 3) in [0, 1], and the object count (the
    median over frames of the number of components of any palette colour)."""
    nearest, close = palette_pixels(video)
    F = video.shape[0]
    tracks, counts = [], np.zeros(F, dtype=int)
    for c in range(len(domain.COLOURS)):
        centroid = np.full((F, 2), np.nan)
        votes = np.full(F, -1)
        for f in range(F):
            mask = ((nearest[f] == c) & close[f]).astype(np.uint8)
            n, labels, stats, cents = cv2.connectedComponentsWithStats(mask, connectivity=8)
            big = [i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= MIN_AREA]
            counts[f] += len(big)
            if big:
                i = max(big, key=lambda j: stats[j, cv2.CC_STAT_AREA])
                centroid[f] = cents[i]
                votes[f] = _shape_of(labels == i, cents[i])[0]
        if (votes >= 0).sum() * 2 >= F:  # present in at least half of the frames
            tracks.append(Track(c, centroid, votes))
    return tracks, int(np.median(counts))


def _lstsq_rms(basis: np.ndarray, values: np.ndarray) -> tuple[float, np.ndarray]:
    coef, *_ = np.linalg.lstsq(basis, values, rcond=None)
    return float(np.sqrt(np.mean((basis @ coef - values) ** 2))), coef


def classify_motion(track: Track) -> tuple[int, int]:
    """(motion code, speed code) of a centroid track; speed is meaningful for linear motions only."""
    ok = track.present
    t = np.arange(len(ok), dtype=np.float64)[ok]
    xy = track.centroid[ok]
    if len(t) < 3 or np.abs(xy - xy.mean(0)).max() < STILL_TOLERANCE:
        return domain.STILL, 0
    one = np.ones_like(t)
    r_lin, coef = _lstsq_rms(np.stack([one, t], 1), xy)
    F = len(ok)
    r_bx, _ = _lstsq_rms(one[:, None], xy[:, :1])
    r_by, _ = _lstsq_rms(np.stack([one, np.abs(np.sin(np.pi * t / F))], 1), xy[:, 1:])
    r_bounce = float(np.sqrt((r_bx**2 + r_by**2) / 2))
    w = 2 * np.pi * t / F
    r_circle, _ = _lstsq_rms(np.stack([one, np.cos(w), np.sin(w)], 1), xy)
    if min(r_bounce, r_circle) < CURVED_MARGIN * r_lin:
        return (domain.BOUNCING, 0) if r_bounce <= r_circle else (domain.CIRCLING, 0)
    vx, vy = coef[1]  # pixels per frame
    sector = int(np.round(np.arctan2(vy, vx) / (np.pi / 4))) % 8  # 0 = right, counter-clockwise in image coords
    name = ["right", "down-right", "down", "down-left", "left", "up-left", "up", "up-right"][sector]
    return domain.MOTIONS.index(name), int(np.hypot(vx, vy) >= FAST_SPEED)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets a (N, D) and b (M, D); NaN when either set has
    fewer than two rows (no covariance to fit)."""
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    a, b = a.astype(np.float64), b.astype(np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr(sqrt(cov_a cov_b)) = sum of square roots of the eigenvalues of cov_a cov_b (real and >= 0 for PSD
    # matrices; tiny negative or imaginary parts are numerical noise).
    eig = np.linalg.eigvals(cov_a @ cov_b)
    tr_sqrt = np.sqrt(np.clip(eig.real, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_sqrt)


def _percent(hits: list) -> float:
    return 100.0 * float(np.mean(hits)) if hits else float("nan")


def _accuracies(rows: list[dict]) -> dict:
    """Accuracies in percent over `score_video` rows: per object for colour, shape, direction and speed, per
    video for count."""
    flat = lambda key: [h for r in rows for h in r[key]]  # noqa: E731
    return {"videos": len(rows), **{key: _percent(flat(key)) for key in ("colour", "shape", "direction", "speed")},
            "count": _percent([r["count"] for r in rows])}  # fmt: skip


def colour_area(video: np.ndarray, colour: str) -> float:
    """Mean over frames of the pixels within COLOUR_TOLERANCE of palette colour `colour` that are nearer it than
    any other palette colour, in one video (F, H, W, 3) in [0, 1]: the size of that colour's object as drawn."""
    nearest, close = palette_pixels(video)
    return float(((nearest == list(domain.COLOURS).index(colour)) & close).sum((1, 2)).mean())


def count_misses(reference, videos, prompts: list[str], reference_scores: list[dict] | None = None) -> dict:
    """Where a model's object count goes wrong on the prompts a reference model counts right, for diagnosing a
    student against its teacher (both (B, F, H, W, 3) videos of the same prompts and seeds). `lost` / `won`: the
    videos the model counts wrong and the reference right / the other way round. Of the lost: `fewer` and `more`
    objects than the prompt asks; `dropped`, for the lost two-object videos in which the model lacks one of the
    prompt's colours, each (video, missing colour, whether that object is the smaller of the two in the
    reference's video, whether it is the prompt's second object). `reference_scores`: the reference's
    `score_video` rows, when the caller already has them (several models against one reference)."""
    ref, got = to_frames01(reference), to_frames01(videos)
    require(len(ref) == len(got) == len(prompts), f"{len(ref)} reference videos and {len(got)} videos for "
            f"{len(prompts)} prompts: expected one of each per prompt")  # fmt: skip
    names = list(domain.COLOURS)
    out = {"lost": [], "won": [], "fewer": 0, "more": 0, "dropped": []}
    for i, prompt in enumerate(prompts):
        a = reference_scores[i] if reference_scores is not None else score_video(ref[i], prompt)
        b = score_video(got[i], prompt)
        if a["count"] == b["count"]:
            continue
        if not a["count"]:
            out["won"].append(i)
            continue
        out["lost"].append(i)
        out["fewer" if b["objects_found"] < len(b["colour"]) else "more"] += 1
        scene = domain.parse_prompt(prompt)
        want = [names[c] for c in scene.colour[0].tolist() if c != domain.NO_OBJECT]
        missing = [c for c, hit in zip(want, b["colour"]) if not hit]
        if len(want) == 2 and len(missing) == 1:
            other = next(c for c in want if c != missing[0])
            out["dropped"].append((i, missing[0], colour_area(ref[i], missing[0]) < colour_area(ref[i], other),
                                   want.index(missing[0]) == 1))  # fmt: skip
    return out


def score_video(frames: np.ndarray, prompt: str) -> dict:
    """Per-video ground-truth checks of one video (F, H, W, 3) in [0, 1] against its prompt."""
    scene = domain.parse_prompt(prompt)
    want = [(c, s) for c, s in zip(scene.colour[0].tolist(), scene.shape[0].tolist()) if c != domain.NO_OBJECT]
    tracks, count = find_objects(frames)
    by_colour = {t.colour: t for t in tracks}
    motion, speed = int(scene.motion[0]), int(scene.speed[0])
    colour_hits, shape_hits, motion_hits, speed_hits = [], [], [], []
    for c, s in want:
        track = by_colour.get(c)
        colour_hits.append(track is not None)
        shape_hits.append(track is not None and track.shape == s)
        got_motion, got_speed = classify_motion(track) if track is not None else (-1, -1)
        motion_hits.append(got_motion == motion)
        if motion < domain.N_LINEAR:
            speed_hits.append(got_motion == motion and got_speed == speed)
    return {"prompt": prompt, "colour": colour_hits, "shape": shape_hits, "direction": motion_hits,
            "speed": speed_hits, "count": count == len(want), "objects_found": count}  # fmt: skip


@torch.no_grad()
def evaluate_videos(videos, prompts: list[str], real=None, classifier: ShapesClassifier | None = None,
                    per_video: bool = False, images: torch.Tensor | None = None) -> dict:  # fmt: skip
    """Scores of generated `videos` for their `prompts` (accuracies in percent, VBench-style scores in [0, 1]).

    `real`: real videos of the same prompts for the Frechet distance (rendered when None). `classifier`: the
    domain classifier (the shipped one when None; a missing file is an error, not a silently shorter report).
    `images`: the first frames an image-to-video model was given ((B, 3, H, W) in [-1, 1]); adds
    `first_frame_psnr`, the mean over videos of the PSNR (dB) of frame 0 to its image, both as 8-bit frames.
    """
    frames = to_frames01(videos)
    if len(frames) != len(prompts):
        raise ValueError(f"{len(frames)} videos for {len(prompts)} prompts")
    rows = [score_video(v, p) for v, p in zip(frames, prompts)]
    if images is not None:
        given = to_frames01(to_uint8_video(images[:, :, None]))[:, 0]  # (B, H, W, 3), 8-bit as a PNG holds it
        for row, psnr in zip(rows, frame_psnr(frames[:, 0], given)):
            row["first_frame_psnr"] = psnr
    smoothness = [motion_smoothness(v) for v in frames]
    for row, value in zip(rows, smoothness):
        row["motion_smoothness"] = float(value)
    scores = {
        **_accuracies(rows),
        "temporal_flickering": float(np.mean([temporal_flickering(v) for v in frames])),
        "motion_smoothness": float(np.mean(smoothness)),
        # one- and two-object prompts apart: the second asks each object's words to bind to that object
        "by_objects": {str(k): _accuracies(part) for k in (1, 2) if (part := [r for r in rows if len(r["colour"]) == k])},
    }
    if classifier is None:
        require(CLASSIFIER_PATH.is_file(), f"the shapes classifier {CLASSIFIER_PATH} is missing, so the Frechet "
                "distance and subject consistency cannot be computed: reinstall PARE")  # fmt: skip
        classifier = ShapesClassifier.load()
    gen = torch.from_numpy(frames).permute(0, 4, 1, 2, 3) * 2 - 1  # (B, 3, F, H, W)
    gen_feats, gen_frames = classifier.features(gen)
    scores["subject_consistency"] = float(subject_consistency(gen_frames).mean())
    if real is None:
        real = domain.render(domain.parse_prompts(prompts), seed=REAL_SEED)
    real_t = torch.from_numpy(to_frames01(real)).permute(0, 4, 1, 2, 3) * 2 - 1
    scores["fd"] = frechet_distance(gen_feats.numpy(), classifier.features(real_t)[0].numpy())
    if images is not None:
        scores["first_frame_psnr"] = float(np.mean([r["first_frame_psnr"] for r in rows]))
    if per_video:
        scores["per_video"] = rows
    return scores


def frame_psnr(a: np.ndarray, b: np.ndarray) -> list[float]:
    """PSNR in dB of each frame of `a` to the same frame of `b` ((B, H, W, 3) in [0, 1]), capped at 100 (equal)."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    return [100.0 if m == 0 else min(100.0, float(10 * np.log10(1 / m))) for m in mse]


def first_frames(prompts: list[str]) -> torch.Tensor:
    """The first frames an image-to-video model is evaluated from: frame 0 of the reference render of `prompts`
    (the real videos the Frechet distance compares with), (B, 3, H, W) in [-1, 1]."""
    return domain.render(domain.parse_prompts(prompts), seed=REAL_SEED)[:, :, 0]


REAL_SEED, REAL_SEED_2 = 10_007, 20_011  # nuisance seeds of the reference renders


@torch.no_grad()
def real_video_scores(prompts: list[str], classifier: ShapesClassifier | None = None) -> dict:
    """The evaluator on freshly rendered ground truth for `prompts`; its FD compares two independent renders
    (real vs real): the floor any generator's FD is measured against."""
    scenes = domain.parse_prompts(prompts)
    return evaluate_videos(domain.render(scenes, seed=REAL_SEED_2), prompts, real=domain.render(scenes, seed=REAL_SEED),
                           classifier=classifier)  # fmt: skip


def evaluate_model(bundle, prompts: list[str], config=None, seed: int = 0, batch_size: int = 16,
                   progress: bool = True, per_video: bool = False) -> tuple[dict, torch.Tensor]:  # fmt: skip
    """Generate one video per prompt with a loaded bundle (video i with seed + i) and score them.
    Returns (scores, videos (B, F, H, W, 3) uint8)."""
    from ..generate import generate
    from ..sampling import SamplerConfig

    config = config or SamplerConfig(**{**bundle.sampler_defaults, "seed": seed})
    images = first_frames(prompts) if arch.is_image_to_video(bundle.transformer) else None
    videos = []
    for start in range(0, len(prompts), batch_size):
        chunk = SamplerConfig(**{**vars(config), "seed": config.seed + start})
        given = None if images is None else images[start : start + batch_size]
        gen = generate(bundle, prompts[start : start + batch_size], chunk, images=given, progress=progress)
        videos.append(gen.videos)
    videos = torch.cat(videos)
    return evaluate_videos(videos, prompts, per_video=per_video, images=images), videos


def score_folder_or_model(model: str | None, videos, n: int, overrides: dict, seed: int, out, device="cpu",
                          dtype=torch.float32) -> dict:  # fmt: skip
    """`pare eval-shapes`: generate for the first `n` held-out prompts with `model` (the model's sampler settings,
    `overrides` on top) or read the videos `pare generate` wrote into the folder `videos`; score them, and with
    `out` write `scores.json` (and the generated videos, in `pare generate`'s layout so that `--videos
    OUT/videos` re-scores them). Returns that record: model, videos, prompts, scores, real, per_video."""
    from ..io import write_json

    if model is not None:
        from ..loading import load_bundle
        from ..sampling import SamplerConfig

        bundle = load_bundle(model, device=device, dtype=dtype)
        prompts = domain.heldout_prompts(n)
        sampler = SamplerConfig(**{**bundle.sampler_defaults, "seed": seed, **overrides})
        scores, vids = evaluate_model(bundle, prompts, sampler, per_video=True)
        if out is not None:
            from ..video import write_generated, write_image

            paths = [Path(out) / "videos" / f"{i:04d}.mp4" for i in range(len(prompts))]
            given = {}
            if arch.is_image_to_video(bundle.transformer):  # the first frames it was given, for --videos to re-score
                names = [f"first-frame-{i:04d}.png" for i in range(len(prompts))]
                for name, frame in zip(names, to_uint8_video(first_frames(prompts)[:, :, None])[:, 0]):
                    write_image(Path(out) / "videos" / name, frame)
                given = {"images": names}
            write_generated(Path(out) / "videos" / "videos.json", paths, vids,
                            {"model": model, "prompts": prompts, "sampler": vars(sampler), **given})  # fmt: skip
    else:
        from ..components import images_from_uint8
        from ..video import read_generated

        prompts, vids, given = read_generated(videos)
        images = None if given is None else images_from_uint8(given)  # an image-to-video model's: first_frame_psnr
        scores = evaluate_videos(vids, prompts, per_video=True, images=images)
    per_video = scores.pop("per_video")
    record = {"model": model, "videos": str(videos) if videos else None, "prompts": prompts, "scores": scores,
              "real": real_video_scores(prompts), "per_video": per_video}  # fmt: skip
    if out is not None:
        write_json(Path(out) / "scores.json", record)
    return record


PAIRED_METRICS = ("colour", "shape", "direction", "speed", "count", "motion_smoothness", "first_frame_psnr")
PER_VIDEO_METRICS = ("count", "motion_smoothness", "first_frame_psnr")  # one value per video, not one per object


def paired_difference(rows_a: list[dict], rows_b: list[dict], resamples: int = 2000, seed: int = 0) -> dict:
    """Accuracy of B minus accuracy of A, per metric, in points, with a 95% paired bootstrap interval.

    `rows_a`, `rows_b`: the `per_video` rows of two `pare eval-shapes --out` runs on the same prompts (and
    seeds), in the same order. The videos are resampled together (the same prompt indices for both models), so
    what the two share (prompt, starting noise) cancels and the interval is that of the difference itself.
    Accuracies are in percent (points); motion smoothness (a score in [0, 1] per video) and an image-to-video
    model's first-frame PSNR (dB per video) are their means (rows without the metric leave it out). Returns {metric: {"a", "b", "diff", "low", "high"}}."""
    require(len(rows_a) == len(rows_b) and len(rows_a) >= 1, "the two runs must have the same number of videos")
    require([r["prompt"] for r in rows_a] == [r["prompt"] for r in rows_b],
            "the two runs scored other prompts: score both with the same --n and --seed")  # fmt: skip
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(rows_a), size=(resamples, len(rows_a)))
    out = {}
    for metric in PAIRED_METRICS:
        if not all(metric in r for r in (*rows_a, *rows_b)):
            continue
        scale = 1.0 if metric in ("motion_smoothness", "first_frame_psnr") else 100.0

        def tally(rows):  # (hits, checks) per video: objects for accuracies, the video itself for count and smoothness
            pairs = [(float(r[metric]), 1.0) if metric in PER_VIDEO_METRICS
                     else (float(sum(r[metric])), float(len(r[metric]))) for r in rows]  # fmt: skip
            return np.array(pairs).reshape(-1, 2)

        ta, tb = tally(rows_a), tally(rows_b)
        if ta[:, 1].sum() == 0:
            continue
        a, b = scale * ta[:, 0].sum() / ta[:, 1].sum(), scale * tb[:, 0].sum() / tb[:, 1].sum()
        sa, sb = ta[picks].sum(1), tb[picks].sum(1)  # (resamples, 2)
        with np.errstate(invalid="ignore", divide="ignore"):
            diffs = scale * (sb[:, 0] / sb[:, 1] - sa[:, 0] / sa[:, 1])
        low, high = np.nanpercentile(diffs, [2.5, 97.5])
        out[metric] = {"a": a, "b": b, "diff": b - a, "low": float(low), "high": float(high)}
    return out


def verdict(interval: dict, sign: int) -> str:
    """A claim about a paired difference (`paired_difference`'s entry) that predicts its sign (+1: B above A):
    supported when the 95% interval lies on the predicted side of 0, refuted when on the other, else inconclusive."""
    lo, hi = sorted((sign * interval["low"], sign * interval["high"]))
    return "supported" if lo > 0 else "refuted" if hi < 0 else "inconclusive"
