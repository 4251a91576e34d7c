import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pare.shapes import domain
from pare.shapes.evaluate import (UNKNOWN_SHAPE, Track, _shape_of, classify_motion, count_misses, evaluate_videos,
                                  frechet_distance,
                                  motion_smoothness, real_video_scores, subject_consistency,
                                  temporal_flickering)  # fmt: skip

PROMPTS = domain.heldout_prompts(64)


@pytest.fixture(scope="module")
def real():
    return domain.render(domain.parse_prompts(PROMPTS), seed=3)


@pytest.fixture(scope="module")
def real_scores(real):
    return evaluate_videos(real, PROMPTS)


def test_ground_truth_scores_near_perfect(real_scores):
    s = real_scores
    assert s["colour"] == s["direction"] == s["count"] == s["speed"] == 100.0
    assert s["shape"] == 100.0
    assert s["temporal_flickering"] > 0.95 and s["motion_smoothness"] > 0.95
    assert s["subject_consistency"] > 0.95


def test_swapped_shapes_miss_only_on_two_object_prompts(real_scores):
    """Shapes drawn on the wrong object of a two-object prompt (a binding miss) count against shape in the
    two-object part of the report and leave the one-object part whole."""
    scenes = domain.parse_prompts(PROMPTS)
    two = scenes.count == 2
    swapped = domain.Scenes(scenes.colour, torch.where(two[:, None], scenes.shape.flip(1), scenes.shape), scenes.motion,
                            scenes.speed)  # fmt: skip
    same = (scenes.shape[:, 0] == scenes.shape[:, 1])[two]
    s = evaluate_videos(domain.render(swapped, seed=3), PROMPTS)
    n1, n2 = int((~two).sum()), int(two.sum())
    assert real_scores["by_objects"]["1"]["videos"] == n1 and real_scores["by_objects"]["2"]["videos"] == n2 and n1 and n2
    assert real_scores["by_objects"]["2"]["shape"] == 100.0
    assert s["by_objects"]["1"] == real_scores["by_objects"]["1"]
    assert s["by_objects"]["2"]["shape"] == pytest.approx(100.0 * float(same.float().mean()))
    assert s["by_objects"]["2"]["colour"] == s["by_objects"]["2"]["count"] == 100.0
    assert s["shape"] == pytest.approx(100.0 * (n1 + 2 * int(same.sum())) / (n1 + 2 * n2))


def test_count_misses_names_the_dropped_object_and_which_was_smaller(real):
    """Videos drawn with a prompt's object left out, or with an object it does not ask for, are the lost ones; the
    dropped object is named, and of a two-object video's two objects exactly one is the smaller."""
    scenes = domain.parse_prompts(PROMPTS)
    two = (scenes.count == 2).nonzero().flatten().tolist()[:3]
    one = (scenes.count == 1).nonzero().flatten().tolist()[:2]
    drop_second, drop_first, extra = scenes.colour.clone(), scenes.colour.clone(), scenes.colour.clone()
    shape_first = scenes.shape.clone()
    for i in two:
        drop_second[i, 1] = domain.NO_OBJECT
        drop_first[i, 0], shape_first[i, 0], drop_first[i, 1] = scenes.colour[i, 1], scenes.shape[i, 1], domain.NO_OBJECT
    for i in one:
        extra[i, 1] = (scenes.colour[i, 0] + 1) % domain.NO_OBJECT
    draw = lambda colour, shape: domain.render(domain.Scenes(colour, shape, scenes.motion, scenes.speed), seed=3)
    names = list(domain.COLOURS)
    second = count_misses(real, draw(drop_second, scenes.shape), PROMPTS)
    first = count_misses(real, draw(drop_first, shape_first), PROMPTS)
    more = count_misses(real, draw(extra, scenes.shape), PROMPTS)
    assert second["lost"] == first["lost"] == two and second["won"] == first["won"] == []
    assert second["fewer"] == first["fewer"] == 3 and second["more"] == first["more"] == 0
    assert [(i, c, last) for i, c, _, last in second["dropped"]] == [(i, names[scenes.colour[i, 1]], True) for i in two]
    assert [(i, c, last) for i, c, _, last in first["dropped"]] == [(i, names[scenes.colour[i, 0]], False) for i in two]
    assert [a[2] != b[2] for a, b in zip(second["dropped"], first["dropped"])] == [True] * 3
    assert more["lost"] == one and (more["fewer"], more["more"], more["dropped"]) == (0, 2, [])
    back = count_misses(draw(drop_second, scenes.shape), real, PROMPTS)  # the reference's misses are the model's wins
    assert back["won"] == two and back["lost"] == []


