"""Procedural videos of one or two coloured shapes moving as a short English prompt says.

Everything is drawn from a scene table of integer codes (objects, motion, speed) plus continuous nuisance
parameters (sizes, positions, background), rendered in torch, batched, on whatever device the tensors live on,
so rendering runs on the training device at the speed of training. The same seed gives the same videos.

A prompt's *composition* is its set of (colour, shape) objects and its motion; a fixed, hash-chosen share of
compositions is held out: training never renders them, and the evaluation prompts come only from them.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..errors import PareError

FRAMES, HEIGHT, WIDTH = 8, 32, 32  # 8 frames of 32x32: the smallest size at which every motion reads clearly

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.16, 0.16),
    "green": (0.16, 0.80, 0.24),
    "blue": (0.20, 0.36, 0.96),
    "yellow": (0.95, 0.87, 0.16),
    "purple": (0.68, 0.24, 0.88),
    "white": (0.95, 0.95, 0.95),
}
SHAPES = ("circle", "square", "triangle")
# Motion phrases. Linear motions are unit directions in image coordinates (x right, y down).
LINEAR = {
    "left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1),
    "up-left": (-1, -1), "up-right": (1, -1), "down-left": (-1, 1), "down-right": (1, 1),
}  # fmt: skip
MOTIONS = (*LINEAR, "still", "bouncing", "circling")
OPPOSITE = {a: b for a, va in LINEAR.items() for b, vb in LINEAR.items() if vb == (-va[0], -va[1])}  # "left": "right"
SPEEDS = {"slowly": 1.2, "quickly": 2.4}  # pixels per frame along the motion (linear motions only)

STILL, BOUNCING, CIRCLING = (MOTIONS.index(m) for m in ("still", "bouncing", "circling"))
N_LINEAR = len(LINEAR)
NO_OBJECT = len(COLOURS)  # colour code of an absent second object

HELDOUT_PERCENT = 12  # share of compositions never seen in training
TRAIN_REJECTION_ROUNDS = 24
HALF_SIZE = (3.5, 5.0)  # range of an object's half-size in pixels
MIN_HALF_SIZE = 2.5
TRIANGLE_SCALE = 1.3  # an equilateral triangle of half-side r looks smaller than a circle of radius r
BACKGROUND_MAX = 0.22  # backgrounds stay dark so every palette colour stands out
TEXTURE_AMPLITUDE = 0.05


@dataclass
class Scenes:
    """A batch of scene descriptions; every field has the batch as its first dimension."""

    colour: torch.Tensor  # (B, 2) long; second column NO_OBJECT for one-object scenes
    shape: torch.Tensor  # (B, 2) long
    motion: torch.Tensor  # (B,) long, index into MOTIONS
    speed: torch.Tensor  # (B,) long, index into SPEEDS (ignored unless the motion is linear)

    @property
    def batch(self) -> int:
        return self.motion.shape[0]

    @property
    def count(self) -> torch.Tensor:
        return 1 + (self.colour[:, 1] != NO_OBJECT).long()

    def prompts(self) -> list[str]:
        return [scene_prompt(*row) for row in zip(self.colour.tolist(), self.shape.tolist(),
                                                   self.motion.tolist(), self.speed.tolist())]  # fmt: skip

    def to(self, device) -> Scenes:
        return Scenes(*(t.to(device) for t in (self.colour, self.shape, self.motion, self.speed)))

    def __getitem__(self, idx) -> Scenes:
        return Scenes(self.colour[idx], self.shape[idx], self.motion[idx], self.speed[idx])


def _object_phrase(colour: int, shape: int) -> str:
    return f"a {list(COLOURS)[colour]} {SHAPES[shape]}"


def motion_phrase(motion: int, speed: int) -> str:
    name = MOTIONS[motion]
    if motion < N_LINEAR:
        return f"moving {name} {list(SPEEDS)[speed]}"
    return {"still": "standing still"}.get(name, name)


def scene_prompt(colours, shapes, motion: int, speed: int) -> str:
    objects = [_object_phrase(c, s) for c, s in zip(colours, shapes) if c != NO_OBJECT]
    return f"{' and '.join(objects)} {motion_phrase(motion, speed)}"


def parse_prompt(prompt: str) -> Scenes:
    """The scene codes of a prompt this domain generates (inverse of `scene_prompt`); a one-row `Scenes`."""
    words = prompt.strip().split()
    colours, shapes, i = [], [], 0
    try:
        while i + 2 < len(words) and words[i] == "a" and words[i + 1] in COLOURS and words[i + 2] in SHAPES:
            colours.append(list(COLOURS).index(words[i + 1]))
            shapes.append(SHAPES.index(words[i + 2]))
            i += 3
            if i < len(words) and words[i] == "and":
                i += 1
        rest = words[i:]
        speed = 0
        if rest == ["standing", "still"]:
            motion = STILL
        elif rest in (["bouncing"], ["circling"]):
            motion = MOTIONS.index(rest[0])
        elif len(rest) == 3 and rest[0] == "moving" and rest[1] in LINEAR and rest[2] in SPEEDS:
            motion, speed = MOTIONS.index(rest[1]), list(SPEEDS).index(rest[2])
        else:
            raise ValueError
        if not 1 <= len(colours) <= 2 or len(set(colours)) != len(colours):
            raise ValueError
    except ValueError:
        raise PareError(f"{prompt!r} is not a prompt of the shapes domain (e.g. 'a red circle moving right slowly')") from None
    colours += [NO_OBJECT] * (2 - len(colours))
    shapes += [0] * (2 - len(shapes))
    return Scenes(torch.tensor([colours]), torch.tensor([shapes]), torch.tensor([motion]), torch.tensor([speed]))


def parse_prompts(prompts: list[str]) -> Scenes:
    rows = [parse_prompt(p) for p in prompts]
    return Scenes(*(torch.cat([getattr(r, f) for r in rows]) for f in ("colour", "shape", "motion", "speed")))


# --- the held-out split --------------------------------------------------------------------------------------


def composition_key(colours, shapes, motion: int) -> str:
    objects = sorted(f"{list(COLOURS)[c]} {SHAPES[s]}" for c, s in zip(colours, shapes) if c != NO_OBJECT)
    return " & ".join(objects) + f" | {MOTIONS[motion]}"


@lru_cache(maxsize=1)
def heldout_table() -> torch.Tensor:
    """(C+1, S, C+1, S, M) bool: True where the composition (object 1, object 2, motion) is held out.

    Symmetric in the two objects. Chosen by a CRC32 of the composition's text, so the split is fixed forever
    and independent of any seed or device.
    """
    C, S, M = len(COLOURS), len(SHAPES), len(MOTIONS)
    table = torch.zeros(C + 1, S, C + 1, S, M, dtype=torch.bool)
    for c1 in range(C):
        for s1 in range(S):
            for c2 in range(C + 1):
                for s2 in range(S):
                    for m in range(M):
                        key = composition_key([c1, c2], [s1, s2], m)
                        table[c1, s1, c2, s2, m] = zlib.crc32(key.encode()) % 100 < HELDOUT_PERCENT
    return table


def is_heldout(scenes: Scenes) -> torch.Tensor:
    """(B,) bool: which scenes have a held-out composition."""
    table = heldout_table().to(scenes.motion.device)
    return table[scenes.colour[:, 0], scenes.shape[:, 0], scenes.colour[:, 1], scenes.shape[:, 1], scenes.motion]


def _draw(n: int, generator: torch.Generator, device, two_objects: float = 0.5, circling: float | None = None) -> Scenes:
    C, S = len(COLOURS), len(SHAPES)
    r = lambda high, *shape: torch.randint(high, shape, generator=generator, device=device)  # noqa: E731
    c1 = r(C, n)
    c2 = (c1 + 1 + r(C - 1, n)) % C  # a second colour always differs from the first
    two = torch.rand(n, generator=generator, device=device) < two_objects
    c2 = torch.where(two, c2, torch.full_like(c2, NO_OBJECT))
    shape = r(S, n, 2)
    shape[:, 1] = torch.where(two, shape[:, 1], torch.zeros_like(shape[:, 1]))
    if circling is None:  # every motion alike
        motion = r(len(MOTIONS), n)
    else:  # circling with probability `circling`, else one of the other motions alike
        other = r(len(MOTIONS) - 1, n)
        other = other + (other >= CIRCLING).long()
        motion = torch.where(torch.rand(n, generator=generator, device=device) < circling, CIRCLING, other)
    return Scenes(torch.stack([c1, c2], 1), shape, motion, r(len(SPEEDS), n))


def sample_scenes(n: int, split: str = "train", seed: int = 0, device="cpu", two_objects: float = 0.5,
                  circling: float | None = None) -> Scenes:
    """`n` random scenes whose compositions lie in `split` ("train" or "heldout"); `two_objects` is the share of
    scenes drawn with two objects, `circling` the share that circle (None: 1 in 11, as every motion), both before
    the split's rejection, which keeps them for training draws."""
    if split not in ("train", "heldout"):
        raise PareError(f"split must be 'train' or 'heldout', got {split!r}")
    g = torch.Generator(device=device).manual_seed(seed)
    want_heldout = split == "heldout"
    scenes = _draw(n, g, device, two_objects, circling)
    # Rejection: redraw the rows on the wrong side of the split. For training a fixed number of rounds keeps
    # the GPU free of host synchronisation (a row is still held out after 24 rounds with probability 0.12^24,
    # below 1e-21); held-out draws (evaluation only, rejection rate 88%) loop until done.
    rounds = 0
    while True:
        bad = is_heldout(scenes) != want_heldout
        if (not want_heldout and rounds == TRAIN_REJECTION_ROUNDS) or (want_heldout and not bad.any()):
            break
        fresh = _draw(n, g, device, two_objects, circling)
        scenes = Scenes(*(torch.where(bad.view(-1, *[1] * (a.ndim - 1)), b, a) for a, b in
                          zip((scenes.colour, scenes.shape, scenes.motion, scenes.speed),
                              (fresh.colour, fresh.shape, fresh.motion, fresh.speed))))  # fmt: skip
        rounds += 1
    return scenes


