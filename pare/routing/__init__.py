"""Stage 2: a timestep- and content-conditioned block router trained jointly with the distilled student.

Loss: the stage-1 velocity loss through the routed model (straight-through Gumbel-sigmoid gates whose hard
decision is the inference rule on the noisy logits: in `topk` mode the budget is filled in their order, so
training runs routes that fit the budget), plus, in `threshold` mode only, `compute_weight` x (executed share
of block FLOPs - budget)^2 from the same gates, plus `importance_weight` x a binary cross-entropy that teaches
the router, per example, which blocks matter most there.

That last term is what makes routes depend on the input. The velocity loss alone gives the router no reason
to differ between inputs: with straight-through gates it settles on one ranking of the blocks (on the embedded
default, one route for every input and step). So before training, every training example (cond and uncond
branch) gets its own block importance: the relative output error of the student when that block alone is
skipped (`block_importance`); the router's target is the most important blocks that fit the budget, by the
same rule its `topk` decisions follow (`fill_budget`). Importance differs between timesteps and, at one
timestep, between prompts and noises; the router learns to predict it from what it sees. The cross-entropy on
the chosen blocks alone proved too weak a signal: on the embedded teacher's quick-preset student the router
still took one route for every input. So joint training starts from a supervised warm start (`warm_start`):
the router alone, on its own inputs computed once per example, regresses each example's ranking of the blocks
(standardised log importance), which is what its `topk` decisions read. Router and student have their own
learning rates; the Gumbel-sigmoid temperature anneals from 1 to `final_temperature`. Variants for comparison at
the same budget: `timestep` (the router sees the timestep only, same targets) and `static` (the same blocks for
every input: those with the largest mean importance over the training examples that fit the budget, with the
student trained through that fixed route).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import arch
from ..errors import require
from ..flops import count_flops
from ..training import LoopConfig, resume_state, run, split_data
from .model import BlockRouter, RoutedWanTransformer3DModel, fill_budget, routable_flops_share, topk_for_budget

VARIANTS = ("content", "timestep", "static")


@dataclass
class RouteConfig(LoopConfig):
    """Knobs of `pare route` (and those of every training loop)."""

    budget: float = 0.6  # share of block FLOPs executed
    router: str = "content"  # --router
    mode: str = "topk"  # inference decisions of the trained model: topk (best blocks within the budget) or threshold
    always_run: int = 1
    router_hidden: int = 32
    router_lr: float = 1e-3
    student_lr: float = 5e-5
    compute_weight: float = 10.0
    importance_weight: float = 1.0
    importance_examples: int = 4096  # training examples whose block importance is measured (0: all)
    warm_start_steps: int = 500  # steps of the router alone on the block importance before joint training (0: none)
    final_temperature: float = 0.2

    def validate(self) -> None:
        super().validate()
        require(0 < self.budget <= 1, f"--budget must be in (0, 1], got {self.budget}")
        require(self.router in VARIANTS, f"--router must be one of {', '.join(VARIANTS)}, got {self.router!r}")
        require(self.mode in ("topk", "threshold"), f"--mode must be topk or threshold, got {self.mode!r}")
        require(self.always_run >= 1, "--always-run must be at least 1 (the router reads the first block's output)")
        require(self.router_lr > 0 and self.student_lr >= 0, "--router-lr must be positive and --student-lr >= 0")
        require(self.compute_weight >= 0, f"--compute-weight must be >= 0, got {self.compute_weight}")
        require(self.importance_weight >= 0, f"--importance-weight must be >= 0, got {self.importance_weight}")
        require(self.importance_examples >= 0, f"--importance-examples must be >= 0, got {self.importance_examples}")
        require(self.warm_start_steps >= 0, f"--warm-start-steps must be >= 0, got {self.warm_start_steps}")


def build_routed(student, config: RouteConfig, grid, text_tokens: int, static_route=None,
                 image_tokens: int | None = None) -> RoutedWanTransformer3DModel:  # fmt: skip
    """The routed model: the student's structure and weights plus a fresh router."""
    cfg = {k: v for k, v in student.config.items() if not k.startswith("_")}
    for key in ("self_heads", "cross_heads", "ffn_dims"):
        cfg.setdefault(key, None)
    report = count_flops(student, grid, text_tokens, image_tokens)
    require(config.always_run < len(arch.blocks(student)), "--always-run must leave at least one block to route")
    fixed, _ = routable_flops_share(report, config.always_run)
    require(config.budget > fixed, f"--budget {config.budget} is below the always-run blocks' share ({fixed:.3f})")
    k = topk_for_budget(report, config.always_run, config.budget)
    mode = "static" if config.router == "static" else config.mode
    from accelerate import init_empty_weights

    with init_empty_weights():  # the student's structure without memory: its own tensors are assigned below
        routed = RoutedWanTransformer3DModel(**cfg, always_run=config.always_run, router_hidden=config.router_hidden,
                                             router_content=config.router == "content", route_mode=mode, topk=k,
                                             static_route=static_route, budget=config.budget,
                                             block_flops=[b.total for b in report.blocks])  # fmt: skip
    c = routed.config
    routed.router = BlockRouter(c.num_attention_heads * c.attention_head_dim, c.num_layers - config.always_run,
                                config.router_hidden, config.router == "content")  # fmt: skip
    missing = routed.load_state_dict(student.state_dict(), strict=False, assign=True)  # shares, never copies
    require(all(key.startswith("router.") for key in missing.missing_keys) and not missing.unexpected_keys,
            "the student's weights do not fit the routed model")  # fmt: skip
    return routed.to(next(student.parameters()).device)