def _silhouette(shape: str, half: float, centre=(15.3, 14.6)) -> np.ndarray:
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    rel = torch.stack([xs - centre[0], ys - centre[1]], -1)
    return (domain.sdf(torch.tensor(domain.SHAPES.index(shape)), rel, torch.tensor(half)) <= 0).numpy()


def _read(mask: np.ndarray) -> int:
    ys, xs = np.nonzero(mask)
    return _shape_of(mask, np.array([xs.mean(), ys.mean()]))[0]


@pytest.mark.parametrize("shape", domain.SHAPES)
@pytest.mark.parametrize("half", [2.5, 3.5, 5.0])
def test_shape_reader_reads_every_drawn_shape(shape, half):
    mask = _silhouette(shape, half)
    code, iou = _shape_of(mask, np.array([15.3, 14.6]))  # at the centre it was drawn at
    assert code == domain.SHAPES.index(shape) and iou >= 0.9
    assert _read(mask) == domain.SHAPES.index(shape)  # at the silhouette's own centroid


def test_shape_reader_ignores_a_missing_corner_and_refuses_a_blob():
    square = _silhouette("square", 4.0)
    ys, xs = np.nonzero(square)
    for y, x in [(ys.min(), xs.min()), (ys.min(), xs.max())]:  # a top corner pixel lost (read as a triangle
        dented = square.copy()  # by a rule on the bounding box's corners)
        dented[y, x] = False
        assert _read(dented) == domain.SHAPES.index("square")
    cross = np.zeros((32, 32), dtype=bool)  # a plus sign: no shape of the domain
    cross[10:22, 14:18] = cross[14:18, 10:22] = True
    assert _read(cross) == UNKNOWN_SHAPE
    track = Track(0, np.zeros((4, 2)), np.array([UNKNOWN_SHAPE, UNKNOWN_SHAPE, 1, -1]))
    assert track.shape == UNKNOWN_SHAPE  # an object that is mostly a blob has no shape, not its minority vote


def test_shuffled_frames_break_motion(real, real_scores):
    g = torch.Generator().manual_seed(0)
    shuffled = torch.stack([v[:, torch.randperm(domain.FRAMES, generator=g)] for v in real])
    s = evaluate_videos(shuffled, PROMPTS)
    assert s["direction"] < 60 and s["colour"] == 100.0 and s["count"] == 100.0
    assert s["motion_smoothness"] < real_scores["motion_smoothness"] - 0.02
    assert s["fd"] > 3 * real_scores["fd"]


def test_noise_breaks_colours_and_flicker(real, real_scores):
    noisy = real + 0.6 * torch.randn(real.shape, generator=torch.Generator().manual_seed(0))
    s = evaluate_videos(noisy.clamp(-1, 1), PROMPTS)
    assert s["shape"] < 60 and s["temporal_flickering"] < real_scores["temporal_flickering"] - 0.1
    assert s["fd"] > 2 * real_scores["fd"]


def test_wrong_colour_is_caught(real, real_scores):
    swapped = real[:, [2, 1, 0]]  # swap red and blue channels: most palette colours become others
    s = evaluate_videos(swapped, PROMPTS)
    assert s["colour"] < 60 and s["fd"] > 2 * real_scores["fd"]
    assert s["temporal_flickering"] == pytest.approx(real_scores["temporal_flickering"], abs=1e-3)


def test_real_vs_real_floor():
    ref = real_video_scores(PROMPTS)
    assert ref["colour"] == 100.0 and 0 <= ref["fd"] < 300


def test_flicker_and_smoothness_known_answers():
    still = np.full((8, 4, 4, 3), 0.5)
    assert temporal_flickering(still) == 1.0 and motion_smoothness(still) == 1.0
    blink = np.zeros((8, 4, 4, 3))
    blink[1::2] = 1.0
    assert temporal_flickering(blink) == 0.0
    assert motion_smoothness(blink) == 0.0  # odd frames are white, the average of their black neighbours black
    ramp = np.linspace(0, 1, 8)[:, None, None, None] * np.ones((8, 4, 4, 3))
    assert motion_smoothness(ramp) == pytest.approx(1.0, abs=3e-3)  # up to 8-bit rounding


def test_frechet_distance_known_answers():
    g = np.random.default_rng(0)
    a = g.normal(size=(4000, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, a + np.array([3.0, 0, 4.0])) == pytest.approx(25.0, abs=1e-6)
    assert frechet_distance(a, 2 * a) == pytest.approx(3.0, rel=0.05)  # tr(I + 4I - 2*2I) = 3
    assert np.isnan(frechet_distance(a[:1], a))  # one video: no covariance (pare eval --n 1 must not crash)


def test_subject_consistency_known_answers():
    same = torch.ones(2, 5, 4)
    assert torch.allclose(subject_consistency(same), torch.ones(2))
    flip = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).repeat(3, 1)[None]  # orthogonal consecutive frames
    assert subject_consistency(flip).item() == pytest.approx(0.5 * (2 / 5) * 0.5 + 0.5 * 0 + 0.0, abs=0.3)