@lru_cache(maxsize=1)
def heldout_prompt_count() -> int:
    """How many distinct prompts the held-out split has: each held-out composition in either object order, times
    the speeds of a linear motion (the other motions' prompts name no speed)."""
    table = heldout_table()
    total = 0
    for c1, s1, c2, s2, m in table.nonzero().tolist():
        if c2 == c1 or (c2 == NO_OBJECT and s2 != 0):  # rows no prompt can have (the table fills them anyway)
            continue
        total += len(SPEEDS) if m < N_LINEAR else 1
    return total


def heldout_prompts(n: int = 64, seed: int = 0) -> list[str]:
    """`n` distinct held-out prompts, the same for every caller with the same seed (the evaluation set)."""
    if n > heldout_prompt_count():
        raise PareError(f"asked for {n} held-out prompts; the held-out split has {heldout_prompt_count()} distinct ones")
    prompts: list[str] = []
    s = seed
    while len(prompts) < n:
        for p in sample_scenes(4 * n, "heldout", seed=s).prompts():
            if p not in prompts:
                prompts.append(p)
        s += 1
    return prompts[:n]


def linear_heldout_prompts(n: int = 16, seed: int = 0) -> list[str]:
    """`n` held-out prompts with a linear motion ("... moving left slowly"), for the motion diagnostics."""
    return [p for p in heldout_prompts(8 * n, seed) if " moving " in p][:n]


