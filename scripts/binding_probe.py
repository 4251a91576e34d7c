"""Which object's attributes does each word of a two-object prompt carry? Linear probes on a teacher's text tokens.

    python scripts/binding_probe.py --model builtin:shapes-t2v

For two-object training prompts ("a C1 S1 and a C2 S2 moving ..."), reads the prompt encoder's output (and Wan's
text projection of it, what cross-attention reads) at each object's colour and shape word, and fits a linear
classifier (`word_probe.probe_accuracy`: fitted on three quarters, scored on the rest) of each object's shape and
colour. A colour token that reads its own object's shape far better than the other's (or a shape token its own
colour) binds the two; equal accuracies mean no token says which shape goes with which colour. Chance: 1/3 for
a shape, 1/6 for a colour.
"""

from __future__ import annotations

import argparse

import torch

from pare.loading import load_bundle
from pare.shapes import domain
from word_probe import probe_accuracy

WORDS = {"colour word of object 1": 2, "shape word of object 1": 3, "colour word of object 2": 6,
         "shape word of object 2": 7}  # fmt: skip  # token positions: <bos> a C1 S1 and a C2 S2 ...


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="builtin:shapes-t2v")
    ap.add_argument("--scenes", type=int, default=6000, help="training scenes drawn (about half have two objects)")
    ap.add_argument("--seed", type=int, default=11)
    args = ap.parse_args()

    bundle = load_bundle(args.model)
    scenes = domain.sample_scenes(args.scenes, "train", seed=args.seed)
    scenes = scenes[(scenes.count == 2).nonzero().flatten()]
    text = bundle.prompt_encoder.encode(scenes.prompts(), "cpu", torch.float32)
    projected = bundle.transformer.condition_embedder.text_embedder(text)
    print(f"{args.model}: {scenes.batch} two-object prompts; linear-probe accuracy (%) on a held-out quarter")
    targets = {f"{attr} of object {k + 1}": values[:, k] for attr, values in (("shape", scenes.shape),
                                                                             ("colour", scenes.colour)) for k in (0, 1)}
    print(f"{'token read':<44} " + " ".join(f"{t:>18}" for t in targets))
    for side, H in (("", text), ("Wan's text projection, ", projected)):
        for name, pos in WORDS.items():
            acc = [probe_accuracy(H[:, pos], y) for y in targets.values()]
            print(f"{side + name:<44} " + " ".join(f"{a:>17.1f}%" for a in acc))


if __name__ == "__main__":
    main()
