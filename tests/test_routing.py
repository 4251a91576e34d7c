import json
import shutil

import pytest
import torch

from conftest import TINY, tiny_wan, two_processes
from pare import load, load_bundle
from pare.arch import TokenGrid
from pare.cli import main
from pare.flops import count_flops
from pare.routing import (RouteConfig, block_importance, build_routed, importance_targets,
                          route_statistics, static_route_for_budget)  # fmt: skip
from pare.routing.model import RoutedWanTransformer3DModel, fill_budget
from pare.sampling import Conditioning, SamplerConfig, sample

GRID = TokenGrid(2, 4, 4)
X = torch.randn(4, 3, 2, 8, 8, generator=torch.Generator().manual_seed(0))
T = torch.tensor([900, 700, 300, 100])
E = torch.randn(4, 7, 16, generator=torch.Generator().manual_seed(1))


def routed_model(mode="threshold", layers=4, **kw):
    base = tiny_wan(num_layers=layers)
    cfg = RouteConfig(budget=0.6, mode=mode if mode in ("topk", "threshold") else "topk", **kw)
    model = build_routed(base, cfg, GRID, 7)
    model.register_to_config(route_mode=mode)
    return base, model.eval()


def test_dense_routing_equals_the_model_exactly():
    base, model = routed_model("dense")
    with torch.no_grad():
        assert torch.equal(model(X, T, E).sample, base(X, T, E).sample)
    assert model.last_route.all()


def test_routed_forward_takes_every_argument_of_diffusers_forward():
    import inspect

    from diffusers import WanTransformer3DModel

    ours, theirs = (list(inspect.signature(c.forward).parameters) for c in (RoutedWanTransformer3DModel, WanTransformer3DModel))
    assert ours == theirs  # diffusers added or renamed an argument: pass it through


def test_dense_routing_equals_the_model_with_a_timestep_per_token_and_image_tokens():
    """The forward's copy of diffusers' follows it where the tiny T2V test does not reach: (B, S) timesteps
    (Wan2.2 TI2V) and image tokens in cross-attention (Wan2.1 I2V)."""
    torch.manual_seed(0)
    base = tiny_wan(num_layers=3, image_dim=8, added_kv_proj_dim=24)
    model = build_routed(base, RouteConfig(budget=0.6), GRID, 7)
    model.register_to_config(route_mode="dense")
    model.eval()
    tokens = torch.randint(0, 1000, (4, GRID.frames * GRID.height * GRID.width)).float()
    image = torch.randn(4, 5, 8)
    with torch.no_grad():
        for t in (T, tokens):
            assert torch.equal(model(X, t, E, image).sample, base(X, t, E, image).sample)
        assert torch.equal(model(X, tokens, E, image, return_dict=False, attention_kwargs={})[0],
                           base(X, tokens, E, image).sample)  # fmt: skip
        model.register_to_config(route_mode="topk")  # routed rows with per-token timesteps run, each its route
        out = model(X, tokens, E, image).sample
        assert out.shape == X.shape and torch.isfinite(out).all() and not model.last_route.all()


def test_context_parallel_ranks_pool_the_whole_sequence(tmp_path):
    """Under context parallelism each rank holds half the tokens; the router's pooled input is the mean of the
    whole sequence on both ranks, so both take the same route."""
    script = tmp_path / "cp.py"
    script.write_text(
        "import torch, torch.distributed as dist\n"
        "from pare.routing.model import all_ranks_mean\n"
        "dist.init_process_group('gloo')\n"
        "x = torch.arange(2 * 6 * 3, dtype=torch.float32).view(2, 6, 3).requires_grad_()\n"
        "mine = x.chunk(2, dim=1)[dist.get_rank()]\n"
        "pooled = all_ranks_mean(mine, dist.group.WORLD)\n"
        "assert torch.equal(pooled, x.mean(1)), (pooled, x.mean(1))\n"
        "pooled.sum().backward()\n"
        "expected = torch.zeros_like(x)\n"
        "expected.chunk(2, dim=1)[dist.get_rank()].fill_(2 / 6)  # its own shard: 1/6 from each rank's loss\n"
        "assert torch.allclose(x.grad, expected), x.grad\n"
        "with torch.no_grad():\n"
        "    assert torch.equal(all_ranks_mean(mine, dist.group.WORLD), x.mean(1))\n"
        "dist.destroy_process_group()\n"
        "import os\n"
        "os._exit(0)  # torch 2.13's gloo teardown at interpreter exit aborts 1 run in ~5 ('terminate called...')\n"
    )  # fmt: skip
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]