def flip_direction(prompt: str) -> str:
    """The prompt with its direction reversed ("left" <-> "right", "up-left" <-> "down-right")."""
    return " ".join(OPPOSITE.get(w, w) for w in prompt.split())


# --- rendering -----------------------------------------------------------------------------------------------


def _trajectories(scenes: Scenes, half: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """(B, 2, F, 2) object centres (x, y) in pixels for every frame, inside the frame for the whole video."""
    B, dev = scenes.batch, scenes.motion.device
    t = torch.arange(FRAMES, device=dev, dtype=torch.float32)  # (F,)
    u = lambda *shape: torch.rand(*shape, generator=g, device=dev)  # noqa: E731
    margin = half.max(dim=1).values + 1.0  # (B,) keep every object whole

    motion = scenes.motion
    linear = motion < N_LINEAR
    dirs = torch.tensor(list(LINEAR.values()) + [(0, 0)] * 3, device=dev, dtype=torch.float32)[motion]  # (B, 2)
    dirs = dirs / dirs.norm(dim=1, keepdim=True).clamp_min(1)
    speed = torch.tensor(list(SPEEDS.values()), device=dev)[scenes.speed] * linear  # (B,)
    travel = dirs * speed[:, None] * (FRAMES - 1)  # (B, 2) displacement from first to last frame

    # Bouncing: up and down in place, one bounce per video; circling: one turn per video, either way round.
    bounce_h = 5 + 5 * u(B)
    circle_r = 3.5 + 3 * u(B)
    phase = 2 * math.pi * u(B)
    spin = torch.where(u(B) < 0.5, -1.0, 1.0)
    offset = torch.zeros(B, FRAMES, 2, device=dev)  # (B, F, 2) path relative to the anchor
    offset += (travel[:, None, :] * t[None, :, None] / (FRAMES - 1)) * linear[:, None, None]
    bounce = -(bounce_h[:, None] * torch.sin(math.pi * t[None] / FRAMES).abs())  # (B, F)
    offset[..., 1] += bounce * (motion == BOUNCING)[:, None]
    ang = phase[:, None] + spin[:, None] * 2 * math.pi * t[None] / FRAMES  # (B, F)
    circ = torch.stack([torch.cos(ang), torch.sin(ang)], -1) * circle_r[:, None, None]
    offset += circ * (motion == CIRCLING)[:, None, None]

    # Anchor of object 1: uniform over the positions that keep its whole path inside the frame.
    lo = margin[:, None] - offset.min(dim=1).values  # (B, 2)
    hi = torch.tensor([WIDTH, HEIGHT], device=dev) - margin[:, None] - offset.max(dim=1).values
    hi = torch.maximum(hi, lo)
    anchor1 = lo + (hi - lo) * u(B, 2)
    # Object 2 follows the same path (same phase) at a constant offset: its anchor is the candidate farthest
    # from object 1 among the box's corners and a few uniform draws; the caller shrinks both objects where
    # even that is too close for them not to touch.
    corners = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]], device=dev).expand(B, 4, 2)
    cands = lo[:, None] + (hi - lo)[:, None] * torch.cat([corners, u(B, 8, 2)], dim=1)  # (B, 12, 2)
    best = (cands - anchor1[:, None]).norm(dim=-1).argmax(dim=1)
    anchor2 = cands[torch.arange(B, device=dev), best]
    return torch.stack([anchor1, anchor2], 1)[:, :, None, :] + offset[:, None]  # (B, 2, F, 2)


