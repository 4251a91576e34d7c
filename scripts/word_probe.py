"""Does a prompt attribute reach the video tokens? Linear probes on a shapes teacher's hidden states.

    python scripts/word_probe.py --model builtin:shapes-t2v --sigmas 1.0 0.9

For N training scenes with a linear motion, runs the model once on pure noise (x = s * noise) and keeps each
block's output averaged over the video tokens; a linear classifier (multinomial logistic regression, fitted on
three quarters of the scenes, scored on the rest) then tells how well the motion direction and the first
object's colour can be read from it, block by block. The same probe on the text side (the prompt encoder's
output and Wan's text projection, summed over tokens) is the reference: what the cross-attention could pass on.
Chance is 1/8 for the direction and 1/6 for the colour.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from pare.loading import load_bundle
from pare.shapes import domain


def probe_accuracy(X: torch.Tensor, y: torch.Tensor, steps: int = 300) -> float:
    """Held-out accuracy (percent) of a linear classifier of y from X, fitted on the first 3/4 of the rows.
    A dozen lines of torch rather than a new dependency on scikit-learn for one regression."""
    X = (X - X.mean(0)) / (X.std(0) + 1e-6)
    n = len(X) * 3 // 4
    W = torch.zeros(X.shape[1], int(y.max()) + 1, requires_grad=True)
    b = torch.zeros(int(y.max()) + 1, requires_grad=True)
    opt = torch.optim.Adam([W, b], 0.05)
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.cross_entropy(X[:n] @ W + b, y[:n]) + 1e-3 * W.pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return 100 * float(((X[n:] @ W + b).argmax(1) == y[n:]).float().mean())


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="builtin:shapes-t2v")
    ap.add_argument("--sigmas", type=float, nargs="+", default=[1.0, 0.9])
    ap.add_argument("--scenes", type=int, default=384)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    bundle = load_bundle(args.model)
    model = bundle.transformer.eval()
    scenes = domain.sample_scenes(4 * args.scenes, "train", seed=args.seed + 5)
    scenes = scenes[(scenes.motion < domain.N_LINEAR).nonzero().flatten()[: args.scenes]]
    N = scenes.batch
    targets = {"direction": scenes.motion, "colour": scenes.colour[:, 0]}
    text = bundle.prompt_encoder.encode(scenes.prompts(), "cpu", torch.float32)
    projected = model.condition_embedder.text_embedder(text)
    print(f"{args.model}: {N} scenes with a linear motion; linear-probe accuracy (%) on a held-out quarter")
    for name, X in (("text encoder output", text.sum(1)), ("Wan's text projection", projected.sum(1))):
        print(f"  {name:>28}: " + ", ".join(f"{k} {probe_accuracy(X, y):.0f}" for k, y in targets.items()))
    pooled = {}
    hooks = [block.register_forward_hook(lambda mod, inp, out, i=i: pooled.__setitem__(i, out.mean(1)))
             for i, block in enumerate(model.blocks)]  # fmt: skip
    C = model.config.in_channels
    shape = bundle.latent.latent_shape(*bundle.default_shape)
    g = torch.Generator().manual_seed(args.seed)
    for s in args.sigmas:
        model(s * torch.randn(N, C, *shape, generator=g), torch.full((N,), 1000.0 * s), text, return_dict=False)
        for k, y in targets.items():
            accs = [probe_accuracy(pooled[i], y) for i in range(len(model.blocks))]
            print(f"  s = {s:.2f}, video tokens, {k:>9} by block: " + " ".join(f"{a:3.0f}" for a in accs))
    for h in hooks:
        h.remove()


if __name__ == "__main__":
    main()
