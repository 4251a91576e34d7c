import json

import cv2
import numpy as np
import pytest

from pare.cli import main
from pare.evaluation.fidelity import mean_psnr, psnr, ssim
from pare.evaluation.vbench import (dynamic_degree, interpolate, is_dynamic, motion_smoothness, optical_flow,
                                    temporal_flickering)  # fmt: skip


def texture(size=96, seed=0):
    g = np.random.default_rng(seed)
    t = cv2.GaussianBlur(g.random((size, size, 3)).astype(np.float32), (0, 0), 2)
    return (t - t.min()) / (t.max() - t.min())


def moving(shift=2, frames=9):
    """A textured pattern sliding right by `shift` pixels per frame (cropped so nothing wraps into view)."""
    t = texture()
    return np.stack([np.roll(t, shift * k, axis=1)[12:-12, 12:-12] for k in range(frames)])


def test_static_video():
    still = np.repeat(moving()[:1], 9, axis=0)
    assert temporal_flickering(still) == 1.0 and not is_dynamic(still) and dynamic_degree([still]) == 0.0
    assert motion_smoothness(still) == 1.0


def test_flow_of_a_shifted_pattern():
    v = moving(shift=3)
    flow = optical_flow(v[0], v[1])[8:-8, 8:-8]
    assert flow[..., 0].mean() == pytest.approx(3.0, abs=0.1) and abs(flow[..., 1].mean()) < 0.1
    assert is_dynamic(moving(shift=3))  # 3 px/frame > 6 x 72 / 256 = 1.7 px


def test_interpolation_of_linear_motion_is_near_exact():
    v = moving(shift=2)
    mid = interpolate(v[2], v[4])
    err = np.abs(mid[8:-8, 8:-8] - (v[3] * 255)[8:-8, 8:-8]).mean()
    assert err < 1.5  # of 255
    assert motion_smoothness(v) > 0.99
    shuffled = v[[0, 5, 2, 8, 4, 1, 6, 3, 7]]
    assert motion_smoothness(shuffled) < motion_smoothness(v) - 0.03


def test_flicker_known_answer():
    blink = np.zeros((4, 8, 8, 3))
    blink[1::2] = 1.0
    assert temporal_flickering(blink) == 0.0
    half = np.zeros((2, 8, 8, 3), np.uint8)
    half[1] = 51  # mean absolute difference 51: (255 - 51) / 255
    assert temporal_flickering(half) == pytest.approx(204 / 255)


def test_psnr_ssim_known_values():
    v = moving()
    assert psnr(v, v) == float("inf") and ssim(v, v) == pytest.approx(1.0)
    assert psnr(np.clip(v + 0.01, 0, 1), v) == pytest.approx(20 * np.log10(255 / 2.55), abs=0.05)
    a = np.zeros((1, 16, 16, 3), np.uint8)
    b = np.full((1, 16, 16, 3), 255, np.uint8)
    assert psnr(a, b) == pytest.approx(0.0)
    # SSIM of two constant images c1 and c2: luminance term only, (2 c1 c2 + C1) / (c1^2 + c2^2 + C1)
    c1, c2, C1 = 100.0, 150.0, (0.01 * 255) ** 2
    x, y = np.full((1, 16, 16, 3), c1, np.uint8), np.full((1, 16, 16, 3), c2, np.uint8)
    assert ssim(x, y) == pytest.approx((2 * c1 * c2 + C1) / (c1**2 + c2**2 + C1), rel=1e-6)
    noisy = np.clip(v + np.random.default_rng(0).normal(0, 0.1, v.shape), 0, 1)
    assert ssim(noisy, v) < 0.9


def test_pare_eval_end_to_end(stage_inputs, tmp_path, capsys):
    d, teacher = stage_inputs
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(d / "student"), "--reference", teacher, "--n", "3", "--steps", "2",
                 "--out", str(out)]) == 0  # fmt: skip
    r = json.loads((out / "results.json").read_text())
    assert len(r["per_video"]) == 3 and r["sampler"]["steps"] == 2
    assert r["model_scores"]["flops_ratio"] < 1.0 == r["reference_scores"]["flops_ratio"]
    assert "shapes" in r["model_scores"] and "dynamic_degree" in r["proxies"]
    assert "PSNR to reference" in (out / "results.md").read_text()
    same = tmp_path / "same"
    assert main(["eval", "--model", teacher, "--reference", teacher, "--n", "2", "--steps", "2", "--out", str(same)]) == 0
    s = json.loads((same / "results.json").read_text())
    assert s["fidelity"]["ssim"] == pytest.approx(1.0) and s["fidelity"]["psnr"] == float("inf")


def test_mean_psnr_counts_identical_videos():
    """Identical videos are counted, not silently dropped: (mean of the others, how many are identical)."""
    assert mean_psnr([20.0, float("inf"), 30.0]) == (25.0, 1)
    assert mean_psnr([float("inf")] * 2) == (float("inf"), 2)
    assert mean_psnr([12.0]) == (12.0, 0)


def test_save_figure_writes_a_whole_png_and_closes_the_figure(tmp_path):
    """Every plot goes through `save_figure`: a PNG under the real name, no temporary left beside it, the figure
    closed; a figure that fails to draw leaves an earlier file as it was."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pare.io import save_figure

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = tmp_path / "sub" / "plot.png"
    save_figure(fig, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["plot.png"]
    assert fig.number not in plt.get_fignums()
    before = path.read_bytes()
    bad, ax = plt.subplots()
    ax.text(0, 0, r"$\notacommand$")  # mathtext fails only when the figure is drawn
    with pytest.raises(ValueError):
        save_figure(bad, path)
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == ["plot.png"]
    plt.close(bad)
