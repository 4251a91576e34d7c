"""A Wan transformer whose blocks run or not, per sample and per step, as a small router decides.

The first `always_run` blocks always run; the router then looks at the timestep embedding, at the hidden
states after those blocks (mean over tokens) and at the text conditioning (mean over the prompt's tokens), and
gives each remaining block a logit. A skipped block passes the hidden state through unchanged.

Inference makes hard decisions and really skips compute: each block runs only on the sub-batch of samples that
route through it (gather, run, scatter back), so a batch costs what its samples' routes cost. Modes:
`threshold` (run where sigmoid(logit) > 0.5), `topk` (per sample, the blocks in the router's order of
preference, as many as fit the FLOP budget: blocks differ in cost once pruned, so a block that does not fit is
passed over for a cheaper one; compute never exceeds the budget), `static` (the same blocks for everyone: static block removal), `dense`
(every block: the student without routing) and `steps` (a few-step model's step experts, `pare.routing.experts`:
each step of its own schedule runs the blocks a table gives it, found by the timestep; no router is consulted). Training relaxes the decisions (Gumbel-sigmoid with a
straight-through hard sample, decided by the mode's own rule on the noisy logits) and runs every block on the
full batch so that gradients reach every gate.

The forward below re-states diffusers' `WanTransformer3DModel.forward` (patchify, condition embedding, blocks,
output head) because diffusers offers no way to skip a block for part of a batch; its blocks stay
`WanTransformerBlock`s and every step outside the block loop calls diffusers' own modules.
"""

from __future__ import annotations

import math

import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn

from ..loading import extends_config, register_model_class
from ..pruning.model import PrunedWanTransformer3DModel

ROUTE_MODES = ("threshold", "topk", "static", "dense", "steps")


