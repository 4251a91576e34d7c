"""VBench dimensions that need no downloaded network, by VBench's own formulas. Frames are (F, H, W, 3) floats
in [0, 1] (or uint8).

temporal_flickering  exact: mean over consecutive frame pairs of (255 - mean absolute difference) / 255.
dynamic_degree       proxy: OpenCV DIS optical flow in place of RAFT, with VBench's rule: per frame pair the
                     mean of the top 5% flow magnitudes; a pair moves when that exceeds 6 x min(H, W) / 256
                     pixels; a video is dynamic when round(4 x F / 16) pairs move. VBench's threshold was set
                     for RAFT, whose magnitudes DIS roughly matches on textured motion and underestimates on
                     flat regions, so the proxy can call slow, flat motion static.
motion_smoothness    proxy: VBench drops the odd frames, interpolates them back with AMT and scores
                     (255 - mean absolute error) / 255; here the interpolation warps both neighbours halfway
                     along their DIS flow and averages them.
subject_consistency  VBench's formula (mean over frames of the average of cos(f_k, f_0) and cos(f_k, f_{k-1}),
                     each clipped at 0) on whatever frame features the caller has (VBench: DINO).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import optional_module

cv2 = optional_module("cv2")  # OpenCV is an extra: pare[eval]

PROXIES = {
    "dynamic_degree": "OpenCV DIS optical flow in place of RAFT",
    "motion_smoothness": "DIS-flow frame interpolation in place of AMT",
}


def _u8(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    return frames if frames.dtype == np.uint8 else (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)


def temporal_flickering(frames: np.ndarray) -> float:
    """VBench: mean over consecutive frame pairs of (255 - mean absolute difference) / 255."""
    f = _u8(frames).astype(np.float64)
    diffs = np.abs(np.diff(f, axis=0)).mean(axis=(1, 2, 3))
    return float(np.mean((255 - diffs) / 255))


_DIS = None
MIN_FLOW_SIDE = 16


def optical_flow(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(H, W, 2) DIS flow (x, y in pixels) from RGB frame a to frame b (uint8 or [0, 1])."""
    global _DIS
    if _DIS is None:  # one instance for the process: creating it is not free
        _DIS = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    ga, gb = (cv2.cvtColor(_u8(x), cv2.COLOR_RGB2GRAY) for x in (a, b))
    h, w = ga.shape
    k = -(-MIN_FLOW_SIDE // min(h, w))  # DIS needs frames of at least 12 pixels a side: enlarge tiny ones
    if k > 1:
        ga, gb = (cv2.resize(x, (w * k, h * k), interpolation=cv2.INTER_LINEAR) for x in (ga, gb))
        flow = _DIS.calc(ga, gb, None)
        return cv2.resize(flow, (w, h), interpolation=cv2.INTER_AREA) / k
    return _DIS.calc(ga, gb, None)


def flow_score(flow: np.ndarray) -> float:
    """VBench's per-pair score: the mean of the largest 5% flow magnitudes."""
    rad = np.sqrt((flow**2).sum(-1)).flatten()
    cut = max(1, int(rad.size * 0.05))
    return float(np.sort(rad)[::-1][:cut].mean())


def is_dynamic(frames: np.ndarray) -> bool:
    """VBench's dynamic-degree rule on one video (with DIS flow)."""
    frames = _u8(frames)
    thres = 6.0 * min(frames.shape[1:3]) / 256.0
    need = max(1, round(4 * len(frames) / 16.0))
    moving = sum(flow_score(optical_flow(a, b)) > thres for a, b in zip(frames[:-1], frames[1:]))
    return bool(moving >= need)


def dynamic_degree(videos) -> float:
    """Share of videos VBench's rule calls dynamic."""
    return float(np.mean([is_dynamic(v) for v in videos]))


def warp(frame: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Backward warp: out(p) = frame(p + flow(p)), bilinear, borders replicated."""
    h, w = flow.shape[:2]
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return cv2.remap(frame, gx + flow[..., 0], gy + flow[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def interpolate(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The frame halfway between a and b: each warped halfway along the flow towards the other, averaged."""
    a8, b8 = _u8(a), _u8(b)
    f_ab, f_ba = optical_flow(a8, b8), optical_flow(b8, a8)
    # the middle frame at p came from a at p - f_ab/2 and from b at p - f_ba/2 (flow fields evaluated at p)
    from_a = warp(a8.astype(np.float32), -0.5 * f_ab)
    from_b = warp(b8.astype(np.float32), -0.5 * f_ba)
    return (from_a + from_b) / 2


def motion_smoothness(frames: np.ndarray) -> float:
    """VBench's formula: drop the odd frames, interpolate them back, (255 - mean abs error) / 255."""
    f = _u8(frames)
    odd = range(1, len(f) - 1, 2)
    errors = [np.abs(interpolate(f[k - 1], f[k + 1]) - f[k].astype(np.float32)).mean() for k in odd]
    return float((255 - np.mean(errors)) / 255)


def subject_consistency(frame_feats: torch.Tensor) -> torch.Tensor:
    """VBench's formula on frame features (B, F, D); returns (B,)."""
    f = torch.nn.functional.normalize(frame_feats, dim=-1)
    to_first = (f[:, 1:] * f[:, :1]).sum(-1).clamp_min(0)
    to_prev = (f[:, 1:] * f[:, :-1]).sum(-1).clamp_min(0)
    return ((to_first + to_prev) / 2).mean(1)