class _Replay(torch.nn.Module):
    """Stands in for a block: returns a given hidden state, whatever it is called with."""

    def __init__(self, output: torch.Tensor):
        super().__init__()
        self.output = output

    def forward(self, hidden_states, *args, **kwargs):
        return self.output


class _Stop(Exception):
    pass


class _Capture(torch.nn.Module):
    """Stands in for the first block: keeps what the model calls its blocks with, then stops the forward."""

    def forward(self, hidden_states, *args):
        self.hidden_states, self.args = hidden_states, args
        raise _Stop


@torch.no_grad()
def block_importance(model, data, device, batch_size: int = 32, progress: bool = True) -> torch.Tensor:
    """(N, branches, blocks): per example and branch (cond, uncond; cond alone for a guidance-free teacher's data),
    the relative output error ||skip_i - full||^2 / ||full||^2 when block i alone is skipped (passes its input
    through).

    The blocks before i see the same input with or without block i, so they are not run again: the full pass's
    hidden state h_i (block i's input) goes straight into block i + 1. The blocks are walked in order, h_i
    advanced by one block at a time, so only one hidden state is held however deep the model (L(L+1)/2 block
    passes per batch instead of L^2, and no block's output kept)."""
    from tqdm import tqdm

    from ..distill import branches, pair_inputs, stack_examples

    model.eval()
    container = model.blocks  # diffusers' Wan forward loops over this ModuleList: swapped entries run instead
    original = list(container)
    n_branches = branches(data[0])
    out = torch.empty(len(data), n_branches, len(original))
    for start in tqdm(range(0, len(data), batch_size), desc="block importance", unit="batch", disable=not progress,
                      leave=False):  # fmt: skip
        items = [data[j] for j in range(start, min(len(data), start + batch_size))]
        inputs, _ = pair_inputs(stack_examples(items, device))
        try:
            container[0] = capture = _Capture()  # the embedded input and the blocks' other arguments
            try:
                model(**inputs)
            except _Stop:
                pass
            h, args = capture.hidden_states, capture.args
            del capture.hidden_states  # h alone holds the walked hidden state
            replay, skipped = _Replay(h), []  # stands in for blocks 0..i: block i skipped, block i + 1 reads h_i
            for i, block in enumerate(original):
                replay.output, container[i] = h, replay
                skipped.append(model(**inputs)[0].float().flatten(1))
                h = block(h, *args)
            replay.output = h  # every block replayed: the full output
            full = model(**inputs)[0].float().flatten(1)
        finally:
            for j, b in enumerate(original):
                container[j] = b
        energy = (full**2).sum(1).clamp_min(1e-12)
        for i, s in enumerate(skipped):
            err = ((s - full) ** 2).sum(1) / energy  # (2B,): cond rows, then uncond
            out[start : start + len(items), :, i] = err.view(n_branches, -1).T.cpu()
    return out


WARM_BATCH, WARM_LR, WARM_HELD_OUT = 256, 3e-3, 0.1