def randomize_router(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.router.parameters():
            p.copy_(torch.randn(p.shape, generator=g))


def test_block_executions_match_the_reported_route_per_sample():
    """Wrap every block, count the rows it really processed; they equal the route the model reports."""
    _, model = routed_model("threshold")
    randomize_router(model)
    seen = [[] for _ in model.blocks]
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: seen[i].append(a[0].shape[0])) for i, b in enumerate(model.blocks)]
    with torch.no_grad():
        mixed = model(X, T, E).sample
    for h in hooks:
        h.remove()
    route = model.last_route
    assert len({tuple(r) for r in route.tolist()}) > 1  # a mixed batch: samples take different routes
    assert [sum(s) for s in seen] == route.sum(0).tolist()
    # each sample's output is what it gets alone: no sample pays for, or is changed by, another's route
    for i in range(4):
        with torch.no_grad():
            alone = model(X[i : i + 1], T[i : i + 1], E[i : i + 1]).sample
        assert torch.equal(model.last_route[0], route[i])
        torch.testing.assert_close(alone, mixed[i : i + 1], rtol=0, atol=1e-5)


def test_topk_runs_exactly_k_blocks_and_the_sampler_counts_them():
    _, model = routed_model("topk")
    randomize_router(model, 1)
    report = count_flops(model, GRID, 7)
    k = model.config.topk
    res = sample(model, Conditioning(E, torch.zeros_like(E)), (3, 2, 8, 8), SamplerConfig(steps=3), flop_report=report,
                 progress=False)  # fmt: skip
    assert (model.last_route.sum(1) == 1 + k).all()
    for s in res.steps:
        assert s.blocks_run == 1 + k and s.flops < s.full_flops
    assert report.extra == model.router.flops() > 0


def test_topk_never_exceeds_the_budget_when_blocks_differ_in_cost():
    from pare.pruning import WidthPlan, prune

    wide, narrow = list(range(32)), list(range(2))
    heads = [[0, 1], [0, 1], [0], [0, 1], [0]]
    student, _ = prune(tiny_wan(num_layers=5), WidthPlan(heads, heads, [wide, wide, narrow, wide, narrow]))
    model = build_routed(student, RouteConfig(budget=0.6, mode="topk"), GRID, 7).eval()
    flops = torch.tensor(model.config.block_flops, dtype=torch.float64)
    assert flops.max() > 1.5 * flops.min()  # pruned unevenly: a fixed k would miss the budget one way or the other
    runs = set()
    for seed in range(6):
        randomize_router(model, seed)
        with torch.no_grad():
            model(X, T, E)
        executed = model.last_route.double() @ flops / flops.sum()
        assert (executed <= 0.6 + 1e-9).all()
        runs.update(model.last_route.sum(1).tolist())
    assert len(runs) > 1  # cheaper routes take more blocks


