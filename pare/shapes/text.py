"""A small learned text encoder for the shapes vocabulary, yielding `encoder_hidden_states` in Wan's layout:
(B, L, text_dim), one row per token, rows past the prompt zeroed (as Wan's UMT5 embeddings are)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..components import PromptEncoder
from ..errors import PareError, require
from ..io import atomic_path
from . import domain

PAD, BOS, AND, A = "<pad>", "<bos>", "and", "a"
MOTION_WORDS = ("moving", "standing", "still", "bouncing", "circling")
VOCAB: tuple[str, ...] = (PAD, BOS, A, AND, *domain.COLOURS, *domain.SHAPES, *MOTION_WORDS, *domain.LINEAR, *domain.SPEEDS)
WORD_ID = {w: i for i, w in enumerate(VOCAB)}
TEXT_TOKENS = 16  # <bos> + the longest prompt (10 words), padded


def tokenize(prompts: list[str]) -> torch.Tensor:
    """(B, TEXT_TOKENS) token ids; the empty prompt is <bos> alone. Unknown words are refused."""
    ids = torch.full((len(prompts), TEXT_TOKENS), WORD_ID[PAD], dtype=torch.long)
    for i, prompt in enumerate(prompts):
        words = prompt.lower().split()
        unknown = [w for w in words if w not in WORD_ID or w in (PAD, BOS)]
        require(not unknown, f"word(s) {', '.join(map(repr, unknown))} are not in the shapes vocabulary "
                f"({' '.join(VOCAB[2:])})")  # fmt: skip
        require(len(words) < TEXT_TOKENS, f"prompt {prompt!r} is longer than {TEXT_TOKENS - 1} words")
        ids[i, : len(words) + 1] = torch.tensor([WORD_ID[BOS]] + [WORD_ID[w] for w in words])
    return ids


def _motion_table() -> tuple[torch.Tensor, torch.Tensor]:
    """(M, n_speeds, 3) token ids of each motion phrase, padded, and (M, n_speeds) their lengths."""
    ids = torch.full((len(domain.MOTIONS), len(domain.SPEEDS), 3), WORD_ID[PAD], dtype=torch.long)
    lengths = torch.zeros(len(domain.MOTIONS), len(domain.SPEEDS), dtype=torch.long)
    for m in range(len(domain.MOTIONS)):
        for s in range(len(domain.SPEEDS)):
            words = domain.motion_phrase(m, s).split()
            ids[m, s, : len(words)] = torch.tensor([WORD_ID[w] for w in words])
            lengths[m, s] = len(words)
    return ids, lengths


_MOTION_IDS, _MOTION_LENGTHS = _motion_table()


def tokenize_scenes(scenes: domain.Scenes) -> torch.Tensor:
    """(B, TEXT_TOKENS) token ids of the scenes' prompts, built on the scenes' device without leaving it
    (equal to `tokenize(scenes.prompts())`; no per-sample Python, no host synchronisation)."""
    dev = scenes.motion.device
    B = scenes.batch
    colour_id = torch.tensor([WORD_ID[c] for c in domain.COLOURS] + [WORD_ID[PAD]], device=dev)
    shape_id = torch.tensor([WORD_ID[s] for s in domain.SHAPES], device=dev)
    const = lambda w: torch.full((B,), WORD_ID[w], device=dev)  # noqa: E731
    motion = _MOTION_IDS.to(dev)[scenes.motion, scenes.speed]  # (B, 3)
    full = torch.stack([const(BOS), const(A), colour_id[scenes.colour[:, 0]], shape_id[scenes.shape[:, 0]],
                        const(AND), const(A), colour_id[scenes.colour[:, 1]], shape_id[scenes.shape[:, 1]],
                        *motion.unbind(1)], dim=1)  # fmt: skip  # (B, 11)
    keep = torch.ones_like(full, dtype=torch.bool)
    keep[:, 4:8] = (scenes.colour[:, 1] != domain.NO_OBJECT)[:, None]
    keep[:, 8:] = torch.arange(3, device=dev)[None] < _MOTION_LENGTHS.to(dev)[scenes.motion, scenes.speed][:, None]
    order = torch.argsort((~keep).int(), dim=1, stable=True)  # kept tokens first, in their order
    tokens = torch.where(torch.gather(keep, 1, order), torch.gather(full, 1, order), WORD_ID[PAD])
    pad = torch.full((B, TEXT_TOKENS - tokens.shape[1]), WORD_ID[PAD], device=dev)
    return torch.cat([tokens, pad], dim=1)


_OBJECT_WORDS = torch.tensor([WORD_ID[w] for w in (A, *domain.COLOURS, *domain.SHAPES)])


def object_membership(ids: torch.Tensor) -> torch.Tensor:
    """(B, L) index of the object phrase ("a red square") each token belongs to: 1 or 2, 0 for the other
    tokens (<bos>, "and", the motion words, padding)."""
    member = torch.isin(ids, _OBJECT_WORDS.to(ids.device))
    return torch.cumsum(ids == WORD_ID[A], dim=1) * member


class ShapesTextEncoder(nn.Module):
    """Token + position embeddings and a small pre-norm Transformer encoder; padded rows are zeroed.

    With `object_tokens`, every word of an object phrase also gets a learned map of its phrase's summed word
    embeddings (zero at initialisation, so an encoder trained without it loads unchanged): the colour word of
    "a red square and a blue circle" then carries "square" and not "circle". Trained without it, the encoder
    spreads both shapes over every token (a linear probe reads each object's shape from either colour token
    alike), and the transformer cannot tell which shape goes with which colour.
    """

    def __init__(self, text_dim: int = 64, layers: int = 2, heads: int = 4, object_tokens: bool = False):
        super().__init__()
        self.config = {"text_dim": text_dim, "layers": layers, "heads": heads, "object_tokens": object_tokens}
        self.tokens = nn.Embedding(len(VOCAB), text_dim)
        self.positions = nn.Parameter(torch.randn(TEXT_TOKENS, text_dim) * 0.02)
        layer = nn.TransformerEncoderLayer(text_dim, heads, 2 * text_dim, dropout=0.0, batch_first=True,
                                           norm_first=True)  # fmt: skip
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(text_dim)
        self.objects = nn.Linear(text_dim, text_dim, bias=False) if object_tokens else None
        if self.objects is not None:
            nn.init.zeros_(self.objects.weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, L) -> (B, L, text_dim)."""
        pad = ids == WORD_ID[PAD]  # (B, L)
        words = self.tokens(ids)
        h = self.norm(self.encoder(words + self.positions[: ids.shape[1]], src_key_padding_mask=pad))
        if self.objects is not None:
            phrase = nn.functional.one_hot(object_membership(ids), 3)[..., 1:].to(words.dtype)  # (B, L, 2)
            h = h + self.objects(phrase @ (phrase.transpose(1, 2) @ words))  # each token: its phrase's word sum
        return h.masked_fill(pad[..., None], 0.0)

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
            save_file(state, str(tmp), metadata={"config": json.dumps(self.config), "vocab": json.dumps(VOCAB)})

    @classmethod
    def load(cls, path: Path) -> ShapesTextEncoder:
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
            config, vocab = json.loads(meta["config"]), json.loads(meta["vocab"])
        except Exception as exc:  # missing file, damaged header, missing metadata
            raise PareError(f"cannot read the shapes text encoder {path}: {exc}") from None
        require(tuple(vocab) == VOCAB, f"{path} was trained on another vocabulary than this PARE's")
        model = cls(**config)
        model.load_state_dict(state)
        return model.eval()


