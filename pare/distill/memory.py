"""Memory per GPU of stage-1 distillation under FSDP (full sharding, bf16 compute, fp32 master weights)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from .. import arch
from ..arch import TokenGrid

BF16, FP32 = 2, 4


@dataclass
class MemoryEstimate:
    """Bytes per GPU, by what holds them."""

    student_weights: int  # fp32 master weights, sharded
    gradients: int  # fp32, sharded
    optimizer: int  # AdamW's two fp32 moments, sharded
    gathered_blocks: int  # bf16 copies of the block being computed and the one prefetched, unsharded
    teacher_weights: int  # bf16, sharded; only when the teacher runs online (hidden-state alignment)
    activations: int  # block inputs kept by gradient checkpointing + one block's recompute working set

    @property
    def total(self) -> int:
        return sum(asdict(self).values())

    def rows(self) -> list[tuple[str, float]]:
        return [(k.replace("_", " "), v / 2**30) for k, v in asdict(self).items()] + [("total", self.total / 2**30)]


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def fsdp_memory(student: nn.Module, teacher: nn.Module | None, grid: TokenGrid, gpus: int, samples_per_gpu: int,
                checkpointing: bool = True) -> MemoryEstimate:  # fmt: skip
    """Estimate for `samples_per_gpu` examples per GPU; each example is a cond + uncond pair (2 sequences)."""
    P = _params(student)
    blocks = arch.blocks(student)
    biggest = max(_params(b) for b in blocks)
    S, D = grid.tokens, student.config.num_attention_heads * student.config.attention_head_dim
    seqs = 2 * samples_per_gpu
    # Per block, the recompute of one block keeps its q, k, v, attention output (self and cross), the FFN's
    # hidden layer before and after the GELU, and their gradients: about 2 x (6 S D + 2 S F) bf16 values.
    ffn = max(arch.ffn_width(b) for b in blocks)
    working = 2 * (6 * S * D + 2 * S * ffn) * BF16 * seqs
    kept = (len(blocks) if checkpointing else len(blocks) * 8) * S * D * BF16 * seqs
    teacher_bytes = 0 if teacher is None else _params(teacher) * BF16 // gpus + 2 * max(_params(b) for b in arch.blocks(teacher)) * BF16
    return MemoryEstimate(P * FP32 // gpus, P * FP32 // gpus, 2 * P * FP32 // gpus, 2 * biggest * BF16, teacher_bytes,
                          kept + working)  # fmt: skip
