import json
import re

import pytest
import torch

from conftest import tiny_wan
from pare import arch, load_bundle
from pare.arch import TokenGrid
from pare.cli import main
from pare.components import EmbeddingsFile
from pare.gates import Gates, gated
from pare.profiling import ProfileConfig, load_profile, profile
from pare.profiling.calibration import Calibration
from pare.profiling.importance import block_removal_error, removal_error, taylor_importance
from pare.profiling.roles import ROLES, apply_rope, probe_extra_bytes, head_stats, probe_self_attention, role_of, stack_records

GRID = TokenGrid(3, 4, 4)  # 3 frames of 4x4 tokens: input (3, 8, 8) pixels with patch (1, 2, 2)


def capture_attn1(model, x, t, e):
    """q, k, v (after norm and RoPE) and the output of block 0's self-attention, by hooks."""
    got = {}
    attn = model.blocks[0].attn1
    hooks = [
        attn.register_forward_pre_hook(lambda m, a, k: got.update(x=a[0], rope=a[3]), with_kwargs=True),
        attn.register_forward_hook(lambda m, a, o: got.update(out=o)),
    ]
    with torch.no_grad():
        model(x, t, e)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        q = attn.norm_q(attn.to_q(got["x"])).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(attn.to_k(got["x"])).unflatten(2, (attn.heads, -1))
        v = attn.to_v(got["x"]).unflatten(2, (attn.heads, -1))
    return apply_rope(q, *got["rope"]), apply_rope(k, *got["rope"]), v, got["out"], attn


@pytest.fixture(scope="module")
def captured():
    model = tiny_wan()
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(2, 3, 3, 8, 8, generator=g), torch.randn(2, 7, 16, generator=g)
    return model, x, e, capture_attn1(model, x, torch.tensor([400, 900]), e)


def test_captured_qkv_reproduce_the_attention_output(captured):
    _, _, _, (q, k, v, out, attn) = captured
    A = torch.einsum("bqhd,bkhd->bhqk", q, k).mul(q.shape[-1] ** -0.5).softmax(-1)
    o = torch.einsum("bhqk,bkhd->bqhd", A, v).flatten(2)
    torch.testing.assert_close(attn.to_out[0](o), out, rtol=0, atol=1e-5)


def full_matrix_stats(q, k, v, grid):
    """The statistics from the whole S x S attention matrix, written independently of head_stats."""
    S = grid.tokens
    A = torch.einsum("bqhd,bkhd->bhqk", q, k).mul(q.shape[-1] ** -0.5).softmax(-1)  # (B, H, S, S)
    frame = torch.arange(S) // grid.tokens_per_frame
    pos = torch.arange(S) % grid.tokens_per_frame
    own = (A * (frame[:, None] == frame[None])).sum(-1).mean(-1)
    samepos = (A * ((pos[:, None] == pos[None]) & (frame[:, None] != frame[None]))).sum(-1).mean(-1)
    return {"own": own, "samepos": samepos}


def test_sampled_queries_match_the_full_matrix(captured):
    _, _, _, (q, k, v, _, _) = captured
    full = full_matrix_stats(q, k, v, GRID)
    every = head_stats(q, k, v, GRID, torch.arange(GRID.tokens))
    for key in full:
        torch.testing.assert_close(every[key], full[key], rtol=0, atol=1e-6)  # exact when all queries are sampled
    few = head_stats(q, k, v, GRID, torch.randperm(GRID.tokens, generator=torch.Generator().manual_seed(1))[:16])
    for key in full:
        assert (few[key] - full[key]).abs().max() < 0.05  # close with a third of the queries


def test_roles_on_constructed_heads():
    """Head 0 looks only inside its frame, head 1 only at its own position in the other frames."""
    grid, d = TokenGrid(4, 2, 2), 8
    S = grid.tokens
    frame, pos = grid.frame_of_token(), grid.position_of_token()
    q = torch.zeros(1, S, 2, d)
    k = torch.zeros(1, S, 2, d)
    q[0, :, 0, :4] = torch.nn.functional.one_hot(frame, 4).float() * 40  # head 0: key frame code = query frame code
    k[0, :, 0, :4] = torch.nn.functional.one_hot(frame, 4).float() * 40
    q[0, :, 1, :4] = torch.nn.functional.one_hot(pos, 4).float() * 40  # head 1: position code, own frame masked off
    k[0, :, 1, :4] = torch.nn.functional.one_hot(pos, 4).float() * 40
    k[0, :, 1, 4:] = 0
    v = torch.randn(1, S, 2, d)
    stats = head_stats(q, k, v, grid, torch.arange(S))
    assert stats["own"][0, 0] > 0.99 and stats["samepos"][0, 1] > 0.7
    roles = role_of(stats["own"][0], stats["samepos"][0], grid)
    assert [ROLES[r] for r in roles] == ["spatial", "temporal"]
    uniform = head_stats(torch.zeros(1, S, 1, d), torch.zeros(1, S, 1, d), v[:, :, :1], grid, torch.arange(S))
    assert ROLES[role_of(uniform["own"][0], uniform["samepos"][0], grid)[0]] == "mixed"


