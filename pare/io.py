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
    success rename it to `path`, on error remove it. A file gets the mode of any file the user creates
    (0666 less the umask): some writers (safetensors) create theirs 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        if tmp.is_file():
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink() if tmp.is_file() else shutil.rmtree(tmp)


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def read_json_object(path: str | Path) -> dict:
    """A JSON file that must hold an object; anything else is a one-line PareError."""
    from .errors import PareError, require

    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PareError(f"cannot read {path}: {exc}") from None
    require(isinstance(data, dict), f"{path} does not hold a JSON object")
    return data


def write_json(path: str | Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def write_result(out: str | Path, result: dict, text: str, plot) -> None:
    """An experiment's files: OUT.json (`result`), OUT.md (`text`) and OUT.png (`plot(result, path)`), each
    written whole or not at all; then the text printed."""
    out = Path(out)
    write_json(out.with_suffix(".json"), result)
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text(text)
    plot(result, out.with_suffix(".png"))
    print(text)


def save_figure(fig, path: str | Path) -> None:
    """A matplotlib figure laid out tight and written to `path` as a PNG, whole or not at all, then closed (pyplot
    keeps every figure it made open until then)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


@contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary folder beside `path`; on success it replaces `path` (an older folder is moved aside
    first and removed only after the new one is in place). Its files get the mode of `atomic_path`'s."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        mode = 0o666 & ~_umask()
        for f in tmp.rglob("*"):
            if f.is_file() and not f.is_symlink():
                os.chmod(f, mode)
        replace_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


# What each command that writes a folder leaves in it: a folder holding one of these is an earlier output of
# that command (re-running resumes or replaces it); a folder holding anything else is the user's and refused.
OUTPUT_MARKERS = {
    "prune": ("pare.json",), "profile": ("heads.json",), "data": ("index.json",),
    "distill": ("log.jsonl", "checkpoint"), "route": ("log.jsonl", "checkpoint"),
    "step-distill": ("log.jsonl", "checkpoint"),
    "teacher train": ("run.json", "autoencoder.json", "checkpoint"), "teacher ship": ("pare.json",),
    "eval": ("results.json",), "bench": ("results.json", "methods"), "eval-shapes": ("scores.json",),
    "compress": ("stages.json",), "fuse-lora": ("pare.json",), "experts": ("pare.json",),
}


def check_output_dir(path: str | Path, command: str, what: str = "--out") -> None:
    """The one rule of every command that writes a folder: it may be new, empty, or an earlier output of the same
    command (`OUTPUT_MARKERS`); a folder that holds other files is refused, so nothing of the user's is mixed in
    or replaced."""
    from .errors import require

    path = Path(path).resolve()
    require(path.parent != path, f"{what} {path}: expected a folder to create, not the file system root")
    if path.exists():
        require(path.is_dir(), f"{what} {path} is a file")
        mine = any(_is_marker(path / m) for m in OUTPUT_MARKERS[command])
        require(mine or not any(path.iterdir()), f"{what} {path} already holds other files (not an earlier "
                f"`pare {command}` output): pick a new or empty folder")  # fmt: skip
    check_writable(path, what)


# Markers that are JSON files with a "format" field: they count only when they hold PARE's own format, so that a
# file of the user's that happens to share the name (a heads.json of theirs) is not taken for an earlier output
MARKER_FORMATS = {"heads.json": "pare-heads", "pare.json": "pare"}


def _is_marker(path: Path) -> bool:
    if not path.exists():
        return False
    if path.name not in MARKER_FORMATS:
        return True
    try:
        return json.loads(path.read_text()).get("format") == MARKER_FORMATS[path.name]
    except (OSError, ValueError, AttributeError):
        return False


def check_writable(path: str | Path, what: str = "--out") -> None:
    """Refuse, before any work, an output path that cannot be written: a folder (or file) is made where `path` is,
    or in its nearest existing parent, and removed again. Asking the file system is the only test that holds:
    permission bits say nothing of read-only mounts or of /proc, and root passes them all."""
    import tempfile

    from .errors import PareError

    path = Path(path).resolve()
    where = path if path.is_dir() else path.parent
    while not where.exists():
        where = where.parent
    try:
        if not where.is_dir():
            raise NotADirectoryError(f"{where} is a file")
        os.rmdir(tempfile.mkdtemp(prefix=".pare-probe-", dir=where))
    except OSError as exc:
        raise PareError(f"{what} {path}: cannot write there ({exc.strerror or exc})") from None


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


def tensor_digest(t) -> str:
    """A short digest of a tensor's values (an I2V run's first frames): what was made from it applies to it only."""
    import hashlib

    return hashlib.sha256(t.float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
