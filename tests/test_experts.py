"""Step experts (`pare experts`): a few-step model's steps split into groups, each with its own copy of the blocks;
and `pare step-distill --only-steps`, which trains on some of the student's steps only."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pare import PareError, load_bundle
from pare.arch import TokenGrid
from pare.cli import main
from pare.flops import count_flops
from pare.routing.experts import parse_groups, stack_experts
from pare.sampling import Conditioning, SamplerConfig, sample
from pare.stepdistill import SegmentData

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def step_args(d, teacher, out, train_steps=4):
    return ["step-distill", "--teacher", teacher, "--data", str(d / "data"), "--out", str(out), "--steps", "2",
            "--train-steps", str(train_steps), "--batch-size", "4", "--checkpoint-every", "4", "--lr", "1e-3",
            "--warmup-steps", "1", "--eval-every", "0", "--eval-prompts", "2"]  # fmt: skip


@pytest.fixture(scope="module")
def student(stage_inputs, tmp_path_factory):
    """A 2-step student of the tiny teacher (4 optimiser steps: what matters here is its structure and schedule)."""
    d, teacher = stage_inputs
    out = tmp_path_factory.mktemp("experts") / "student"
    assert main(step_args(d, teacher, out)) == 0
    return out / "model"


def test_parse_groups_known_answers_and_refusals():
    assert parse_groups("1,2/3,4", 4) == [[0, 1], [2, 3]]
    assert parse_groups("1/2,3,4", 4) == [[0], [1, 2, 3]]
    assert parse_groups(" 4,1 / 2,3", 4) == [[3, 0], [1, 2]]
    for bad, message in [("1,2/2,3", "exactly once"), ("1,2/3", "exactly once"), ("1,2,3,4", "at least two"),
                         ("1,2/3,x", "step numbers"), ("0,1/2,3", "exactly once"), ("1,2/3,4,5", "exactly once")]:  # fmt: skip
        with pytest.raises(PareError, match=message):
            parse_groups(bad, 4)


def test_steps_mode_needs_a_route_for_every_step():
    from pare.routing.model import RoutedWanTransformer3DModel

    tiny = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=16, freq_dim=16,
                ffn_dim=32, num_layers=2, patch_size=(1, 2, 2), rope_max_seq_len=32)  # fmt: skip
    for table in ({}, {"step_timesteps": [1000.0, 500.0]}, {"step_timesteps": [1000.0], "step_routes": [[0], [1]]}):
        with pytest.raises(ValueError, match="one entry of step_routes per step"):
            RoutedWanTransformer3DModel(**tiny, route_mode="steps", always_run=0, **table)
    model = RoutedWanTransformer3DModel(**tiny, route_mode="steps", always_run=0, step_timesteps=[1000.0, 500.0],
                                        step_routes=[[0], [1]])  # fmt: skip
    # each row's nearest step: 980 -> the first, 700 and 10 -> the second; with a timestep per token, the highest
    # (Wan2.2 TI2V gives the conditioning frame's tokens t = 0)
    assert model.step_route(torch.tensor([980.0, 700.0, 10.0])).tolist() == [[True, False], [False, True], [False, True]]
    assert model.step_route(torch.tensor([[0.0, 1000.0], [600.0, 200.0]])).tolist() == [[True, False], [False, True]]
    assert not any(p.requires_grad for p in model.router.parameters())  # never consulted, never trained
    with pytest.raises(ValueError, match="block numbers in 0..1"):
        RoutedWanTransformer3DModel(**tiny, route_mode="steps", always_run=0, step_timesteps=[1000.0], step_routes=[[2]])


def test_each_step_runs_its_group_which_starts_as_the_model(student):
    """Every group starts as a copy of the model's blocks: at each of its steps the experts give exactly the
    model's output, run only that step's group (the route the sampler and the FLOP counters read) and cost per
    step what the model costs; the blocks' weights are held once per group."""
    bundle = load_bundle(str(student))
    model, levels = bundle.transformer, bundle.sampler_defaults["sigmas"]
    experts = stack_experts([model], levels, [[1], [0]])  # the second step in group 0, the first in group 1
    L = len(model.blocks)
    assert len(experts.blocks) == 2 * L and experts.config.route_mode == "steps"
    block_params = sum(p.numel() for p in model.blocks.parameters())
    assert sum(p.numel() for p in experts.blocks.parameters()) == 2 * block_params
    memory = [p.data_ptr() for p in experts.parameters()]
    assert len(set(memory)) == len(memory)  # each group its own copy: no block shares memory with another
    torch.manual_seed(0)
    c = model.config
    x = torch.randn(2, c.in_channels, 2, 8, 8)
    text = torch.randn(2, 3, c.text_dim)
    for k, level in enumerate(levels):
        t = torch.full((2,), level * 1000.0)
        with torch.no_grad():
            want = model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
            got = experts(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        assert torch.equal(got, want)
        group = 1 - k
        assert experts.last_route.tolist() == [[group * L <= i < (group + 1) * L for i in range(2 * L)]] * 2
    # a batch of both steps: each row through its own group
    t = torch.tensor([levels[0] * 1000.0, levels[1] * 1000.0])
    with torch.no_grad():
        experts(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)
    assert experts.last_route[0, L:].all() and not experts.last_route[0, :L].any()
    assert experts.last_route[1, :L].all() and not experts.last_route[1, L:].any()
    # sampled on the model's own schedule: the same latents, and per step the model's FLOPs (one group's blocks)
    config = SamplerConfig(**bundle.sampler_defaults)
    shape = (c.in_channels, 2, 8, 8)
    grid = TokenGrid(2 // c.patch_size[0], 8 // c.patch_size[1], 8 // c.patch_size[2])
    cond, noise = Conditioning(text[:1]), torch.randn(1, *shape)
    a = sample(model, cond, shape, config, noise=noise, progress=False, flop_report=count_flops(model, grid, 3))
    b = sample(experts, cond, shape, config, noise=noise, progress=False, flop_report=count_flops(experts, grid, 3))
    assert torch.equal(a.latents, b.latents)
    assert [s.flops for s in b.steps] == [s.flops for s in a.steps] == [count_flops(model, grid, 3).total()] * 2


def test_groups_of_other_widths_each_compute_their_own_cut(stage_inputs, student, tmp_path, capsys):
    """One model per group: cuts of the student at two widths; at each step the experts give exactly the output
    of that step's cut, and a step costs that cut's FLOPs. Models that differ in more than width are refused."""
    d, teacher = stage_inputs
    assert main(["profile", "--model", str(student), "--out", str(tmp_path / "prof"), "--videos", "2", "--queries",
                 "16"]) == 0  # fmt: skip
    for name, heads, ffn in (("wide", "0.25", "0.25"), ("narrow", "0.5", "0.75")):
        assert main(["prune", "--model", str(student), "--profile", str(tmp_path / "prof" / "heads.json"), "--heads", heads,
                     "--ffn", ffn, "--calibration-videos", "2", "--out", str(tmp_path / name)]) == 0  # fmt: skip
    out = tmp_path / "experts"
    assert main(["experts", "--model", str(tmp_path / "wide"), "--model", str(tmp_path / "narrow"), "--groups", "1/2",
                 "--out", str(out)]) == 0  # fmt: skip
    bundle = load_bundle(str(out))
    wide, narrow = (load_bundle(str(tmp_path / n)).transformer for n in ("wide", "narrow"))
    assert bundle.manifest["settings"]["models"] == [str(tmp_path / "wide"), str(tmp_path / "narrow")]
    experts, levels = bundle.transformer, bundle.sampler_defaults["sigmas"]
    assert experts.config.ffn_dims == wide.config.ffn_dims + narrow.config.ffn_dims
    torch.manual_seed(0)
    c = experts.config
    x, text = torch.randn(1, c.in_channels, 2, 8, 8), torch.randn(1, 3, c.text_dim)
    grid = TokenGrid(2 // c.patch_size[0], 8 // c.patch_size[1], 8 // c.patch_size[2])
    report = count_flops(experts, grid, 3)
    for level, cut in zip(levels, (wide, narrow)):
        t = torch.full((1,), level * 1000.0)
        with torch.no_grad():
            want = cut(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
            got = experts(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        assert torch.equal(got, want)
        ran = experts.last_route[0].nonzero().flatten().tolist()
        assert report.total(ran) == count_flops(cut, grid, 3).total()
    assert count_flops(wide, grid, 3).total() > count_flops(narrow, grid, 3).total()
    capsys.readouterr()
    wide_narrow = ["--model", str(tmp_path / "wide"), "--model", str(tmp_path / "narrow")]
    for args, message in [(["--model", str(tmp_path / "wide"), "--model", teacher], "samples on no schedule"),
                          (["--model", str(tmp_path / "wide")] * 3, "one per group (2), got 3"),
                          ([*wide_narrow, "--shared-from", "3"], "one of the 2 groups of --groups (1..2), got 3"),
                          ([*wide_narrow, "--shared-from", "0"], "(1..2), got 0")]:  # fmt: skip
        assert main(["experts", *args, "--groups", "1/2", "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert main(["experts", "--model", str(out), "--take", "1", "--shared-from", "1", "--out", str(tmp_path / "bad")]) == 2
    assert "not --take" in capsys.readouterr().err
    # the CLI counts groups from 1 and keeps the choice in the manifest
    assert main(["experts", "--model", str(tmp_path / "wide"), "--model", str(tmp_path / "narrow"), "--groups", "1/2",
                 "--shared-from", "2", "--out", str(tmp_path / "kept")]) == 0  # fmt: skip
    assert load_bundle(str(tmp_path / "kept")).manifest["settings"]["shared_from"] == 2
    with pytest.raises(PareError, match="differ outside their blocks"):  # a trained cut: its head has moved
        moved_head = load_bundle(str(tmp_path / "narrow")).transformer
        with torch.no_grad():
            moved_head.proj_out.weight.add_(1e-3)
            moved_head.condition_embedder.time_proj.bias.add_(1e-3)
        stack_experts([wide, moved_head], levels, [[0], [1]])
    # unless told whose shared parts to keep: that group's steps then compute exactly what its model does
    for g, own in enumerate((wide, moved_head)):
        kept = stack_experts([wide, moved_head], levels, [[0], [1]], shared_from=g)
        t = torch.full((1,), levels[g] * 1000.0)
        with torch.no_grad():
            want = own(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
            got = kept(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        assert torch.equal(got, want)
        assert torch.equal(kept.proj_out.weight, own.proj_out.weight)
    with pytest.raises(PareError, match="0-based group of the 2, got 2"):
        stack_experts([wide, moved_head], levels, [[0], [1]], shared_from=2)
    with pytest.raises(PareError, match="differ in more than their widths"):
        other = load_bundle(teacher).transformer  # another model's structure, not a cut of the student's
        other.register_to_config(freq_dim=other.config.freq_dim * 2)
        stack_experts([wide, other], levels, [[0], [1]])


def test_pare_experts_writes_a_folder_that_step_distill_trains_group_by_group(stage_inputs, student, tmp_path, capsys):
    """The folder loads back with the model's sampler; `pare step-distill --init-from` it with `--only-steps 2`
    trains the second step's group and leaves the other group's blocks exactly as they were; without it both move."""
    d, teacher = stage_inputs
    out = tmp_path / "experts"
    assert main(["experts", "--model", str(student), "--groups", "1/2", "--out", str(out)]) == 0
    bundle = load_bundle(str(out))
    assert bundle.kind == "pare:step-experts" and bundle.manifest["settings"] == {"groups": [[1], [2]], "models": [str(student)]}
    assert bundle.sampler_defaults == load_bundle(str(student)).sampler_defaults
    L = len(load_bundle(str(student)).transformer.blocks)
    before = bundle.transformer.state_dict()
    # `pare flops` counts every group's blocks, and per step the one group it runs: the student's forward
    size = ["--frames", "2", "--height", "8", "--width", "8", "--json"]
    capsys.readouterr()
    assert main(["flops", "--model", str(out), *size]) == 0
    flops = json.loads(capsys.readouterr().out)
    assert main(["flops", "--model", str(student), *size]) == 0
    single = json.loads(capsys.readouterr().out)
    one, shared = single["total"], single["embed"] + single["head"]
    assert flops["per_step"] == [one, one] and flops["total"] == 2 * one - shared
    # --dtype bf16: the weights are stored in it, each the fp32 folder's rounded (the unused router is drawn anew),
    # but for those diffusers keeps in fp32 (the time embedder, the modulation tables and norms) and the router
    assert main(["experts", "--model", str(student), "--groups", "1/2", "--dtype", "bf16", "--out", str(tmp_path / "half")]) == 0
    half = load_file(tmp_path / "half" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert half.keys() == before.keys()
    assert all(torch.equal(v, before[k].to(v.dtype)) for k, v in half.items() if not k.startswith("router."))
    kept = ("router.", "time_embedder", "scale_shift_table", "norm2")  # the tiny model has no norm1/norm3 weights
    assert {k for k, v in half.items() if v.dtype != torch.bfloat16} == {k for k in half if any(n in k for n in kept)}

    def moved(run) -> tuple[bool, bool, bool]:
        """Whether group 0's blocks, group 1's blocks, the shared parts changed in training."""
        after = load_bundle(str(run / "model")).transformer.state_dict()
        group = lambda g: [k for k in before if k.startswith("blocks.") and g * L <= int(k.split(".")[1]) < (g + 1) * L]  # noqa: E731
        shared = [k for k in before if not k.startswith(("blocks.", "router."))]
        return tuple(any(not torch.equal(before[k], after[k]) for k in keys) for keys in (group(0), group(1), shared))

    assert main([*step_args(d, teacher, tmp_path / "first", 3), "--init-from", str(out), "--only-steps", "2"]) == 0
    assert moved(tmp_path / "first") == (False, True, False)  # step 1 computes exactly what it did
    record = json.loads((tmp_path / "first" / "model" / "pare.json").read_text())["training"]
    # 2 held-out videos x step 2; no rollout from the first step, so no final latents
    assert record["val_end"]["examples"] == 2 and record["val_end"]["final_error"] is None
    assert "of steps 2 only" in capsys.readouterr().out
    assert main([*step_args(d, teacher, tmp_path / "both", 3), "--init-from", str(out)]) == 0
    assert moved(tmp_path / "both") == (True, True, True)
    capsys.readouterr()
    assert main([*step_args(d, teacher, tmp_path / "shift", 3), "--init-from", str(out), "--flow-shift", "2"]) == 2
    assert "holds step experts, routed by its own levels" in capsys.readouterr().err
    assert main(["distill", "--teacher", teacher, "--student", str(out), "--data", str(d / "data"), "--out",
                 str(tmp_path / "align"), "--steps", "2", "--batch-size", "2", "--align-weight", "1"]) == 2  # fmt: skip
    assert "pairs each student block with the teacher's" in capsys.readouterr().err
    trained = load_bundle(str(tmp_path / "both" / "model"))
    assert trained.transformer.config.route_mode == "steps" and trained.sampler_defaults["sigmas"] == bundle.sampler_defaults["sigmas"]
    # refusals: one line, exit 2
    capsys.readouterr()
    for args, message in [(["--model", teacher, "--groups", "1/2"], "samples on no schedule of its own"),
                          (["--model", str(student), "--groups", "1,2"], "at least two groups"),
                          (["--model", str(student), "--groups", "1/3"], "exactly once"),
                          (["--model", str(out), "--groups", "1/2"], "unrouted model")]:  # fmt: skip
        assert main(["experts", *args, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_take_gives_a_group_back_as_a_plain_model_that_prunes_and_stacks_again(stage_inputs, student, tmp_path, capsys):
    """`pare experts --take G`: group G of trained experts as a plain model that computes at its steps exactly what
    the experts do, keeps their sampler and lineage, and is cut by `pare prune`; the cut stacks with the other group
    again (pruning leaves the shared parts as they are) and then computes the cut's output at its step."""
    from pare.stepdistill import few_step_lineage

    d, teacher = stage_inputs
    assert main(["experts", "--model", str(student), "--groups", "2/1", "--out", str(tmp_path / "experts")]) == 0
    assert main([*step_args(d, teacher, tmp_path / "run", 2), "--init-from", str(tmp_path / "experts")]) == 0
    trained = load_bundle(str(tmp_path / "run" / "model"))
    experts, levels = trained.transformer, trained.sampler_defaults["sigmas"]
    for g, step in ((1, 2), (2, 1)):  # --groups 2/1: group 1 runs step 2, group 2 runs step 1
        assert main(["experts", "--model", str(tmp_path / "run" / "model"), "--take", str(g), "--out",
                     str(tmp_path / f"g{g}")]) == 0  # fmt: skip
        out = capsys.readouterr().out
        assert f"group {g} of" in out and f"(steps {step})" in out
    torch.manual_seed(0)
    c = experts.config
    x, text = torch.randn(2, c.in_channels, 2, 8, 8), torch.randn(2, 3, c.text_dim)
    groups = {}
    for g, step in ((1, 2), (2, 1)):
        bundle = load_bundle(str(tmp_path / f"g{g}"))
        groups[g] = bundle.transformer
        assert bundle.kind == "pare:expert-group" and bundle.manifest["settings"] == {"group": g, "steps": [step]}
        assert bundle.manifest["sampler"] == trained.sampler_defaults  # its own, not inherited from its base
        assert few_step_lineage(str(tmp_path / f"g{g}")) == few_step_lineage(str(student)) == teacher
        assert len(groups[g].blocks) == len(experts.blocks) // 2 and not hasattr(groups[g], "router")
        t = torch.full((2,), levels[step - 1] * 1000.0)
        with torch.no_grad():
            want = experts(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
            assert torch.equal(groups[g](hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0], want)
    assert not torch.equal(groups[1].blocks[0].ffn.net[2].weight, groups[2].blocks[0].ffn.net[2].weight)  # trained apart
    # calibrated on the experts' trajectories at its own steps: group 1 (step 2) meets x_t of the experts' step 1
    from pare.profiling.calibration import calibrate, collect, default_prompts

    g1 = load_bundle(str(tmp_path / "g1"))
    sampler = SamplerConfig(**{**g1.sampler_defaults, "seed": 3})
    prompts, shape = default_prompts(g1, None, 2, 0), g1.default_shape
    calib = calibrate(g1, prompts, sampler, [1], shape)
    want = calibrate(trained, prompts, sampler, [1], shape)
    assert torch.equal(calib.x_t, want.x_t) and calib.step.tolist() == [1, 1]
    alone = collect(groups[1], Conditioning(calib.text), calib.x_t.shape[1:], sampler, [1])
    assert not torch.equal(alone.x_t, calib.x_t)  # the group alone would have run step 1 itself
    # cut group 2 (step 1) and stack it with group 1 again
    assert main(["profile", "--model", str(tmp_path / "g2"), "--out", str(tmp_path / "prof"), "--videos", "2",
                 "--queries", "16"]) == 0  # fmt: skip
    assert json.loads((tmp_path / "prof" / "heads.json").read_text())["settings"]["timesteps"] == [0]  # step 1 only
    capsys.readouterr()
    assert main(["profile", "--model", str(tmp_path / "g2"), "--out", str(tmp_path / "prof2"), "--timesteps", "0,1"]) == 2
    assert "runs steps 0 (0-based) only" in capsys.readouterr().err
    assert main(["prune", "--model", str(tmp_path / "g2"), "--profile", str(tmp_path / "prof" / "heads.json"), "--heads",
                 "0.5", "--ffn", "0.5", "--calibration-videos", "2", "--out", str(tmp_path / "cut")]) == 0  # fmt: skip
    assert main(["experts", "--model", str(tmp_path / "cut"), "--model", str(tmp_path / "g1"), "--groups", "1/2",
                 "--out", str(tmp_path / "again")]) == 0  # fmt: skip
    again, cut = load_bundle(str(tmp_path / "again")).transformer, load_bundle(str(tmp_path / "cut")).transformer
    for level, model in zip(levels, (cut, groups[1])):
        t = torch.full((2,), level * 1000.0)
        with torch.no_grad():
            want = model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
            assert torch.equal(again(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0], want)
    assert sum(p.numel() for p in cut.blocks.parameters()) < sum(p.numel() for p in groups[2].blocks.parameters())
    capsys.readouterr()
    for args, message in [(["--model", str(student), "--take", "1"], "takes a `pare experts` folder"),
                          (["--model", str(tmp_path / "experts"), "--take", "3"], "has groups 1..2"),
                          (["--model", str(tmp_path / "experts"), "--take", "1", "--groups", "1/2"], "not both"),
                          (["--model", str(student)], "(take a group out of them)\n"),
                          (["--model", str(tmp_path / "experts"), "--model", str(student), "--take", "1"], "reads one --model")]:  # fmt: skip
        assert main(["experts", *args, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()
    assert main(["experts", "--model", str(tmp_path / "run" / "model"), "--take", "2", "--out", str(tmp_path / "g1")]) == 0
    assert load_bundle(str(tmp_path / "g1")).manifest["settings"]["group"] == 2  # its own earlier output: replaced


def test_only_steps_serves_those_segments_and_is_refused_where_it_cannot_act(stage_inputs, tmp_path, capsys):
    d, teacher = stage_inputs
    full = SegmentData(d / "data", [0, 2])
    second = SegmentData(d / "data", [0, 2], segments=[1])
    assert len(second) == len(full) // 2 == 6 and second.offsets == [0, 2, 4, 6]
    for i in range(len(second)):
        s, p, k = second.locate(i)
        j = full.offsets[s] + 2 + p  # the same video's second segment in the full set
        assert k == 1 and full.locate(j) == (s, p, 1)
        assert all(torch.equal(second[i][key], full[j][key]) for key in ("x_t", "target", "timestep", "final"))
    for extra, message in [(["--only-steps", "3"], "distinct steps in 1..2"), (["--only-steps", "1,1"], "distinct steps"),
                           (["--only-steps", "x"], "step numbers such as 3,4"),
                           (["--only-steps", "2", "--rollout-weight", "1"], "leave out --rollout-weight")]:  # fmt: skip
        capsys.readouterr()
        assert main([*step_args(d, teacher, tmp_path / "x"), *extra]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_step_hybrid_runs_each_model_at_its_steps(stage_inputs, student, tmp_path, capsys):
    """scripts/step_hybrid.py: SS reproduces the student's own videos and scores; SC is the student's Euler step
    from the noise, then the cut's step to 0 (by hand); a pattern of the wrong length is refused."""
    import importlib.util

    from pare.generate import generate
    from pare.sampling import initial_noise
    from pare.shapes.domain import heldout_prompts
    from pare.shapes.evaluate import evaluate_videos

    d, teacher = stage_inputs
    assert main([*step_args(d, teacher, tmp_path / "other", 2), "--seed", "1"]) == 0  # a second model, same levels
    spec = importlib.util.spec_from_file_location("step_hybrid", SCRIPTS / "step_hybrid.py")
    hybrid = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hybrid)
    a, b = load_bundle(str(student)), load_bundle(str(tmp_path / "other" / "model"))
    prompts = heldout_prompts(3)
    own = generate(a, prompts, SamplerConfig(**a.sampler_defaults, seed=0), progress=False).videos
    assert np.array_equal(hybrid.hybrid_videos(a, b, "SS", prompts), own)
    (l1, l2), text = a.sampler_defaults["sigmas"], a.prompt_encoder.encode(prompts, "cpu", torch.float32)
    shape = (a.transformer.config.out_channels, *a.latent.latent_shape(*a.default_shape))
    x = initial_noise(shape, [0, 1, 2])
    with torch.no_grad():
        for model, level, after in ((a.transformer, l1, l2), (b.transformer, l2, 0.0)):
            t = torch.full((3,), level * 1000.0)
            x = x + (after - level) * model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    assert np.array_equal(hybrid.hybrid_videos(a, b, "SC", prompts), np.asarray(a.decoder.decode(x)))
    out = tmp_path / "hybrid.json"
    assert hybrid.main(["--student", str(student), "--cut", str(tmp_path / "other" / "model"), "--pattern", "SS",
                        "--prompts", "3", "--out", str(out)]) == 0  # fmt: skip
    scores = evaluate_videos(own, prompts)
    assert json.loads(out.read_text())["patterns"]["SS"] == {k: scores[k] for k in hybrid.SCORES}
    # the weakest pattern against the all-S one: lowest worst change, then lowest mean
    rows = {"SSSS": dict.fromkeys(hybrid.SCORES, 90.0)}
    for p, worst, other in (("CSSS", -4.0, 0.0), ("SCCS", -4.0, -1.0), ("SSSC", -2.0, -3.0)):
        rows[p] = {k: 90.0 + (worst if k == "count" else other) for k in hybrid.SCORES}
    assert hybrid.weakest(rows) == "2,3"
    rows["CSSC"] = {k: 90.0 + (-5.0 if k == "speed" else 1.0) for k in hybrid.SCORES}
    assert hybrid.weakest(rows) == "1,4"
    capsys.readouterr()
    assert hybrid.main(["--student", str(student), "--cut", str(student), "--pattern", "SSS"]) == 2
    assert "S or C for each of the 2 steps" in capsys.readouterr().err


def test_two_processes_train_step_experts_and_one_group(stage_inputs, student, tmp_path):
    """Under torchrun a group with no rows in a process's share of the batch, and the router the steps' table stands
    in for, get no gradient: the run still trains (and with --only-steps, only that step's group moves)."""
    from conftest import two_processes

    d, teacher = stage_inputs
    out = tmp_path / "experts"
    assert main(["experts", "--model", str(student), "--groups", "1/2", "--out", str(out)]) == 0
    before = load_bundle(str(out)).transformer.state_dict()
    L = len(load_bundle(str(student)).transformer.blocks)
    two_processes([*step_args(d, teacher, tmp_path / "two", 3), "--init-from", str(out), "--only-steps", "1"],
                  tmp_path / "two")  # fmt: skip
    bundle = load_bundle(str(tmp_path / "two" / "model"))
    after = bundle.transformer.state_dict()
    assert bundle.manifest["training"]["processes"] == 2
    changed = {int(k.split(".")[1]) // L for k in before if k.startswith("blocks.") and not torch.equal(before[k], after[k])}
    assert changed == {0}