class BlockRouter(nn.Module):
    """Logits per routable block from [timestep embedding, pooled hidden states, pooled text]."""

    def __init__(self, dim: int, routable: int, hidden: int, content: bool):
        super().__init__()
        self.content = content
        width = dim * (3 if content else 1)
        self.net = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, routable))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.constant_(self.net[-1].bias, 3.0)  # starts with every block on (sigmoid(3) = 0.95)

    def forward(self, temb: torch.Tensor, pooled: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """temb, pooled, text: (B, D) -> logits (B, routable)."""
        x = torch.cat([temb, pooled, text], dim=-1) if self.content else temb
        return self.net(x.float())

    def flops(self) -> int:
        return 2 * sum(m.in_features * m.out_features for m in self.net if isinstance(m, nn.Linear))


@register_model_class
class RoutedWanTransformer3DModel(PrunedWanTransformer3DModel):
    """`PrunedWanTransformer3DModel` plus a block router (see the module docstring)."""

    @extends_config(PrunedWanTransformer3DModel)
    def __init__(self, *, always_run: int = 1, router_hidden: int = 32, router_content: bool = True,
                 route_mode: str = "threshold", topk: int | None = None, static_route: list[int] | None = None,
                 budget: float | None = None, block_flops: list[int] | None = None,
                 step_timesteps: list[float] | None = None, step_routes: list[list[int]] | None = None,
                 **pruned) -> None:  # fmt: skip
        super().__init__(**pruned)
        if route_mode not in ROUTE_MODES:
            raise ValueError(f"route_mode must be one of {ROUTE_MODES}, got {route_mode!r}")
        if route_mode == "steps" and (not step_timesteps or len(step_routes or []) != len(step_timesteps)):
            raise ValueError("route_mode 'steps' needs step_timesteps and one entry of step_routes per step")
        if route_mode == "steps" and (always_run or not all(0 <= b < self.config.num_layers for r in step_routes for b in r)):
            raise ValueError(f"route_mode 'steps' takes always_run 0 and block numbers in 0..{self.config.num_layers - 1}")
        dim = self.config.num_attention_heads * self.config.attention_head_dim
        self.router = BlockRouter(dim, self.config.num_layers - always_run, router_hidden, router_content)
        if route_mode == "steps":  # the route is the table's: the router is never consulted, so never trained
            self.router.requires_grad_(False)
        self.temperature = 1.0  # Gumbel-sigmoid temperature while training
        self.last_route: torch.Tensor | None = None  # (N, num_layers) bool: blocks each sample of the last forward ran
        self.last_probs: torch.Tensor | None = None  # (N, routable) sigmoid of the router's logits (training)
        self.last_gates: torch.Tensor | None = None  # (N, routable) straight-through 0/1 gates (training)
        self.last_logits: torch.Tensor | None = None  # (N, routable) the router's logits (training)

    # --- decisions ------------------------------------------------------------------------------------------

    def decide(self, logits: torch.Tensor) -> torch.Tensor:
        """Hard keep/skip decisions (B, routable) bool for inference, by the configured mode."""
        mode = self.config.route_mode
        if mode == "dense":
            return torch.ones_like(logits, dtype=torch.bool)
        if mode == "static":
            keep = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
            keep[[i - self.config.always_run for i in self.config.static_route or []]] = True
            return keep.expand_as(logits)
        if mode == "topk" and self.config.budget is not None and self.config.block_flops:
            return fill_budget(logits, self.config.block_flops, self.config.always_run, self.config.budget)
        if mode == "topk":  # no FLOPs per block recorded: a fixed number of blocks
            k = self.config.topk if self.config.topk is not None else logits.shape[1]
            top = logits.topk(k, dim=1).indices
            return torch.zeros_like(logits, dtype=torch.bool).scatter_(1, top, True)
        return logits > 0

    def relaxed(self, logits: torch.Tensor) -> torch.Tensor:
        """Gumbel-sigmoid sample with a straight-through hard decision: forward 0/1, backward the soft gate.
        The hard decision is the inference rule applied to the noisy logits (in `topk` mode: the budget is
        filled in their order), so training runs the routes inference will run, not a thresholded stand-in."""
        u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
        noisy = (logits + torch.log(u) - torch.log1p(-u)) / self.temperature
        soft = torch.sigmoid(noisy)
        return self.decide(noisy.detach()).to(soft.dtype) + soft - soft.detach()

    def step_route(self, timestep: torch.Tensor) -> torch.Tensor:
        """(B, routable) bool for `steps` mode: each sample runs the blocks of the step whose timestep is nearest
        its own (with a timestep per token, as Wan2.2 TI2V gives the conditioning frame t = 0: the highest, that of
        the tokens being denoised)."""
        t = (timestep.float().amax(1) if timestep.ndim == 2 else timestep.float()).view(-1, 1)
        own, table = self._step_table(t.device)
        step = (t - own).abs().argmin(dim=1)  # (B,)
        return table[step][:, self.config.always_run :]

    def _step_table(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The steps' timesteps (K,) and routes (K, num_layers) bool on `device`, built once per device (the
        config is frozen after construction)."""
        cache = self.__dict__.setdefault("_step_tables", {})
        if device not in cache:
            table = torch.zeros(len(self.config.step_timesteps), self.config.num_layers, dtype=torch.bool)
            for k, blocks in enumerate(self.config.step_routes):
                table[k, blocks] = True
            own = torch.tensor(self.config.step_timesteps, dtype=torch.float32)
            cache[device] = (own.to(device), table.to(device))
        return cache[device]

    def extra_flops(self, grid) -> int:
        return 0 if self.config.route_mode == "steps" else self.router.flops()

    # --- forward --------------------------------------------------------------------------------------------

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.LongTensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor | None = None,
        return_dict: bool = True,
        attention_kwargs: dict | None = None,
    ):
        """hidden_states (B, C, F, H, W), timestep (B,) or (B, S) (one per token, as Wan2.2 TI2V),
        encoder_hidden_states (B, L, text_dim) -> (B, C_out, F, H, W). `attention_kwargs` is accepted as by
        diffusers' forward, which does not read it either."""
        B, _, F, H, W = hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        x, temb, tproj, context, rotary_emb, router_in = self._prefix(hidden_states, timestep, encoder_hidden_states,
                                                                      encoder_hidden_states_image)  # fmt: skip
        always = self.config.always_run
        by_step = self.config.route_mode == "steps"
        logits = None if by_step else self.router(*router_in)

        if self.training and self.config.route_mode in ("threshold", "topk"):
            gates = self.relaxed(logits)  # (B, routable), straight-through
            self.last_gates, self.last_probs, self.last_logits = gates, torch.sigmoid(logits), logits
            for j, block in enumerate(self.blocks[always:]):
                g = gates[:, j].view(B, 1, 1).to(x.dtype)
                # inside the checkpoint: the gate's gradient needs f(x) - x, recomputed rather than kept per block
                x = self._run_block(_gated, block, x, g, context, tproj, rotary_emb)
            route = gates.detach() > 0.5
        else:
            route = self.step_route(timestep) if by_step else self.decide(logits)
            for j, block in enumerate(self.blocks[always:]):
                rows = route[:, j].nonzero().flatten()
                if len(rows) == B:
                    x = self._run_block(block, x, context, tproj, rotary_emb)
                elif len(rows):  # only the samples routed through this block pay for it
                    out = self._run_block(block, x[rows], context[rows], tproj[rows], rotary_emb)
                    x = x.index_copy(0, rows, out)
        self.last_route = torch.cat([torch.ones(B, always, dtype=torch.bool, device=route.device), route], dim=1)

        if temb.ndim == 3:  # (B, S, D): a shift and scale per token
            shift, scale = (self.scale_shift_table.unsqueeze(0).to(temb.device) + temb.unsqueeze(2)).chunk(2, dim=2)
            shift, scale = shift.squeeze(2), scale.squeeze(2)
        else:
            shift, scale = (self.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        shift, scale = shift.to(x.device), scale.to(x.device)
        x = (self.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        x = self.proj_out(x)  # (B, S, p_t * p_h * p_w * C_out)
        x = x.reshape(B, F // p_t, H // p_h, W // p_w, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        out = x.flatten(6, 7).flatten(4, 5).flatten(2, 3)  # (B, C_out, F, H, W)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


    def _run_block(self, block, *args):
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, *args)
        return block(*args)

    def _prefix(self, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image=None):
        """Everything before the routed blocks: patchify, condition embedding, the always-run blocks. Returns
        (x, temb, tproj, context, rotary_emb, router inputs (temb, pooled tokens, pooled text), each (B, D))."""
        rotary_emb = self.rope(hidden_states)
        text_mask = (encoder_hidden_states.abs().sum(-1) > 0).float()  # (B, L): the prompt's own tokens
        x = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()  # (B, S, D)
        ts_seq_len = timestep.shape[1] if timestep.ndim == 2 else None
        temb, tproj, context, context_img = self.condition_embedder(
            timestep.flatten(), encoder_hidden_states, encoder_hidden_states_image, timestep_seq_len=ts_seq_len)  # fmt: skip
        tproj = tproj.unflatten(-1, (6, -1))  # (B, 6, D), or (B, S, 6, D) with a timestep per token
        if context_img is not None:
            context = torch.concat([context_img, context], dim=1)
        for block in self.blocks[: self.config.always_run]:
            x = self._run_block(block, x, context, tproj, rotary_emb)
        pooled_text = (context[:, -text_mask.shape[1]:] * text_mask[..., None]).sum(1) / text_mask.sum(1, keepdim=True).clamp_min(1)
        # the router sees one timestep embedding per sample (the mean over tokens when they have their own)
        router_in = (temb if temb.ndim == 2 else temb.mean(1), self._pooled_tokens(x), pooled_text)
        return x, temb, tproj, context, rotary_emb, router_in

    @torch.no_grad()
    def router_inputs(self, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image=None):
        """What the router reads for these inputs (temb, pooled tokens, pooled text), each (B, D): the model's
        prefix only, no routed block run."""
        return self._prefix(hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image)[-1]

    def _pooled_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, D) -> (B, D), the mean over the sequence. Under diffusers' context parallelism
        (`enable_parallelism`) each rank holds a shard of the sequence: the shards' sums are added up, so that
        every rank's router sees the same input and takes the same route."""
        cp = getattr(self._parallel_config, "context_parallel_config", None)
        mesh = getattr(cp, "_flattened_mesh", None)
        if mesh is None or mesh.size() == 1:
            return x.mean(1)
        return all_ranks_mean(x, mesh.get_group())


def _gated(block, x, g, *args):
    """x + g (f(x) - x): block f run with straight-through gate g (B, 1, 1) per sample."""
    return x + g * (block(x, *args) - x)


def all_ranks_mean(x: torch.Tensor, group) -> torch.Tensor:
    """(B, S_rank, D) shards of one sequence on the ranks of `group` -> (B, D) the mean over the whole sequence,
    on every rank (differentiable: each rank's gradient flows to its own shard)."""
    import warnings

    import torch.distributed as dist

    count = torch.tensor([float(x.shape[1])], device=x.device)
    dist.all_reduce(count, group=group)
    total = x.float().sum(1)
    if total.requires_grad:
        from torch.distributed.nn.functional import all_reduce

        with warnings.catch_warnings():  # deprecated for functional collectives, which have no backward
            warnings.simplefilter("ignore", FutureWarning)
            total = all_reduce(total, group=group)
    else:
        dist.all_reduce(total, group=group)
    return (total / count).to(x.dtype)


def fill_budget(scores: torch.Tensor, block_flops, always_run: int, budget: float) -> torch.Tensor:
    """(B, routable) bool: per row, the routable blocks in descending `scores`, each kept when it still fits in
    `budget` x all block FLOPs (the always-run blocks counted first); one that does not fit is passed over."""
    flops = torch.as_tensor(block_flops, dtype=torch.float64, device=scores.device)
    total = flops.sum()
    room = budget * total - flops[:always_run].sum() + 1e-9 * total
    cost = flops[always_run:]
    order = scores.argsort(dim=1, descending=True, stable=True)
    keep = torch.zeros_like(scores, dtype=torch.bool)
    spent = torch.zeros(scores.shape[0], dtype=torch.float64, device=scores.device)
    rows = torch.arange(scores.shape[0], device=scores.device)
    for j in range(scores.shape[1]):
        c = cost[order[:, j]]
        fits = spent + c <= room
        keep[rows, order[:, j]] = fits
        spent = spent + c * fits
    return keep


def routable_flops_share(report, always_run: int) -> tuple[float, list[float]]:
    """(share of block FLOPs in always-run blocks, share of each routable block)."""
    per = [b.total for b in report.blocks]
    total = sum(per)
    return sum(per[:always_run]) / total, [p / total for p in per[always_run:]]


def topk_for_budget(report, always_run: int, budget: float) -> int:
    """Routable blocks per sample so that executed block FLOPs are about `budget` of all block FLOPs."""
    fixed, shares = routable_flops_share(report, always_run)
    mean = sum(shares) / len(shares)
    return max(0, min(len(shares), math.floor((budget - fixed) / mean + 0.5)))
