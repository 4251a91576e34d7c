"""Every PARE stage leaves a folder the next one loads: `pare.json` (what it is, the format version, what it was
made from, the resolved settings that made it) beside a diffusers-format `transformer/` subfolder."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import PareError
from .io import write_json

MANIFEST = "pare.json"
FORMAT = "pare"
FORMAT_VERSION = 1


def base_spec(spec: str) -> str:
    """A model spec as an output records its base: a folder as an absolute path, so that the output keeps finding
    its base from anywhere."""
    p = Path(spec)
    return str(p.resolve()) if p.exists() else spec


def write_manifest(folder: Path, kind: str, base: str, settings: dict, **extra) -> dict:
    """Write `folder/pare.json` for an output of stage `kind`, made from the model spec `base`."""
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind, "base": base, "settings": settings}
    manifest.update(extra)
    write_json(Path(folder) / MANIFEST, manifest)
    return manifest


def read_manifest(folder: Path) -> dict:
    """Read and check `folder/pare.json`; a foreign or newer file is refused with a clear message."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PareError(f"cannot read {path}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PareError(f"{path} is not a PARE manifest (expected \"format\": \"{FORMAT}\")")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise PareError(
            f"{folder} was written in PARE format version {version}; this PARE reads up to {FORMAT_VERSION}: upgrade pare"
        )
    for key in ("kind", "base"):
        if key not in manifest:
            raise PareError(f"{path} lacks the field {key!r}")
    shape, sampler = manifest.get("default_shape"), manifest.get("sampler")
    if shape is not None and not (isinstance(shape, list) and len(shape) == 3
                                  and all(isinstance(n, int) and n > 0 for n in shape)):  # fmt: skip
        raise PareError(f"{path}: \"default_shape\" must be [frames, height, width], got {shape!r}")
    if sampler is not None and not isinstance(sampler, dict):
        raise PareError(f"{path}: \"sampler\" must be an object of sampler settings, got {sampler!r}")
    return manifest
