"""Stage 2: a timestep- and content-conditioned block router trained jointly with the distilled student.

Loss: the stage-1 velocity loss through the routed model, plus `compute_weight` x (executed share of block
FLOPs - budget)^2, the executed share taken from the straight-through gates (so the forward counts exactly
what would run and the gradient flows through the soft gates). Router and student have their own learning
rates; the Gumbel-sigmoid temperature anneals from 1 to `final_temperature`. Variants for comparison at the
same budget: `timestep` (the router sees the timestep only) and `static` (the same blocks for every input,
chosen by their removal error, with the student trained through that fixed route).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .. import arch
from ..errors import require
from ..flops import count_flops
from ..training import LoopConfig, run, split_data
from .model import RoutedWanTransformer3DModel, routable_flops_share, topk_for_budget

VARIANTS = ("content", "timestep", "static")


@dataclass
class RouteConfig(LoopConfig):
    """Knobs of `pare route` (and those of every training loop)."""

    budget: float = 0.6  # share of block FLOPs executed
    variant: str = "content"
    mode: str = "topk"  # inference decisions of the trained model: topk (exact budget) or threshold
    always_run: int = 1
    router_hidden: int = 32
    router_lr: float = 1e-3
    student_lr: float = 5e-5
    compute_weight: float = 10.0
    final_temperature: float = 0.2

    def validate(self) -> None:
        super().validate()
        require(0 < self.budget <= 1, f"--budget must be in (0, 1], got {self.budget}")
        require(self.variant in VARIANTS, f"--router must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        require(self.mode in ("topk", "threshold"), f"--mode must be topk or threshold, got {self.mode!r}")
        require(self.always_run >= 1, "--always-run must be at least 1 (the router reads the first block's output)")
        require(self.router_lr > 0 and self.student_lr >= 0, "--router-lr must be positive and --student-lr >= 0")
        require(self.compute_weight >= 0, f"--compute-weight must be >= 0, got {self.compute_weight}")


def build_routed(student, config: RouteConfig, grid, text_tokens: int, static_route=None) -> RoutedWanTransformer3DModel:
    """The routed model: the student's structure and weights plus a fresh router."""
    cfg = {k: v for k, v in student.config.items() if not k.startswith("_")}
    for key in ("self_heads", "cross_heads", "ffn_dims"):
        cfg.setdefault(key, None)
    report = count_flops(student, grid, text_tokens)
    require(config.always_run < len(arch.blocks(student)), "--always-run must leave at least one block to route")
    fixed, _ = routable_flops_share(report, config.always_run)
    require(config.budget > fixed, f"--budget {config.budget} is below the always-run blocks' share ({fixed:.3f})")
    k = topk_for_budget(report, config.always_run, config.budget)
    mode = "static" if config.variant == "static" else config.mode
    routed = RoutedWanTransformer3DModel(**cfg, always_run=config.always_run, router_hidden=config.router_hidden,
                                         router_content=config.variant == "content", route_mode=mode, topk=k,
                                         static_route=static_route)  # fmt: skip
    missing = routed.load_state_dict(student.state_dict(), strict=False)
    require(all(key.startswith("router.") for key in missing.missing_keys) and not missing.unexpected_keys,
            "the student's weights do not fit the routed model")  # fmt: skip
    routed.block_shares = [b.total for b in report.blocks]  # FLOPs per block, for the compute loss
    return routed


@torch.no_grad()
def block_removal_error(model, data, rows: list[int], device) -> list[float]:
    """Relative output error when each block alone is skipped (the importance behind static removal)."""
    from ..distill import pair_inputs

    items = [data[j] for j in rows]
    batch = {k: torch.stack([it[k] for it in items]).to(device) for k in items[0]}
    inputs, _ = pair_inputs(batch)
    full = model(**inputs)[0].float()
    errors = []
    for i, block in enumerate(arch.blocks(model)):
        handle = block.register_forward_hook(lambda m, a, o: a[0])  # the block passes its input through
        errors.append((((model(**inputs)[0].float() - full) ** 2).sum() / (full**2).sum()).item())
        handle.remove()
    return errors


