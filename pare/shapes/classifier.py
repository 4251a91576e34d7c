"""A small video classifier of the shapes domain. Its features give the evaluator a Frechet distance between
generated and real videos (as FVD uses I3D features) and per-frame features for subject consistency (as
VBench uses DINO). Trained on rendered videos in a few CPU minutes by `train_classifier`; shipped in the
package."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ..errors import PareError
from ..io import atomic_path
from . import domain

CLASSIFIER_PATH = Path(__file__).parent / "classifier.safetensors"


class ShapesClassifier(nn.Module):
    """Per-frame 2D convolutions, then 3D convolutions over time; heads for colours, shapes, motion, count."""

    def __init__(self, width: int = 32, feature_dim: int = 64):
        super().__init__()
        self.config = {"width": width, "feature_dim": feature_dim}
        w = width
        self.frame = nn.Sequential(
            nn.Conv2d(3, w, 4, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.GELU(),
        )  # fmt: skip
        self.video = nn.Sequential(
            nn.Conv3d(2 * w, 2 * w, 3, padding=1), nn.GELU(),
            nn.Conv3d(2 * w, feature_dim, 3, stride=(2, 2, 2), padding=1), nn.GELU(),
        )  # fmt: skip
        self.heads = nn.ModuleDict({
            "colour": nn.Linear(feature_dim, len(domain.COLOURS)),
            "shape": nn.Linear(feature_dim, len(domain.SHAPES)),
            "motion": nn.Linear(feature_dim, len(domain.MOTIONS)),
            "count": nn.Linear(feature_dim, 2),
        })  # fmt: skip

    def features(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """video (B, 3, F, H, W) in [-1, 1] -> video features (B, feature_dim), frame features (B, F, 2w)."""
        B, C, Fr, H, W = video.shape
        maps = self.frame(video.transpose(1, 2).reshape(B * Fr, C, H, W))  # (B*F, 2w, H/4, W/4)
        frame_feats = maps.mean(dim=(2, 3)).view(B, Fr, -1)  # (B, F, 2w)
        maps = maps.view(B, Fr, *maps.shape[1:]).transpose(1, 2)  # (B, 2w, F, H/4, W/4)
        return self.video(maps).mean(dim=(2, 3, 4)), frame_feats

    def forward(self, video: torch.Tensor) -> dict[str, torch.Tensor]:
        feats, _ = self.features(video)
        return {name: head(feats) for name, head in self.heads.items()}

    def save(self, path: Path, record: dict) -> None:
        with atomic_path(path) as tmp:
            state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
            save_file(state, str(tmp), metadata={"config": json.dumps(self.config), "record": json.dumps(record)})

    @classmethod
    def load(cls, path: Path = CLASSIFIER_PATH) -> ShapesClassifier:
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata()
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:
            raise PareError(f"cannot read the shapes classifier {path}: {exc}") from None
        model = cls(**json.loads(meta["config"]))
        model.load_state_dict(state)
        model.record = json.loads(meta.get("record", "{}"))
        return model.eval()


def targets(scenes: domain.Scenes) -> dict[str, torch.Tensor]:
    """Training targets of the classifier heads for a batch of scenes."""
    B, dev = scenes.batch, scenes.motion.device
    colour = torch.zeros(B, len(domain.COLOURS) + 1, device=dev)
    colour.scatter_(1, scenes.colour, 1.0)
    shape = torch.zeros(B, len(domain.SHAPES), device=dev)
    shape.scatter_(1, scenes.shape[:, :1], 1.0)
    two = scenes.colour[:, 1] != domain.NO_OBJECT
    shape[two] = shape[two].scatter(1, scenes.shape[two, 1:], 1.0)
    return {"colour": colour[:, :-1], "shape": shape, "motion": scenes.motion, "count": two.long()}


def losses(logits: dict, tgt: dict) -> torch.Tensor:
    return (F.binary_cross_entropy_with_logits(logits["colour"], tgt["colour"])
            + F.binary_cross_entropy_with_logits(logits["shape"], tgt["shape"])
            + F.cross_entropy(logits["motion"], tgt["motion"]) + F.cross_entropy(logits["count"], tgt["count"]))  # fmt: skip


@dataclass
class ClassifierTrainConfig:
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0
    device: str = "cpu"


@torch.no_grad()
def accuracy(model: ShapesClassifier, n: int = 512, split: str = "heldout", seed: int = 12345) -> dict[str, float]:
    """Head accuracies on freshly rendered videos (held-out compositions by default)."""
    scenes = domain.sample_scenes(n, split, seed=seed)
    logits, tgt = model(domain.render(scenes, seed=seed)), targets(scenes)
    return {
        "colour": ((logits["colour"] > 0) == (tgt["colour"] > 0.5)).all(1).float().mean().item(),
        "shape": ((logits["shape"] > 0) == (tgt["shape"] > 0.5)).all(1).float().mean().item(),
        "motion": (logits["motion"].argmax(1) == tgt["motion"]).float().mean().item(),
        "count": (logits["count"].argmax(1) == tgt["count"]).float().mean().item(),
    }


def train_classifier(config: ClassifierTrainConfig, out: Path = CLASSIFIER_PATH, progress: bool = True) -> dict:
    """Train the classifier on rendered training-split videos and save it with its record."""
    # A plain loop, not `training.run`: a maintainer's one-off fit of minutes whose result ships as a file (no
    # resume, EMA or several processes to need), with torch's one-cycle schedule.
    torch.manual_seed(config.seed)
    model = ShapesClassifier().to(config.device)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, config.lr, total_steps=config.steps)
    start = time.time()
    bar = tqdm(range(config.steps), desc="classifier", disable=not progress)
    for step in bar:
        seed = config.seed * 1_000_003 + step
        scenes = domain.sample_scenes(config.batch_size, "train", seed=seed, device=config.device)
        loss = losses(model(domain.render(scenes, seed=seed)), targets(scenes))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval().cpu()
    record = {"config": asdict(config), "seconds": round(time.time() - start, 1),
              "heldout_accuracy": accuracy(model)}  # fmt: skip
    model.save(out, record)
    return record