def test_probe_matches_direct_stats(captured):
    model, x, e, (q, k, v, _, _) = captured
    with torch.no_grad(), probe_self_attention(model, GRID, 10_000, torch.Generator()) as records:
        model(x, torch.tensor([400, 900]), e)
    stats = stack_records(records)
    direct = head_stats(q, k, v, GRID, torch.arange(GRID.tokens))
    torch.testing.assert_close(stats["own"][:, 0], direct["own"], rtol=0, atol=1e-6)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def tiny_calibration(n=4):
    g = torch.Generator().manual_seed(3)
    return Calibration(torch.randn(n, 3, 3, 8, 8, generator=g), torch.tensor([900, 600, 300, 100][:n]),
                       torch.tensor([0.9, 0.6, 0.3, 0.1][:n]), torch.randn(n, 7, 16, generator=g),
                       torch.randn(n, 3, 3, 8, 8, generator=g), torch.arange(n), torch.arange(n))  # fmt: skip


def test_taylor_matches_finite_differences():
    # float64 (diffusers' FP32LayerNorm still rounds to fp32 inside: hence a moderate step and tolerance)
    model = tiny_wan().double()
    calib = tiny_calibration()
    calib.x_t, calib.x_0, calib.sigma = calib.x_t.double(), calib.x_0.double(), calib.sigma.double()
    taylor = taylor_importance(model, calib, batch_size=4)

    def loss(block, head, value):
        gates = Gates.ones(model)
        gates.self_heads[block][head] = value
        with torch.no_grad(), gated(model, gates):
            out = model(**calib.inputs(slice(0, 4), "cpu", torch.float64))[0]
        return ((out - calib.target_velocity(slice(0, 4))) ** 2).mean().item()

    eps = 1e-3
    for block, head in [(1, 0), (0, 1)]:
        fd = (loss(block, head, 1 + eps) - loss(block, head, 1 - eps)) / (2 * eps)
        assert taylor["self"][block, head].item() == pytest.approx(abs(fd), rel=2e-3)
    assert taylor["ffn"][0].shape == (32,) and taylor["cross"].shape == (2, 2)


def test_taylor_backward_is_checkpointed_and_unchanged_by_it():
    """Gradient checkpointing (on by default) keeps far fewer activations for the backward, gives the same scores
    as the plain backward (the gates act in the recomputed forward too), and is switched off afterwards."""
    model = tiny_wan().double()
    calib = tiny_calibration()
    calib.x_t, calib.x_0, calib.sigma = calib.x_t.double(), calib.x_0.double(), calib.sigma.double()

    def saved_and_scores(**kwargs):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            scores = taylor_importance(model, calib, batch_size=4, **kwargs)
        return sum(saved), scores

    n_plain, plain = saved_and_scores(checkpointing=False)
    n_ckpt, checkpointed = saved_and_scores()
    assert n_ckpt < 0.5 * n_plain, (n_ckpt, n_plain)  # inside the blocks nothing is kept for the backward
    assert not model.is_gradient_checkpointing
    for key in ("self", "cross"):
        assert torch.allclose(checkpointed[key], plain[key], rtol=1e-10, atol=0)
    assert all(torch.allclose(a, b, rtol=1e-10, atol=0) for a, b in zip(checkpointed["ffn"], plain["ffn"]))


def test_removal_error_is_the_output_change():
    model = tiny_wan()
    calib = tiny_calibration()
    err = removal_error(model, calib, batch_size=2)
    inputs = calib.inputs(slice(0, 4), "cpu", torch.float32)
    with torch.no_grad():
        full = model(**inputs)[0]
        gates = Gates.ones(model)
        gates.self_heads[0][1] = 0
        with gated(model, gates):
            cut = model(**inputs)[0]
    assert err[0, 1].item() == pytest.approx((((cut - full) ** 2).sum() / (full**2).sum()).item(), rel=1e-4)