def static_route_for_budget(errors: list[float], shares: list[float], always_run: int, budget: float) -> list[int]:
    """The most important routable blocks whose FLOPs fit the budget (always-run blocks counted first)."""
    total = sum(shares)
    spent = sum(shares[:always_run])
    keep = []
    for i in sorted(range(always_run, len(errors)), key=lambda i: -errors[i]):
        if (spent + shares[i]) / total <= budget + 1e-9:
            keep.append(i)
            spent += shares[i]
    return sorted(keep)


class RouteStage:
    """Stage 2: router and student trained jointly."""

    name = "route"

    def __init__(self, config: RouteConfig, base: str):
        self.config, self.base = config, base
        # a static route skips the same blocks every time and never consults the router
        self.unused_parameters = config.variant == "static"

    def prepare(self, accelerator) -> None:
        pass

    def param_groups(self, model) -> list[dict]:
        router = [p for n, p in model.named_parameters() if n.startswith("router.")]
        student = [p for n, p in model.named_parameters() if not n.startswith("router.")]
        groups = [{"params": student, "lr": self.config.student_lr, "weight_decay": 0.0}]
        if self.config.variant == "static":
            for p in router:
                p.requires_grad_(False)
        else:
            groups.insert(0, {"params": router, "lr": self.config.router_lr, "weight_decay": 0.0})
        return groups

    def loss(self, model, batch, step):
        from ..distill import velocity_loss

        core = getattr(model, "module", model)
        progress = step / max(1, self.config.steps - 1)
        core.temperature = self.config.final_temperature ** progress  # 1 -> final, geometrically
        loss, parts = velocity_loss(model, batch)
        if core.last_gates is not None and core.config.route_mode != "static":
            shares = torch.tensor(core.block_shares, device=loss.device, dtype=torch.float32)
            always = core.config.always_run
            executed = (shares[:always].sum() + core.last_gates.float() @ shares[always:]) / shares.sum()  # (2B,)
            compute = ((executed.mean() - self.config.budget) ** 2)
            parts["executed"] = executed.mean().detach()
            loss = loss + self.config.compute_weight * compute
        return loss, parts

    @torch.no_grad()
    def validate(self, model, data, rows, device) -> dict:
        from ..distill import relative_error

        core = getattr(model, "module", model)
        was_training = core.training
        core.eval()
        executed, routes = [], set()

        def keep_route(m, a, o):
            shares = torch.tensor(core.block_shares, dtype=torch.float32)
            r = core.last_route.cpu()
            executed.append((r.float() @ shares / shares.sum()).mean().item())
            routes.update(tuple(x) for x in r.int().tolist())

        handle = core.register_forward_hook(keep_route)
        error = relative_error(model, data, rows, device)
        handle.remove()
        core.train(was_training)
        return {"error": error, "executed": sum(executed) / len(executed), "distinct_routes": len(routes)}

    def export(self, folder, model, weights, record) -> None:
        from ..distill import export_model

        export_model(folder, model, weights, self.base, "routed", record)


def route(teacher_spec: str, student_dir: Path, data_dir: Path, out: Path, config: RouteConfig, command: str = "",
          progress: bool = True) -> dict:  # fmt: skip
    """Run (or resume) stage 2; returns the final record."""
    from ..distill import student_base
    from ..distill.data import read_index
    from ..loading import load_bundle

    config.validate()
    index = read_index(data_dir)
    student_bundle = load_bundle(str(student_dir))
    student = student_bundle.transformer
    require(not isinstance(student, RoutedWanTransformer3DModel),
            f"{student_dir} is already routed: pass the distilled (or pruned) student it was made from")  # fmt: skip
    grid = arch.token_grid(student.config, student_bundle.latent, *index["shape"])
    train, val = split_data(data_dir)
    static = None
    if config.variant == "static":
        rows = list(range(0, len(val), max(1, len(val) // 32)))[:32]  # spread over steps (shards are step-major)
        errors = block_removal_error(student, val, rows, "cpu")
        shares = [b.total for b in count_flops(student, grid, student_bundle.text_tokens).blocks]
        static = static_route_for_budget(errors, shares, config.always_run, config.budget)
    routed = build_routed(student, config, grid, student_bundle.text_tokens, static)
    record = {"teacher": teacher_spec, "student": str(Path(student_dir).resolve()), "data": str(Path(data_dir).resolve()),
              "command": command, "static_route": static, "topk": routed.config.topk}  # fmt: skip
    return run(RouteStage(config, student_base(student_bundle)), routed, train, val, out, config, record, progress)