def pad_text(embeds: torch.Tensor, tokens: int) -> torch.Tensor:
    """(B, L, D) -> (B, tokens, D) with zero rows after the L (as Wan's pipelines pad UMT5's output)."""
    return nn.functional.pad(embeds, (0, 0, 0, tokens - embeds.shape[1]))


class ShapesPromptEncoder(PromptEncoder):
    """`PromptEncoder` of the shapes domain, loaded lazily; its prompts and evaluator are the domain's."""

    def __init__(self, path: Path | None = None, model: ShapesTextEncoder | None = None, pad_to: int | None = None):
        """`pad_to`: zero rows appended up to that many tokens (an I2V model's cross-attention takes the tokens
        past the last 512 as image tokens, Wan2.1's text length)."""
        self.path, self._model = path, model
        self.text_tokens = pad_to or TEXT_TOKENS

    @property
    def model(self) -> ShapesTextEncoder:
        if self._model is None:
            self._model = ShapesTextEncoder.load(self.path)
        return self._model

    @torch.no_grad()
    def encode(self, prompts: list[str], device, dtype) -> torch.Tensor:
        model = self.model.to(device)
        return pad_text(model(tokenize(prompts).to(device)), self.text_tokens).to(dtype)

    def own_prompts(self, n: int, split: str = "train", seed: int = 0) -> list[str]:
        if split == "heldout":
            return domain.heldout_prompts(n, seed)
        return domain.sample_scenes(n, split, seed=seed).prompts()

    def domain_scores(self, videos, prompts: list[str]) -> dict:
        from .evaluate import evaluate_videos

        return evaluate_videos(videos, prompts)
