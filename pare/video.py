"""Writing videos (MP4 through imageio-ffmpeg, GIF through Pillow) atomically, and the record of a batch of
generated videos (`pare generate`'s layout) that `pare eval-shapes --videos` reads back."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from .errors import PareError, require
from .io import atomic_path, read_json_object, write_json

VIDEO_SUFFIXES = (".mp4", ".gif")
# Tiny videos (the embedded default is 32x32) are enlarged by an integer nearest-neighbour factor so that the
# shorter side reaches this many pixels: a 32-pixel video is unwatchable at native size.
MIN_DISPLAY_SIDE = 256


def upscale_factor(height: int, width: int, min_side: int = MIN_DISPLAY_SIDE) -> int:
    return max(1, -(-min_side // min(height, width)))


def write_video(path: str | Path, frames: torch.Tensor | np.ndarray, fps: int = 8, upscale: int | None = None) -> Path:
    """Write uint8 frames (F, H, W, 3) to `path` (.mp4 or .gif). `upscale=None` picks a factor for tiny videos."""
    path = Path(path)
    require(fps >= 1, f"--fps must be at least 1, got {fps}")
    require(path.suffix.lower() in VIDEO_SUFFIXES, f"--out must end in .mp4 or .gif, got {path.name!r}")
    frames = np.asarray(frames.cpu() if isinstance(frames, torch.Tensor) else frames)
    require(frames.ndim == 4 and frames.shape[-1] == 3, f"expected frames (F, H, W, 3), got {frames.shape}")
    k = upscale if upscale is not None else upscale_factor(*frames.shape[1:3])
    if k > 1:
        frames = frames.repeat(k, axis=1).repeat(k, axis=2)
    import imageio.v2 as imageio

    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".gif":
            imageio.mimwrite(tmp, list(frames), format="GIF", duration=1000 / fps, loop=0)
        else:
            # libx264 with yuv420p needs even sides: pad by edge replication rather than let ffmpeg rescale.
            ph, pw = frames.shape[1] % 2, frames.shape[2] % 2
            if ph or pw:
                frames = np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
            imageio.mimwrite(tmp, list(frames), fps=fps, codec="libx264", quality=8, macro_block_size=1)
    return path


def read_video(path: str | Path) -> np.ndarray:
    """(F, H, W, 3) uint8 frames of a video file."""
    import imageio.v2 as imageio

    return np.stack([np.asarray(f)[..., :3] for f in imageio.mimread(str(path), memtest=False)])


def read_image(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 pixels of an image file (PNG, JPEG, ...): alpha dropped, grey made RGB."""
    import imageio.v3 as iio

    path = Path(path)
    require(path.is_file(), f"--image {path}: no such file")
    try:
        with warnings.catch_warnings():  # imageio tries every plugin on a file it cannot read, and some warn
            warnings.simplefilter("ignore")
            image = np.asarray(iio.imread(path))
    except Exception as exc:  # imageio raises its plugins' own errors for unreadable files
        raise PareError(f"--image {path}: cannot read it as an image ({str(exc).splitlines()[0]})") from None
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    require(image.ndim == 3 and image.shape[-1] in (3, 4) and image.dtype == np.uint8,
            f"--image {path}: expected an 8-bit RGB image, got shape {image.shape} of {image.dtype}")  # fmt: skip
    return image[..., :3]


def write_image(path: str | Path, image: torch.Tensor | np.ndarray) -> Path:
    """Write (H, W, 3) uint8 pixels to a PNG file."""
    import imageio.v3 as iio

    path = Path(path)
    with atomic_path(path) as tmp:
        iio.imwrite(tmp, np.asarray(image.cpu() if isinstance(image, torch.Tensor) else image), extension=".png")
    return path


def write_generated(record_path: Path, paths: list[Path], videos, record: dict, fps: int = 8) -> None:
    """Write `videos` ((N, F, H, W, 3) uint8) to `paths` and the JSON record beside them (`record` plus the video
    names and their shape): the layout of `pare generate`, which `read_generated` and `pare eval-shapes
    --videos` read back."""
    for path, video in zip(paths, videos):
        write_video(path, video, fps=fps)
    write_json(record_path, {**record, "videos": [str(p) for p in paths], "video_shape": list(videos.shape[1:4])})


def read_generated(folder: Path) -> tuple[list[str], np.ndarray, np.ndarray | None]:
    """(prompts, frames (N, F, H, W, 3) uint8, first frames given (N, H, W, 3) uint8 or None) of every video whose
    `write_generated` record is in `folder`, at the model's own size (written videos may be enlarged for display).
    The first frames of an image-to-video model's videos are read from the files its records name (`images`: one
    for every video of the record, or one per video; absolute, or relative to the record's folder); None unless
    every record names them."""
    folder = Path(folder)
    require(folder.is_dir(), f"--videos {folder}: expected a folder of videos written by `pare generate`")
    prompts, frames, images = [], [], []
    for record_path in sorted(folder.glob("*.json")):
        record = read_json_object(record_path)
        if not (isinstance(record.get("videos"), list) and "prompts" in record and "video_shape" in record):
            continue  # not a `pare generate` record (e.g. a scores.json)
        named = record.get("images") or []
        for i, (video, prompt) in enumerate(zip(record["videos"], record["prompts"])):
            path = record_path.parent / Path(video).name  # the record's own folder, wherever it has moved
            require(path.is_file(), f"{record_path} names {path.name}, which is not in {folder}")
            clip = read_video(path)
            shape = record["video_shape"]
            k = clip.shape[1] // shape[1]
            frames.append(clip[:, ::k, ::k][:, : shape[1], : shape[2]])
            prompts.append(prompt)
            images.append(record_path.parent / named[i if len(named) > 1 else 0] if named else None)
    require(prompts, f"no `pare generate` records (*.json) in {folder}")
    given = None
    if all(p is not None for p in images):
        given = np.stack([read_image(p) for p in images])
        require(given.shape[1:3] == frames[0].shape[1:3], f"the first frames the records in {folder} name are "
                f"{given.shape[2]}x{given.shape[1]}, not the videos' {frames[0].shape[2]}x{frames[0].shape[1]}")  # fmt: skip
    return prompts, np.stack(frames), given
