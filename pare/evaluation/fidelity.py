"""Fidelity of a video to a reference video of the same prompt and seed: PSNR and SSIM, per video."""

from __future__ import annotations

import numpy as np

from ..errors import optional_module

cv2 = optional_module("cv2")  # OpenCV is an extra: pare[eval]


def _f64(frames) -> np.ndarray:
    frames = np.asarray(frames)
    return frames.astype(np.float64) if frames.dtype == np.uint8 else np.clip(frames, 0, 1).astype(np.float64) * 255


def psnr(video: np.ndarray, reference: np.ndarray) -> float:
    """PSNR in dB over the whole video (frames (F, H, W, 3)); inf for identical videos."""
    mse = np.mean((_f64(video) - _f64(reference)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def mean_psnr(values: list[float]) -> tuple[float, int]:
    """(mean PSNR over the videos that differ from their reference, how many are identical). An identical video
    has infinite PSNR and would make any mean infinite, so it is counted instead of averaged; every output that
    shows the mean shows the count beside it. inf when every video is identical."""
    finite = [v for v in values if np.isfinite(v)]
    return (float(np.mean(finite)) if finite else float("inf")), len(values) - len(finite)


def ssim(video: np.ndarray, reference: np.ndarray) -> float:
    """SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03), per frame and channel,
    averaged."""
    a, b = _f64(video), _f64(reference)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    blur = lambda x: cv2.GaussianBlur(x, (11, 11), 1.5, borderType=cv2.BORDER_REFLECT)  # noqa: E731
    scores = []
    for fa, fb in zip(a, b):
        for c in range(fa.shape[-1]):
            x, y = fa[..., c], fb[..., c]
            mx, my = blur(x), blur(y)
            sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
            m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
            scores.append(m.mean())
    return float(np.mean(scores))