def importance_ranking(importance: torch.Tensor, always_run: int) -> torch.Tensor:
    """(N, blocks) block importance -> (N, routable) the warm start's target: log importance of the routable
    blocks, standardised per row (its order is the row's ranking of the blocks; its scale is the same for every
    row, whatever the timestep's overall error level)."""
    z = importance[:, always_run:].float().clamp_min(1e-8).log()
    return (z - z.mean(1, keepdim=True)) / z.std(1, keepdim=True, correction=0).clamp_min(1e-6)


@torch.no_grad()
def router_features(routed, data, rows: list[int], device, batch_size: int) -> list[torch.Tensor]:
    """The router's inputs (temb, pooled tokens, pooled text) for examples `rows` of a trajectory dataset, cond
    branch rows first, then uncond (`pair_inputs` order over the whole list): three (branches x len(rows), D)
    tensors."""
    from ..distill import branches, pair_inputs, stack_examples

    per_branch: list[list] = [[] for _ in range(branches(data[rows[0]]))]
    for i in range(0, len(rows), batch_size):
        inputs, _ = pair_inputs(stack_examples([data[j] for j in rows[i : i + batch_size]], device))
        inputs.pop("return_dict")
        feats = [f.float().cpu() for f in routed.router_inputs(**inputs)]
        for b, part in enumerate(per_branch):
            part.append([f.chunk(len(per_branch))[b] for f in feats])
    return [torch.cat([c[k] for part in per_branch for c in part]) for k in range(3)]


