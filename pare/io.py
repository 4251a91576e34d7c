"""Atomic file output: write to a temporary name beside the target, then rename, so that a killed run never
leaves a half-written file under the real name."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path` (same suffix, so writers that infer the format still work); on
    success rename it to `path`, on error remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink() if tmp.is_file() else shutil.rmtree(tmp)


def write_json(path: str | Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


@contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary folder beside `path`; on success it replaces `path` (an older folder is moved aside
    first and removed only after the new one is in place)."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def check_output_dir(path: str | Path, what: str = "--out") -> None:
    """Refuse to replace a folder that holds anything but an earlier output of this kind (a pare.json folder)."""
    from .errors import require

    path = Path(path).resolve()
    require(path.parent != path, f"{what} {path}: expected a folder to create, not the file system root")
    if path.exists():
        require(path.is_dir(), f"{what} {path} is a file")
        require((path / "pare.json").is_file() or not any(path.iterdir()),
                f"{what} {path} already holds other files: pick a new or empty folder")  # fmt: skip


def recover_dir(path: Path) -> None:
    """If a swap by `replace_dir` was killed between its two renames, put the older folder back."""
    path = Path(path)
    if not path.exists():
        olds = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
        if olds:
            os.replace(olds[-1], path)


def replace_dir(new: Path, path: Path) -> None:
    """Put the finished folder `new` in place of `path`; the older folder is moved aside first and removed only
    once the new one is in place, so at every moment `path` is either the old folder or the new one."""
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(new, path)
    if old.exists():
        shutil.rmtree(old)