@pytest.mark.parametrize(
    "path, motion",
    [
        ([(5 + 2.4 * t, 10) for t in range(8)], ("right", 1)),
        ([(20 - 1.2 * t, 10 + 1.2 * t) for t in range(8)], ("down-left", 0)),
        ([(10, 10 + 0.3 * (-1) ** t) for t in range(8)], ("still", 0)),
        ([(10, 25 - 8 * abs(np.sin(np.pi * t / 8))) for t in range(8)], ("bouncing", 0)),
        ([(16 + 5 * np.cos(2 * np.pi * t / 8), 16 - 5 * np.sin(2 * np.pi * t / 8)) for t in range(8)], ("circling", 0)),
    ],
)
def test_motion_classifier_on_constructed_tracks(path, motion):
    track = Track(0, np.array(path, dtype=float), np.zeros(8, dtype=int))
    name, speed = motion
    got = classify_motion(track)
    assert domain.MOTIONS[got[0]] == name and (name not in domain.LINEAR or got[1] == speed)


def test_paired_difference_known_answers(tmp_path):
    import subprocess
    import sys

    from pare.errors import PareError
    from pare.shapes.evaluate import paired_difference

    def row(prompt, colour, count):
        return {"prompt": prompt, "colour": colour, "shape": colour, "direction": colour, "speed": [], "count": count}

    a = [row(f"p{i}", [True, True], True) for i in range(10)]
    same = paired_difference(a, a, resamples=200)
    assert same["colour"] == {"a": 100.0, "b": 100.0, "diff": 0.0, "low": 0.0, "high": 0.0}
    assert "speed" not in same  # no linear motion: nothing to check
    # B loses one of 20 objects and one of 10 counts: -5 and -10 points; the interval spans 0 down to the loss
    b = [row(f"p{i}", [True, i != 3], i != 3) for i in range(10)]
    d = paired_difference(a, b, resamples=2000)
    assert d["colour"]["diff"] == pytest.approx(-5.0) and d["count"]["diff"] == pytest.approx(-10.0)
    assert d["colour"]["high"] == 0.0 and -20.0 <= d["colour"]["low"] < -5.0
    assert "motion_smoothness" not in d  # rows without the per-video score
    # motion smoothness, a per-video score: B's video 3 drops from 0.9 to 0.8, a mean difference of -0.01
    sa = [r | {"motion_smoothness": 0.9} for r in a]
    sb = [r | {"motion_smoothness": 0.8 if i == 3 else 0.9} for i, r in enumerate(a)]
    m = paired_difference(sa, sb, resamples=2000)["motion_smoothness"]
    assert (m["a"], m["diff"], m["high"]) == (pytest.approx(0.9), pytest.approx(-0.01), pytest.approx(0.0))
    assert -0.04 <= m["low"] < -0.01
    # an image-to-video model's first-frame PSNR, dB per video: B's video 5 loses 10 dB, a mean difference of -1
    pa = [r | {"first_frame_psnr": 32.0} for r in a]
    pb = [r | {"first_frame_psnr": 22.0 if i == 5 else 32.0} for i, r in enumerate(a)]
    f = paired_difference(pa, pb, resamples=2000)["first_frame_psnr"]
    assert (f["a"], f["b"], f["diff"], f["high"]) == (32.0, 31.0, -1.0, 0.0) and -4.0 <= f["low"] < -1.0
    with pytest.raises(PareError, match="other prompts"):
        paired_difference(a, [row("q", [True], True)] + a[1:])
    # the script: a table, and a one-line error (exit 2) for a file without per-video rows
    for name, rows in (("a", a), ("b", b)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"per_video": rows}))
    (tmp_path / "old.json").write_text(json.dumps({"scores": {}}))
    script = str(Path(__file__).parents[1] / "scripts" / "compare_scores.py")
    run = subprocess.run([sys.executable, script, str(tmp_path / "a.json"), str(tmp_path / "b.json")],
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0 and "colour      100.0   95.0    -5.0" in run.stdout
    run = subprocess.run([sys.executable, script, str(tmp_path / "a.json"), str(tmp_path / "old.json")],
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "with per_video" in run.stderr


def test_missing_classifier_is_an_error_not_a_shorter_report(monkeypatch, tmp_path):
    from pare import PareError
    from pare.shapes import evaluate

    monkeypatch.setattr(evaluate, "CLASSIFIER_PATH", tmp_path / "gone.safetensors")
    videos = domain.render(domain.parse_prompts(["a red circle bouncing"]), seed=1)
    with pytest.raises(PareError, match="classifier .* is missing"):
        evaluate_videos(videos, ["a red circle bouncing"])