def test_block_removal_error_is_the_block_output_change():
    model = tiny_wan()
    calib = tiny_calibration()
    err = block_removal_error(model, calib, batch_size=3)  # batches of 3 and 1: sums over batches
    inputs = calib.inputs(slice(0, len(calib)), "cpu", torch.float32)
    seen = {}

    def keep(module, args, output):
        seen["out"] = output

    for block, head in [(0, 1), (1, 0)]:
        handle = arch.blocks(model)[block].register_forward_hook(keep)
        with torch.no_grad():
            model(**inputs)
            full = seen["out"]
            gates = Gates.ones(model)
            gates.self_heads[block][head] = 0
            with gated(model, gates):
                model(**inputs)
        handle.remove()
        cut = seen["out"]
        want = ((cut.double() - full.double()) ** 2).sum() / (full.double() ** 2).sum()
        assert err[block, head].item() == pytest.approx(want.item(), rel=1e-4)
    # a head whose output projection is zero changes nothing
    with torch.no_grad():
        attn = arch.self_attention(arch.blocks(model)[1])
        width = attn.to_out[0].weight.shape[1] // arch.num_heads(attn)
        attn.to_out[0].weight[:, width : 2 * width] = 0
    assert block_removal_error(model, calib, batch_size=4)[1, 1].item() == 0.0


def test_profile_end_to_end(tmp_path, pixel_model_dir, embeds_file):
    bundle = load_bundle(str(pixel_model_dir))
    encoder = EmbeddingsFile(embeds_file)
    config = ProfileConfig(videos=2, steps=4, timesteps=(0, 2, 3), queries=8, batch_size=3)
    result = profile(bundle, config, encoder.prompts, encoder=encoder, shape=(3, 8, 8), progress=False)
    from pare.profiling import write_profile

    json_path, png = write_profile(result, tmp_path)
    data = load_profile(json_path)
    assert png.stat().st_size > 1000
    assert data["calibration"]["inputs"] == 6 and len(data["blocks"]) == 2
    head = data["blocks"][0]["heads"][0]
    assert head["role"] in ROLES and 0 <= head["stats"]["own"] <= 1 and head["removal_error"] > 0
    assert set(head["stability"]) == {"timesteps", "prompts"} and len(data["blocks"][1]["ffn_taylor"]) == 32
    assert sum(data["role_counts"].values()) == 4


def test_profile_cli_and_bad_input(tmp_path, pixel_model_dir, embeds_file, capsys):
    args = ["profile", "--model", str(pixel_model_dir), "--embeds", str(embeds_file), "--frames", "3", "--height",
            "8", "--width", "8", "--videos", "2", "--steps", "3", "--timesteps", "0,2", "--queries", "8"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "p")]) == 0
    assert json.loads((tmp_path / "p" / "heads.json").read_text())["settings"]["timesteps"] == [0, 2]
    for extra, message in [(["--timesteps", "0,x"], "--timesteps must be"), (["--timesteps", "0,9"], "step indices in"),
                           (["--queries", "0"], "--queries must be"),
                           (["--removal", "sideways"], "--removal must be one of block, model, none")]:  # fmt: skip
        assert main([*args, *extra, "--out", str(tmp_path / "q")]) == 2
        assert message in capsys.readouterr().err
    assert main(["profile", "--model", str(pixel_model_dir), "--frames", "3", "--height", "8", "--width", "8",
                 "--out", str(tmp_path / "r")]) == 2  # fmt: skip
    assert "pass --prompts FILE" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{}")
    from pare import PareError

    with pytest.raises(PareError, match="not a PARE head profile"):
        load_profile(tmp_path / "bad.json")


def test_probe_memory_at_14b_480p_is_small(capsys):
    assert main(["profile", "--model", "wan2.1-t2v-14b", "--frames", "81", "--height", "480", "--width", "832",
                 "--batch-size", "1", "--memory-estimate"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    extra, weights = (float(x) for x in re.findall(r"([0-9.]+) GiB", out))
    assert extra < 0.05 * weights
    # the formula, term by term, on a small case: rotated q and k (bf16), one fp32 k/v chunk, four fp32 row tensors
    assert probe_extra_bytes(2, 4, TokenGrid(2, 2, 2), 8, 1) == 2 * 8 * 2 * 4 * 2 + 2 * 8 * 2 * 4 * 4 + 4 * 2 * 8 * 8 * 4