def warm_start(routed, data, importance: torch.Tensor, config: RouteConfig, device, progress: bool = True) -> dict:
    """Fit the router alone, before joint training, to each measured example's ranking of the routable blocks
    (`importance_ranking`, mean squared error, both branches): `config.warm_start_steps` AdamW steps of
    `WARM_BATCH` rows on inputs computed once. A seeded tenth of the examples is held out to report the fit (none
    below 10 examples).
    Returns the record: steps, rows, and the held-out error and distinct routes (at the budget) before and after."""
    from tqdm import tqdm

    measured = (~importance.isnan().flatten(1).any(1)).nonzero().flatten()
    require(len(measured) >= 1, "the router's warm start needs examples with measured block importance: raise "
            "--importance-examples")  # fmt: skip
    g = torch.Generator().manual_seed(config.seed)
    order = measured[torch.randperm(len(measured), generator=g)]
    n_held = int(WARM_HELD_OUT * len(order))  # none below 10 examples: then nothing is reported
    split = {"held": order[:n_held].sort().values, "fit": order[n_held:].sort().values}
    router, c = routed.router, routed.config
    was_training = routed.training
    routed.eval()
    sets = {}
    for name, rows in split.items():
        if not len(rows):
            continue
        feats = router_features(routed, data, rows.tolist(), device, config.batch_size)
        imp = importance[rows]
        sets[name] = ([f.to(device) for f in feats], importance_ranking(by_branch(imp), c.always_run).to(device))

    def held_out() -> dict | None:
        if "held" not in sets:
            return None
        (feats, target) = sets["held"]
        with torch.no_grad():
            logits = router(*feats)
        routes = fill_budget(logits, c.block_flops, c.always_run, c.budget) if c.block_flops else logits > 0
        return {"error": torch.nn.functional.mse_loss(logits, target).item(),
                "distinct_routes": len({tuple(r) for r in routes.int().tolist()})}  # fmt: skip

    before = held_out()
    opt = torch.optim.AdamW(router.parameters(), lr=WARM_LR, weight_decay=0.0)
    (feats, target), n = sets["fit"], len(sets["fit"][1])
    router.train()
    for _ in tqdm(range(config.warm_start_steps), desc="router warm start", unit="step", disable=not progress, leave=False):
        pick = torch.randint(0, n, (min(WARM_BATCH, n),), generator=g).to(device)
        loss = torch.nn.functional.mse_loss(router(*(f[pick] for f in feats)), target[pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    routed.train(was_training)
    n_branches = importance.shape[1]
    return {"steps": config.warm_start_steps, "rows": n_branches * len(split["fit"]), "held_out_rows": n_branches * n_held,
            "held_out_before": before, "held_out_after": held_out()}  # fmt: skip


class WithImportance(torch.utils.data.Dataset):
    """A trajectory dataset whose examples also carry their block importance (2, blocks)."""

    def __init__(self, data, importance: torch.Tensor):
        self.data, self.importance = data, importance

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        return {**self.data[i], "importance": self.importance[i]}


def by_branch(importance: torch.Tensor) -> torch.Tensor:
    """(B, branches, blocks) -> (branches x B, blocks): rows in `pair_inputs` order, every cond row, then uncond."""
    return importance.transpose(0, 1).flatten(0, 1)


def importance_targets(importance: torch.Tensor, block_flops, always_run: int, budget: float) -> torch.Tensor:
    """(B, branches, blocks) importance -> (branches x B, routable) 0/1 targets, rows in `pair_inputs` order: the
    most important routable blocks of each row that fit the budget (the rule the trained router's `topk` decisions
    follow)."""
    rows = by_branch(importance)[:, always_run:]  # (2B, routable)
    return fill_budget(rows, block_flops, always_run, budget).to(rows.dtype)


def static_route_for_budget(errors: list[float], shares: list[float], always_run: int, budget: float) -> list[int]:
    """The most important routable blocks whose FLOPs fit the budget (always-run blocks counted first)."""
    keep = fill_budget(torch.tensor(errors[always_run:])[None], shares, always_run, budget)[0]
    return [always_run + int(i) for i in keep.nonzero().flatten()]


class RouteStage:
    """Stage 2: router and student trained jointly."""

    name = "route"

    def __init__(self, config: RouteConfig, base: str, manifest: dict | None = None):
        self.config, self.base = config, base
        self.manifest = manifest or {}  # pare.json entries the export keeps (`distill.student_manifest`)
        # a static route skips the same blocks every time and never consults the router
        self.unused_parameters = config.router == "static"

    def prepare(self, accelerator) -> None:
        pass

    def param_groups(self, model) -> list[dict]:
        router = [p for n, p in model.named_parameters() if n.startswith("router.")]
        student = [p for n, p in model.named_parameters() if not n.startswith("router.")]
        groups = [{"params": student, "lr": self.config.student_lr, "weight_decay": 0.0}]
        if self.config.router == "static":
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
        if core.last_logits is not None and core.config.route_mode != "static" and self.config.importance_weight:
            c = core.config
            target = importance_targets(batch["importance"], c.block_flops, c.always_run, c.budget)
            logits, target = core.last_logits, target.to(core.last_logits)
            measured = ~batch["importance"].isnan().flatten(1).any(1).repeat(batch["importance"].shape[1])  # sampled rows
            if not measured.all():
                logits, target = logits[measured], target[measured]
            bce = (torch.nn.functional.binary_cross_entropy_with_logits(logits, target) if len(target)
                   else logits.sum() * 0)  # no sampled example in this batch  # fmt: skip
            parts["importance"] = bce.detach()
            loss = loss + self.config.importance_weight * bce
        if core.last_gates is not None and core.config.route_mode != "static":
            shares = torch.tensor(core.config.block_flops, device=loss.device, dtype=torch.float32)
            always = core.config.always_run
            executed = (shares[:always].sum() + core.last_gates.float() @ shares[always:]) / shares.sum()  # (2B,)
            parts["executed"] = executed.mean().detach()
            if core.config.route_mode == "threshold":  # topk routes fill the budget by construction
                loss = loss + self.config.compute_weight * (executed.mean() - self.config.budget) ** 2
        return loss, parts

    @torch.no_grad()
    def validate(self, model, data, rows, device, batch_size) -> dict:
        from ..distill import velocity_error_sums

        core = getattr(model, "module", model)
        was_training = core.training
        core.eval()
        executed, routes = [0.0, 0], set()
        shares = torch.tensor(core.config.block_flops, dtype=torch.float32)
        shares = shares / shares.sum()

        def keep_route(m, a, o):
            r = core.last_route.cpu()
            executed[0] += (r.float() @ shares).sum().item()
            executed[1] += r.shape[0]
            routes.update(tuple(x) for x in r.int().tolist())

        handle = core.register_forward_hook(keep_route)
        error = velocity_error_sums(model, data, rows, device, 1.0, batch_size)["error"]
        handle.remove()
        core.train(was_training)
        return {"error": error, "executed": executed, "routes": routes}

    def summarize(self, sums: dict) -> dict:
        (num, den), (share, n) = sums["error"], sums["executed"]
        return {"error": num / den, "executed": share / n, "distinct_routes": len(sums["routes"])}

    def export(self, folder, model, weights, record) -> None:
        from ..distill import export_model

        export_model(folder, model, weights, self.base, "routed", record, **self.manifest)


def route_statistics(bundle, prompts: list[str], seed: int = 0) -> dict:
    """The routes a routed model takes: `prompts` sampled in one batch with the bundle's sampler (the noise of
    `seed`), the conditional passes' routes recorded. Per step: distinct routes among the prompts, mean blocks run,
    the most common route (as a string of 0/1 per block) and its share, each block's share of prompts running it;
    and the distinct routes over all steps."""
    from collections import Counter

    from ..sampling import Conditioning, SamplerConfig, sample

    model, n = bundle.transformer, len(prompts)
    require(isinstance(model, RoutedWanTransformer3DModel), "route statistics need a routed model (`pare route`)")
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    from ..generate import heldout_images
    from ..profiling.calibration import encode_images

    image, condition = encode_images(bundle, heldout_images(bundle, prompts), prompts, bundle.default_shape, device, dtype)
    cond = Conditioning(bundle.prompt_encoder.encode(prompts, device, dtype),
                        bundle.prompt_encoder.encode([""] * n, device, dtype), image, condition)  # fmt: skip
    routes: list[torch.Tensor] = []
    handle = model.register_forward_hook(lambda m, a, o: routes.append(m.last_route[:n].cpu()))  # cond rows
    try:
        latent = (model.config.out_channels, *bundle.latent.latent_shape(*bundle.default_shape))
        with torch.no_grad():
            sample(model, cond, latent, SamplerConfig(**{**bundle.sampler_defaults, "seed": seed}), progress=False)
    finally:
        handle.remove()
    steps = []
    for i, r in enumerate(routes):
        counts = Counter(tuple(row) for row in r.int().tolist())
        common, times = counts.most_common(1)[0]
        steps.append({"step": i, "distinct_routes": len(counts), "blocks_run": r.float().sum(1).mean().item(),
                      "most_common": "".join(map(str, common)), "most_common_share": times / n,
                      "block_share": r.float().mean(0).tolist()})  # fmt: skip
    every = {tuple(row) for r in routes for row in r.int().tolist()}
    return {"prompts": n, "steps": steps, "distinct_routes_overall": len(every)}


def _cached_importance(student, train, data_dir: Path, config: RouteConfig, progress: bool) -> torch.Tensor:
    """(N, branches, blocks) block importance of the training examples, NaN where not measured: on a seeded sample of
    `config.importance_examples` of them, split across the processes, on the training device at the training
    batch. Computed once per student, data folder and sample, and kept in the data folder
    (`block_importance-<student fingerprint>.safetensors`), so every variant and a resumed run reuse it."""
    from accelerate import PartialState
    from accelerate.utils import gather_object, parse_flag_from_env
    from safetensors.torch import load_file, save_file

    from ..io import atomic_path
    from ..loading import cast_copy
    from ..profiling import fingerprint

    n = len(train)
    k = min(n, config.importance_examples or n)
    sample = torch.arange(n)
    if k < n:
        sample = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed))[:k].sort().values
    path = Path(data_dir) / f"block_importance-{fingerprint(student)}.safetensors"
    if path.exists():
        cached = load_file(str(path))
        if cached["importance"].shape[0] == n and torch.equal(cached.get("rows", torch.arange(n)), sample):
            return cached["importance"]
    # the process group `run`'s Accelerator will use (which reads ACCELERATE_USE_CPU itself; PartialState does not,
    # and would take a CPU process of a multi-process launch for a lone one)
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    mine = sample[state.process_index :: state.num_processes].tolist()
    bf16 = config.uses_bf16
    home = next(student.parameters()).device
    # under bf16 the pass runs on a bf16 copy on the device: the fp32 student stays home, and autocast keeps no
    # bf16 copy of every weight beside it
    work = cast_copy(student, state.device, torch.bfloat16) if bf16 else student.to(state.device)
    with torch.autocast(state.device.type, dtype=torch.bfloat16, enabled=bf16):
        part = block_importance(work, torch.utils.data.Subset(train, mine), state.device,
                                max(1, config.batch_size // state.num_processes), progress and state.is_main_process)  # fmt: skip
    del work
    student.to(home)
    from ..distill import branches

    importance = torch.full((n, branches(train[0]), len(arch.blocks(student))), float("nan"))
    for rows, values in gather_object([(mine, part)]):
        importance[rows] = values
    if state.is_main_process:
        try:
            with atomic_path(path) as tmp:
                save_file({"importance": importance, "rows": sample}, str(tmp))
        except OSError:  # a read-only data folder: compute again next time
            pass
    state.wait_for_everyone()
    return importance


def route(teacher_spec: str, student_dir: Path, data_dir: Path, out: Path, config: RouteConfig, command: str = "",
          progress: bool = True) -> dict:  # fmt: skip
    """Run (or resume) stage 2; returns the final record."""
    from ..distill import check_student_of, student_base, student_manifest
    from ..distill.data import read_index
    from ..loading import load_bundle

    config.validate()
    index = read_index(data_dir)
    student_bundle = load_bundle(str(student_dir))
    check_student_of(student_bundle, load_bundle(teacher_spec, weights=False), student_dir, teacher_spec)
    student = student_bundle.transformer
    require(not isinstance(student, RoutedWanTransformer3DModel),
            f"{student_dir} is already routed: pass the distilled (or pruned) student it was made from")  # fmt: skip
    grid = arch.token_grid(student.config, student_bundle.latent, *index["shape"])
    image_tokens = student_bundle.image_tokens(*index["shape"][1:])
    train, val = split_data(data_dir)
    importance = None
    warm = config.router != "static" and config.warm_start_steps > 0
    if config.router == "static" or config.importance_weight > 0 or warm:  # else nothing reads it: skip the cost
        importance = _cached_importance(student, train, data_dir, config, progress)
    static = None
    if config.router == "static":
        shares = [b.total for b in count_flops(student, grid, student_bundle.text_tokens, image_tokens).blocks]
        static = static_route_for_budget(importance.nanmean((0, 1)).tolist(), shares, config.always_run, config.budget)
    with torch.random.fork_rng(devices=[]):  # the fresh router's weights: a function of --seed
        torch.manual_seed(config.seed)
        routed = build_routed(student, config, grid, student_bundle.text_tokens, static, image_tokens)
    record = {"teacher": teacher_spec, "student": str(Path(student_dir).resolve()), "data": str(Path(data_dir).resolve()),
              "command": command, "static_route": static, "topk": routed.config.topk}  # fmt: skip
    resume_state(out, config, record)  # a refused resume fails before the warm start's work
    if warm:  # a fresh run only: a resumed one has the warmed-up (and since trained) router in its checkpoint
        record["notes"] = {"warm_start": _warm_start_once(routed, train, importance, config, Path(out), progress)}
    if importance is not None:
        train = WithImportance(train, importance)
    stage = RouteStage(config, student_base(student_bundle), student_manifest(student_bundle))
    return run(stage, routed, train, val, out, config, record, progress)


@contextmanager
def routed_blocks_hidden(routed: RoutedWanTransformer3DModel):
    """`routed` without its routed blocks (the always-run ones kept) inside the block: what `router_inputs` needs,
    so that `.to(device)` moves only that (the router, the prefix, the head), and the routed blocks stay put."""
    blocks = routed.blocks
    routed.blocks = torch.nn.ModuleList(blocks[: routed.config.always_run])
    try:
        yield routed
    finally:
        routed.blocks = blocks


WARM_FILE = "warm_start.json"


def _warm_start_once(routed, train, importance, config: RouteConfig, out: Path, progress: bool) -> dict | None:
    """`warm_start` on a fresh run (its record kept in OUT/warm_start.json); on a resumed run, that record."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from ..io import write_json
    from ..training import CHECKPOINT, STATE_FILE

    if (out / CHECKPOINT / STATE_FILE).is_file():
        return json.loads((out / WARM_FILE).read_text()) if (out / WARM_FILE).is_file() else None
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    # every process fits the same router (same inputs, same seed); the main one writes the record. Only the router and
    # what it reads go to the device: a whole fp32 copy of a 14B student on every GPU, ahead of FSDP's sharding,
    # would not fit
    home = next(routed.parameters()).device
    with routed_blocks_hidden(routed):
        routed.to(state.device)
        result = warm_start(routed, train, importance, config, state.device, progress and state.is_main_process)
        routed.to(home)
    if state.is_main_process:
        write_json(out / WARM_FILE, result)
    return result