def test_training_routes_follow_the_inference_rule(monkeypatch):
    """Training's hard gates are the inference decision on the noisy logits: without noise (u = 1/2) the
    training forward runs exactly the eval route; with noise, every training route still fits the budget."""
    from pare.pruning import WidthPlan, prune

    wide, narrow = list(range(32)), list(range(2))
    heads = [[0, 1], [0, 1], [0], [0, 1], [0]]
    student, _ = prune(tiny_wan(num_layers=5), WidthPlan(heads, heads, [wide, wide, narrow, wide, narrow]))
    model = build_routed(student, RouteConfig(budget=0.6, mode="topk"), GRID, 7)
    randomize_router(model, 2)  # a router whose eval routes differ between the samples
    flops = torch.tensor(model.config.block_flops, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        model(X, T, E)
    eval_route = model.last_route.clone()
    model.train()
    for _ in range(5):  # Gumbel noise: other routes, none over the budget
        model(X, T, E)
        assert ((model.last_route.double() @ flops / flops.sum()) <= 0.6 + 1e-9).all()
    monkeypatch.setattr(torch, "rand_like", lambda t: torch.full_like(t, 0.5))
    model.temperature = 0.3  # scaling the logits keeps their order
    model(X, T, E)
    assert torch.equal(model.last_route, eval_route) and len({tuple(r) for r in eval_route.tolist()}) > 1


def test_gradient_checkpointing_recomputes_the_gated_blocks_exactly(monkeypatch):
    """Under gradient checkpointing the gate x + g (f(x) - x) is recomputed with its block: the same loss and
    the same gradients, router included, as without it."""
    monkeypatch.setattr(torch, "rand_like", lambda t: torch.full_like(t, 0.3))  # the same Gumbel noise each run
    _, model = routed_model("topk")
    randomize_router(model, 2)
    model.train()
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.zero_grad()
        model(X, T, E)[0].square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert model.gradient_checkpointing and any(n.startswith("router.") for n in grads[0])
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7), name


