"""Memory per GPU of `pare distill` under FSDP for a Wan2.1 model pruned by given ratios.

    python scripts/distill_memory.py --model wan2.1-t2v-14b --heads 0.25 --ffn 0.25 --gpus 8

Builds the pruned structure on the meta device (no weights) and prints the estimate by component.
"""

from __future__ import annotations

import argparse

from pare import arch
from pare.distill.memory import fsdp_memory
from pare.loading import load_bundle
from pare.pruning.plan import WidthPlan
from pare.pruning.prune import prune


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="wan2.1-t2v-14b")
    p.add_argument("--heads", type=float, default=0.25)
    p.add_argument("--ffn", type=float, default=0.25)
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--samples-per-gpu", type=int, default=1)
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--align", action="store_true", help="teacher online for hidden-state alignment")
    a = p.parse_args()
    bundle = load_bundle(a.model, weights=False)
    teacher = bundle.transformer
    n, H, F = teacher.config.num_layers, teacher.config.num_attention_heads, teacher.config.ffn_dim
    keep_h, keep_f = round((1 - a.heads) * H), round((1 - a.ffn) * F)
    plan = WidthPlan([list(range(keep_h))] * n, [list(range(keep_h))] * n, [list(range(keep_f))] * n)
    student, report = prune(teacher, plan)  # slicing meta tensors: structure only
    grid = arch.token_grid(teacher.config, bundle.latent, a.frames, a.height, a.width)
    est = fsdp_memory(student, teacher if a.align else None, grid, a.gpus, a.samples_per_gpu)
    print(f"{a.model} pruned to {keep_h}/{H} heads, {keep_f}/{F} FFN channels: {report.params_after / 1e9:.2f}B "
          f"parameters (from {report.params_before / 1e9:.2f}B); {grid.tokens} tokens; {a.gpus} GPUs, "
          f"{a.samples_per_gpu} example(s) (cond + uncond) per GPU, gradient checkpointing")
    for name, gib in est.rows():
        print(f"  {name:<18} {gib:7.1f} GiB")


if __name__ == "__main__":
    main()