def sdf(shape: torch.Tensor, p: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed distance (pixels, negative inside) of points p (..., 2) to a shape of half-size r, per shape code."""
    x, y = p[..., 0], p[..., 1]
    circle = torch.sqrt(x * x + y * y) - r
    square = torch.maximum(x.abs(), y.abs()) - r
    # Equilateral triangle pointing up (Quilez's exact SDF, with image y flipped so that "up" is up).
    rt = r * TRIANGLE_SCALE
    k = math.sqrt(3.0)
    qx, qy = x.abs() - rt, -y + rt / k
    fold = qx + k * qy > 0
    qx, qy = torch.where(fold, (qx - k * qy) / 2, qx), torch.where(fold, (-k * qx - qy) / 2, qy)
    qx = qx - torch.clamp(qx, -2 * rt, torch.zeros_like(rt))
    triangle = -torch.sqrt(qx * qx + qy * qy) * torch.sign(qy)
    return torch.where(shape == 0, circle, torch.where(shape == 1, square, triangle))


def render(scenes: Scenes, seed: int = 0) -> torch.Tensor:
    """(B, 3, F, H, W) videos in [-1, 1] of `scenes`, on their device. Nuisance parameters (size, position,
    bounce height, circle radius, background) come from `seed`."""
    B, dev = scenes.batch, scenes.motion.device
    g = torch.Generator(device=dev).manual_seed(seed)
    u = lambda *shape: torch.rand(*shape, generator=g, device=dev)  # noqa: E731
    half = HALF_SIZE[0] + (HALF_SIZE[1] - HALF_SIZE[0]) * u(B, 2)  # (B, 2)
    centres = _trajectories(scenes, half, g)  # (B, 2, F, 2)
    # Two objects never touch: where their anchors are too close, both shrink (down to MIN_HALF_SIZE).
    gap = (centres[:, 0, 0] - centres[:, 1, 0]).norm(dim=-1)  # (B,) constant over frames
    cap = ((gap - 1.5) / (half.sum(dim=1) * TRIANGLE_SCALE)).clamp(max=1.0)  # (B,)
    cap = torch.where(scenes.colour[:, 1] == NO_OBJECT, torch.ones_like(cap), cap)
    half = torch.maximum(half * cap[:, None], torch.full_like(half, MIN_HALF_SIZE))

    # Background: a dark colour, plain, striped or checkered (static; not named in the prompt).
    ys, xs = torch.meshgrid(torch.arange(HEIGHT, device=dev), torch.arange(WIDTH, device=dev), indexing="ij")
    base = BACKGROUND_MAX * u(B, 3)  # (B, 3)
    kind = (u(B) * 3).long()  # 0 plain, 1 stripes, 2 checker
    period = 4 + (u(B) * 5).long()
    vertical = u(B) < 0.5
    coord = torch.where(vertical[:, None, None], xs[None], ys[None])  # (B, H, W)
    stripes = ((coord // period[:, None, None]) % 2).float()
    checker = (((xs[None] // period[:, None, None]) + (ys[None] // period[:, None, None])) % 2).float()
    texture = torch.where(kind[:, None, None] == 1, stripes, torch.where(kind[:, None, None] == 2, checker, 0.0))
    video = (base[:, :, None, None] + TEXTURE_AMPLITUDE * texture[:, None]).clamp(0, 1)  # (B, 3, H, W)
    video = video[:, :, None].expand(B, 3, FRAMES, HEIGHT, WIDTH).clone()

    palette = torch.tensor(list(COLOURS.values()) + [(0.0, 0.0, 0.0)], device=dev)  # (C+1, 3)
    pix = torch.stack([xs, ys], -1).float() + 0.5  # (H, W, 2) pixel centres
    for k in range(2):
        present = scenes.colour[:, k] != NO_OBJECT  # (B,)
        rel = pix[None, None] - centres[:, k, :, None, None, :]  # (B, F, H, W, 2)
        r = half[:, k].view(B, 1, 1, 1)
        d = sdf(scenes.shape[:, k].view(B, 1, 1, 1), rel, r)  # (B, F, H, W)
        alpha = (0.5 - d).clamp(0, 1) * present.view(B, 1, 1, 1)  # one-pixel anti-aliased edge
        colour = palette[scenes.colour[:, k]].view(B, 3, 1, 1, 1)
        video = video * (1 - alpha[:, None]) + colour * alpha[:, None]
    return video * 2 - 1