def test_block_importance_on_a_bf16_copy_leaves_the_student_alone():
    """Route measures importance on a bf16 copy under bf16 (the fp32 student stays where it is, unchanged):
    the copy's importances follow the fp32 ones."""
    from pare.loading import cast_copy

    model = tiny_wan(num_layers=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copy = cast_copy(model, "cpu", torch.bfloat16)
    assert {p.dtype for p in copy.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(v.float(), before[k].to(torch.bfloat16).float()) for k, v in copy.state_dict().items())
    data = _examples(4)
    exact = block_importance(model, data, "cpu", batch_size=2, progress=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rough = block_importance(copy, data, "cpu", batch_size=2, progress=False)
    assert torch.allclose(rough, exact, rtol=0.1, atol=1e-3)


def test_router_is_small_for_the_builtin_shape():
    """At most 1% of the student's parameters and 0.5% of a step's FLOPs (builtin config, 25% pruned)."""
    from pare.shapes.teacher import PRESETS
    from pare.pruning.plan import WidthPlan
    from pare.pruning.prune import prune
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        teacher = WanTransformer3DModel(**PRESETS["shapes-t2v"].transformer)
    plan = WidthPlan([list(range(6))] * 8, [list(range(6))] * 8, [list(range(384))] * 8)
    student, _ = prune(teacher, plan)
    grid = TokenGrid(4, 8, 8)  # patch (2, 2, 2) on 8 x 16 x 16 latents
    with torch.device("meta"):
        routed = build_routed(student, RouteConfig(), grid, 16)
    router_params = sum(p.numel() for p in routed.router.parameters())
    assert router_params <= 0.01 * sum(p.numel() for p in student.parameters())
    assert routed.router.flops() <= 0.005 * count_flops(student, grid, 16).total()


def test_static_route_fits_the_budget():
    errors, shares = [9.0, 0.1, 5.0, 0.2, 3.0], [1.0] * 5
    assert static_route_for_budget(errors, shares, 1, 0.6) == [2, 4]  # block 0 always runs; then 2 and 4 fit 3/5


def test_fill_budget_passes_over_blocks_that_do_not_fit():
    flops = [4, 4, 1, 1, 2]  # block 0 always runs; budget 0.6 of 12 leaves 3.2 for the rest
    scores = torch.tensor([[0.9, 0.5, 0.4, 0.1], [0.1, 0.2, 0.3, 0.9]])
    keep = fill_budget(scores, flops, 1, 0.6)
    # row 0: block 1 (4) is preferred but does not fit, blocks 2 and 3 do, then block 4 (2) no longer does
    assert keep.tolist() == [[False, True, True, False], [False, False, True, True]]
    assert fill_budget(scores, flops, 1, 1.0).all()


def test_importance_targets_are_each_rows_best_blocks_within_the_budget():
    imp = torch.tensor([[[0.9, 0.1, 0.5, 0.3], [0.9, 0.3, 0.1, 0.5]],
                        [[0.0, 0.7, 0.2, 0.6], [0.0, 0.2, 0.6, 0.7]]])  # (B=2, cond/uncond, 4 blocks)  # fmt: skip
    # equal FLOPs, budget 3/4: block 0 plus two; rows in pair_inputs order: cond of each example, then uncond
    expected = torch.tensor([[0, 1, 1], [1, 0, 1], [1, 0, 1], [0, 1, 1]], dtype=torch.float32)
    assert torch.equal(importance_targets(imp, [1, 1, 1, 1], 1, 0.75), expected)


def _examples(n, tokens=7):
    g = torch.Generator().manual_seed(3)
    return [{"x_t": torch.randn(3, 2, 8, 8, generator=g), "timestep": torch.tensor(100 + 200 * i), "sigma": torch.tensor(0.5),
             "text": torch.randn(tokens, 16, generator=g), "null_text": torch.zeros(tokens, 16),
             "v_cond": torch.zeros(3, 2, 8, 8), "v_uncond": torch.zeros(3, 2, 8, 8)} for i in range(n)]  # fmt: skip


def test_block_importance_known_answers():
    model = tiny_wan(num_layers=3)
    block = model.blocks[1]  # zero every residual branch's output: the block is the identity, skipping it is free
    for lin in (block.attn1.to_out[0], block.attn2.to_out[0], block.ffn.net[2]):
        torch.nn.init.zeros_(lin.weight)
        torch.nn.init.zeros_(lin.bias)
    data = _examples(5)
    imp = block_importance(model, data, "cpu", batch_size=2, progress=False)
    assert imp.shape == (5, 2, 3) and torch.all(imp[:, :, 1] == 0) and torch.all(imp[:, :, [0, 2]] > 0)
    # example 3's uncond branch alone, block 2 replaced by the identity by hand
    with torch.no_grad():
        x, t, e = data[3]["x_t"][None], data[3]["timestep"][None], data[3]["null_text"][None]
        full = model(x, t, e, return_dict=False)[0]
        kept = model.blocks[2]
        model.blocks[2] = torch.nn.Identity()
        model.blocks[2].forward = lambda h, *a: h
        skipped = model(x, t, e, return_dict=False)[0]
        model.blocks[2] = kept
    assert torch.allclose(imp[3, 1, 2], ((skipped - full) ** 2).sum() / (full**2).sum(), rtol=1e-4)


def test_router_learns_input_dependent_routes_from_importance():
    """Targets that depend on the timestep and on the prompt: the trained router's top-k routes follow them."""
    base = tiny_wan(num_layers=5)
    model = build_routed(base, RouteConfig(budget=0.6, mode="topk"), GRID, 7)
    k = model.config.topk
    g = torch.Generator().manual_seed(4)
    prompts = torch.randn(2, 7, 16, generator=g)
    cases = [(t, p) for t in (100, 900) for p in range(2)]
    important = {(100, 0): [1, 2], (100, 1): [3, 4], (900, 0): [2, 3], (900, 1): [1, 4]}  # routable: 1..4
    x = torch.randn(len(cases), 3, 2, 8, 8, generator=g)
    ts = torch.tensor([t for t, _ in cases])
    text = torch.stack([prompts[p] for _, p in cases])
    imp = torch.zeros(len(cases), 2, 5)
    for i, c in enumerate(cases):
        imp[i, :, important[c]] = 1.0
    target = importance_targets(imp, model.config.block_flops, 1, 0.6)[: len(cases)]  # cond rows
    opt = torch.optim.Adam(model.router.parameters(), lr=1e-2)
    model.train()
    for _ in range(150):
        model(x, ts, text, return_dict=False)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model.last_logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        model(x, ts, text, return_dict=False)
    assert k == 2 and torch.equal(model.last_route[:, 1:].float(), target)  # four inputs, four different routes


def test_save_load_and_meta(tmp_path):
    _, model = routed_model("topk")
    randomize_router(model, 2)
    model.save_pretrained(tmp_path / "r")
    loaded = load(str(tmp_path / "r"))
    assert type(loaded) is RoutedWanTransformer3DModel and loaded.config.topk == model.config.topk
    with torch.no_grad():
        assert torch.equal(loaded(X, T, E).sample, model(X, T, E).sample)
    assert torch.equal(loaded.last_route, model.last_route)


def test_routed_model_runs_in_wan_pipeline():
    from conftest import assert_pipeline_matches_sampler, tiny_pipeline_parts

    parts = tiny_pipeline_parts()
    routed = build_routed(parts[2], RouteConfig(budget=0.6), TokenGrid(2, 2, 2), 512).eval()
    assert_pipeline_matches_sampler(routed, parts)


@pytest.mark.parametrize("variant", ["content", "timestep", "static"])
def test_route_cli_end_to_end(stage_inputs, tmp_path, variant, capsys):
    d, teacher = stage_inputs
    out = tmp_path / variant
    assert main(["route", "--teacher", teacher, "--student", str(d / "student"), "--data", str(d / "data"), "--out",
                 str(out), "--router", variant, "--steps", "6", "--batch-size", "4", "--budget", "0.6",
                 "--checkpoint-every", "3"]) == 0  # fmt: skip
    assert "distinct routes" in capsys.readouterr().out
    bundle = load_bundle(str(out / "model"))
    model = bundle.transformer
    assert bundle.kind == "pare:routed" and type(model) is RoutedWanTransformer3DModel
    assert model.config.route_mode == ("static" if variant == "static" else "topk")
    assert model.config.router_content == (variant == "content")
    record = bundle.manifest["training"]
    assert record["val_end"]["executed"] < 1.0 and record["steps"] == 6
    # the router's warm start ran before joint training (not for a static route), its record kept beside
    warm = record.get("notes", {}).get("warm_start")
    assert (warm is None) == (variant == "static") == (not (out / "warm_start.json").exists())
    if warm:
        assert warm["steps"] == 500 and warm == json.loads((out / "warm_start.json").read_text())
    video = tmp_path / "v.gif"
    assert main(["generate", "--model", str(out / "model"), "--prompt", "a red circle bouncing", "--steps", "2",
                 "--out", str(video)]) == 0  # fmt: skip
    steps = json.loads(video.with_suffix(".json").read_text())["steps"]
    assert all(s["blocks_run"] < 2 and s["flops"] < s["full_flops"] for s in steps)
    # the routes of three prompts at every step: a static route is one route, whatever the prompt or step
    stats = route_statistics(bundle, ["a red circle bouncing", "a blue square moving left", "a green triangle"])
    assert len(stats["steps"]) == bundle.sampler_defaults["steps"]
    for s in stats["steps"]:
        assert 1 <= s["distinct_routes"] <= 3 and s["blocks_run"] == pytest.approx(sum(s["block_share"]))
    if variant == "static":
        assert stats["distinct_routes_overall"] == 1 and all(s["most_common_share"] == 1.0 for s in stats["steps"])


def test_route_without_importance_loss_skips_block_importance(stage_inputs, tmp_path):
    d, teacher = stage_inputs
    data = tmp_path / "data"
    shutil.copytree(d / "data", data, ignore=shutil.ignore_patterns("block_importance-*"))
    out = tmp_path / "run"
    assert main(["route", "--teacher", teacher, "--student", str(d / "student"), "--data", str(data), "--out",
                 str(out), "--router", "timestep", "--importance-weight", "0", "--warm-start-steps", "0", "--steps",
                 "3", "--batch-size", "4", "--checkpoint-every", "3"]) == 0  # fmt: skip
    assert not list(data.glob("block_importance-*"))  # nothing read it, so it was not computed
    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert log and all("importance" not in e for e in log)
    # the static route is chosen by importance: computed (and kept in the data folder) even at weight 0
    assert main(["route", "--teacher", teacher, "--student", str(d / "student"), "--data", str(data), "--out",
                 str(tmp_path / "static"), "--router", "static", "--importance-weight", "0", "--steps", "3",
                 "--batch-size", "4", "--checkpoint-every", "3"]) == 0  # fmt: skip
    assert len(list(data.glob("block_importance-*"))) == 1


def test_block_importance_on_a_sample_split_across_two_processes_and_resumed(stage_inputs, tmp_path):
    """Block importance is measured on a seeded sample of the training examples, each process its share; a
    2-process route run killed after a checkpoint and resumed ends with the weights of an uninterrupted one."""
    from safetensors.torch import load_file

    from pare.training import split_data

    d, teacher = stage_inputs
    data = tmp_path / "data"
    shutil.copytree(d / "data", data, ignore=shutil.ignore_patterns("block_importance-*"))

    def args(out):
        return ["route", "--teacher", teacher, "--student", str(d / "student"), "--data", str(data), "--out",
                str(out), "--importance-examples", "10", "--steps", "12", "--batch-size", "4", "--checkpoint-every",
                "4"]  # fmt: skip

    two_processes(args(tmp_path / "straight"), tmp_path / "straight")
    (cache,) = data.glob("block_importance-*")
    cached = load_file(str(cache))
    rows, importance = cached["rows"], cached["importance"]
    train, _ = split_data(data)
    assert len(rows) == 10 and len(set(rows.tolist())) == 10 and importance.shape[0] == len(train) == 16
    measured = ~importance.isnan().flatten(1).any(1)
    assert measured.nonzero().flatten().tolist() == rows.tolist()  # every sampled row, none other
    student = load_bundle(str(d / "student")).transformer
    direct = block_importance(student, torch.utils.data.Subset(train, rows.tolist()), "cpu", batch_size=2, progress=False)
    assert torch.allclose(importance[rows], direct, rtol=1e-4, atol=1e-7)
    assert two_processes(args(tmp_path / "killed"), tmp_path / "killed", kill_after=4) == 4
    a, b = (load_file(str(tmp_path / r / "model" / "transformer" / "diffusion_pytorch_model.safetensors"))
            for r in ("straight", "killed"))  # fmt: skip
    assert all(torch.equal(a[k], b[k]) for k in a)
    record = json.loads((tmp_path / "killed" / "model" / "pare.json").read_text())["training"]
    assert (record["processes"], record["distributed"], record["steps"]) == (2, "MULTI_CPU", 12)
    log = [json.loads(l) for l in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    assert log and all(e["importance"] > 0 for e in log)  # the cross-entropy on the sampled rows of each batch


def test_bad_route_config():
    from pare import PareError

    for kw, message in [({"budget": 0.0}, "--budget"), ({"router": "x"}, "--router"), ({"mode": "x"}, "--mode"),
                        ({"always_run": 0}, "--always-run")]:  # fmt: skip
        with pytest.raises(PareError, match=message):
            RouteConfig(**kw).validate()


def test_config_of_a_subclass_keeps_every_inherited_entry(tmp_path):
    """`extends_config`: the routed model names only its own entries, yet records, saves and reloads its parents'
    (Wan's and the pruned model's), defaults and non-defaults alike."""
    import inspect

    from pare.profiling import public_config

    names = list(inspect.signature(RoutedWanTransformer3DModel.__init__).parameters)
    assert names[:3] == ["self", "patch_size", "num_attention_heads"] and names[-1] == "step_routes"
    assert {"self_heads", "ffn_dims", "rope_max_seq_len", "router_hidden"} <= set(names)
    model = RoutedWanTransformer3DModel(**{**TINY, "rope_max_seq_len": 32, "eps": 1e-5}, self_heads=[1, 2],
                                        ffn_dims=[16, 32], router_hidden=8, budget=0.5)  # fmt: skip
    assert model.config.rope_max_seq_len == 32 and model.config.qk_norm == "rms_norm_across_heads"
    assert model.blocks[0].attn1.heads == 1 and model.router.net[1].out_features == 8
    model.save_pretrained(tmp_path)
    again = RoutedWanTransformer3DModel.from_pretrained(tmp_path)
    want = {k: list(v) if isinstance(v, tuple) else v for k, v in public_config(model.config).items()}
    assert public_config(again.config) == want
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_the_warm_start_moves_only_what_the_router_reads():
    """Inside routed_blocks_hidden the routed blocks are out of the model (so `.to(device)` leaves them where they are:
    a whole fp32 14B student does not fit on a GPU before FSDP shards it), the router's inputs are exactly those of
    the whole model, and afterwards every block is back."""
    from pare.routing import routed_blocks_hidden

    config = RouteConfig(budget=0.6, mode="topk", always_run=2)
    model = build_routed(tiny_wan(num_layers=5), config, GRID, 7)
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, 3, 2, 8, 8, generator=g), torch.tensor([100, 900]), torch.randn(2, 7, 16, generator=g))
    want = model.router_inputs(*inputs)
    names = dict(model.named_parameters())
    with routed_blocks_hidden(model) as prefix:
        kept = dict(prefix.named_parameters())
        assert {n for n in names if n not in kept} == {n for n in names if n.startswith(("blocks.2.", "blocks.3.",
                                                                                           "blocks.4."))}  # fmt: skip
        assert len(prefix.blocks) == 2 and all(torch.equal(a, b) for a, b in zip(prefix.router_inputs(*inputs), want))
    after = dict(model.named_parameters())
    assert after.keys() == names.keys() and all(after[n] is p for n, p in names.items()) and len(model.blocks) == 5


def test_warm_start_learns_each_inputs_ranking_of_the_blocks():
    """Importance whose ranking depends on the timestep and the prompt: after the warm start alone, the router's
    top-k routes are each example's most important blocks, on examples it was fitted on and on held-out ones."""
    from pare.routing import warm_start

    base = tiny_wan(num_layers=5)
    config = RouteConfig(budget=0.6, mode="topk", warm_start_steps=1000, batch_size=8)
    model = build_routed(base, config, GRID, 7)
    g = torch.Generator().manual_seed(5)
    prompts = torch.randn(2, 7, 16, generator=g)
    ranking = {(100, 0): [1, 2, 3, 4], (100, 1): [3, 4, 1, 2], (900, 0): [2, 3, 4, 1], (900, 1): [4, 1, 2, 3]}
    data, imp = [], torch.zeros(40, 2, 5)
    for i in range(40):
        t, p = (100, 900)[i % 2], (i // 2) % 2
        data.append({"x_t": torch.randn(3, 2, 8, 8, generator=g), "timestep": torch.tensor(t), "sigma": torch.tensor(0.5),
                     "text": prompts[p], "null_text": torch.zeros(7, 16), "v_cond": torch.zeros(3, 2, 8, 8),
                     "v_uncond": torch.zeros(3, 2, 8, 8)})  # fmt: skip
        for rank, block in enumerate(ranking[(t, p)]):  # cond: the prompt's ranking; uncond: the timestep's
            imp[i, 0, block] = 10.0 ** -rank
        for rank, block in enumerate(ranking[(t, 0)]):
            imp[i, 1, block] = 10.0 ** -rank
    imp[:, :, 0] = 1.0  # the always-run block
    imp[7] = float("nan")  # not measured: left out
    record = warm_start(model, data, imp, config, "cpu", progress=False)
    assert record["rows"] + record["held_out_rows"] == 2 * 39 and record["held_out_rows"] == 2 * 3
    before, after = record["held_out_before"], record["held_out_after"]
    assert before["distinct_routes"] == 1 and after["distinct_routes"] >= 2 and after["error"] < 0.1 * before["error"]
    model.eval()
    rows = [i for i in range(40) if i != 7]
    with torch.no_grad():
        for branch, text in ((0, torch.stack([data[i]["text"] for i in rows])), (1, torch.zeros(len(rows), 7, 16))):
            model(torch.stack([data[i]["x_t"] for i in rows]), torch.stack([data[i]["timestep"] for i in rows]), text,
                  return_dict=False)  # fmt: skip
            want = fill_budget(imp[rows, branch, 1:], model.config.block_flops, 1, 0.6)
            assert torch.equal(model.last_route[:, 1:], want), branch
