"""heads.json and heads.png: the profile as data and as a picture of blocks x heads."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import optional_module
from ..io import save_figure, write_json

ROLE_LETTER = {"spatial": "S", "temporal": "T", "mixed": "M"}


def write_profile(result: dict, out: Path) -> tuple[Path, Path]:
    out = Path(out)
    write_json(out / "heads.json", result)
    png = out / "heads.png"
    plot_profile(result, png)
    return out / "heads.json", png


def plot_profile(result: dict, path: Path) -> None:
    """Three maps of blocks (rows) x heads (columns): attention mass on the own frame with each head's role
    letter; importance; role-aware score."""
    matplotlib = optional_module("matplotlib")  # an extra: pare[eval]
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = result["blocks"]
    own = np.array([[h["stats"]["own"] for h in b["heads"]] for b in blocks])
    roles = [[ROLE_LETTER[h["role"]] for h in b["heads"]] for b in blocks]
    key = "removal_error" if blocks[0]["heads"][0]["removal_error"] is not None else "taylor"
    importance = np.array([[h[key] for h in b["heads"]] for b in blocks])
    score = np.array([[h["score"] for h in b["heads"]] for b in blocks])
    n_blocks, n_heads = own.shape
    fig, axes = plt.subplots(1, 3, figsize=(3 + 1.1 * 3 * max(n_heads, 4) * 0.5, 1.5 + 0.35 * n_blocks), squeeze=False)
    panels = [
        (own, "attention mass on own frame\n(S spatial, T temporal, M mixed)", "coolwarm_r", (0, 1)),
        (importance, f"importance ({key.replace('_', ' ')})", "viridis", None),
        (score, "role-aware score", "viridis", None),
    ]
    for ax, (data, title, cmap, lim) in zip(axes[0], panels):
        im = ax.imshow(data, cmap=cmap, aspect="auto", vmin=lim[0] if lim else None, vmax=lim[1] if lim else None)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("block")
        ax.set_xticks(range(n_heads))
        ax.set_yticks(range(n_blocks))
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        if data is own and n_heads * n_blocks <= 2000:
            for b in range(n_blocks):
                for h in range(n_heads):
                    ax.text(h, b, roles[b][h], ha="center", va="center", fontsize=7,
                            color="white" if abs(data[b, h] - 0.5) > 0.3 else "black")  # fmt: skip
    counts = result["role_counts"]
    fig.suptitle(f"{result['model']}: {counts['spatial']} spatial, {counts['temporal']} temporal, "
                 f"{counts['mixed']} mixed heads", fontsize=10)  # fmt: skip
    save_figure(fig, path)
