import json
import os
import re

import pytest
import torch

from conftest import TINY, assert_pipeline_matches_sampler, tiny_pipeline_parts, tiny_wan
from pare import PareError, arch, load, load_bundle
from pare.arch import TokenGrid
from pare.cli import main
from pare.flops import count_flops
from pare.profiling import ProfileConfig, fingerprint, profile, write_profile
from pare.profiling.calibration import Calibration
from pare.pruning import PruneConfig, prune_model
from pare.pruning.model import PrunedWanTransformer3DModel
from pare.pruning.plan import WidthPlan, allocate, plan_from_profile
from pare.pruning.prune import norm_scales, prune

X = torch.randn(2, 3, 2, 8, 8, generator=torch.Generator().manual_seed(0))
T = torch.tensor([500, 100])
E = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(1))


def out(model, x=X, e=E):
    with torch.no_grad():
        return model(x, T, e, return_dict=False)[0]


def full_plan(model):
    n = len(model.blocks)
    return WidthPlan([[0, 1]] * n, [[0, 1]] * n, [list(range(model.config.ffn_dim))] * n)


def test_ratio_zero_equals_diffusers_model():
    model = tiny_wan()
    pruned, report = prune(model, full_plan(model))
    assert isinstance(pruned, PrunedWanTransformer3DModel)
    assert (out(pruned) - out(model)).abs().max() <= 1e-5
    assert report.params_after == report.params_before


def test_save_load_identical_and_counts_drop(tmp_path):
    model = tiny_wan()
    plan = WidthPlan([[1], [0, 1]], [[0, 1], [0]], [list(range(0, 32, 2)), list(range(32))])
    pruned, report = prune(model, plan)
    pruned.save_pretrained(tmp_path / "p")
    loaded = load(str(tmp_path / "p"))
    assert type(loaded) is PrunedWanTransformer3DModel and torch.equal(out(loaded), out(pruned))
    assert loaded.config.self_heads == [1, 2] and loaded.config.ffn_dims == [16, 32]
    # parameters: head 1 of block 0 (q, k, v rows + biases, out columns, 2 norm weights) and cross head 1 of
    # block 1, and 16 FFN channels of block 0 (up rows + bias, down columns)
    d, h = 24, 12
    head = 3 * (h * d + h) + d * h + 2 * h
    assert report.params_before - report.params_after == 2 * head + 16 * (d + 1) + 16 * d
    grid = TokenGrid(2, 4, 4)
    full, small = count_flops(model, grid, 7), count_flops(pruned, grid, 7)
    S, L = grid.tokens, 7
    assert full.blocks[0].self_attn - small.blocks[0].self_attn == 2 * S * S * (h + h)
    assert full.blocks[0].ffn - small.blocks[0].ffn == 2 * S * 2 * d * 16
    assert full.blocks[1].cross_proj - small.blocks[1].cross_proj == 2 * (S * 2 * d * h + L * 2 * d * h)
    # meta-device construction from the config alone
    meta = load(str(tmp_path / "p"), weights=False)
    assert next(meta.parameters()).is_meta and count_flops(meta, grid, 7).total() == small.total()


def test_pruned_model_shares_no_storage_and_copies_each_tensor_once(monkeypatch):
    """The pruned model owns its tensors (training it leaves the original alone), and pruning copies each kept
    value once: sliced tensors are new already, only the unsliced rest (embeddings, norms, head) is cloned."""
    model = tiny_wan()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = WidthPlan([[1], [0, 1]], [[0, 1], [0]], [list(range(0, 32, 2)), list(range(32))])
    cloned = []
    clone = torch.Tensor.clone

    def record(t, *args, **kwargs):
        if not t.is_meta:  # (diffusers builds the pruned structure on the meta device: no memory)
            cloned.append(t.numel())
        return clone(t, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "clone", record)
    pruned, _ = prune(model, plan)
    monkeypatch.undo()
    # what the plan slices: q/k/v (and image k/v) rows, output columns, q/k norms, FFN up rows and down columns
    sliced = re.compile(r"attn\d\.(to_[qkv]|add_[kv]_proj|norm_(q|k|added_k))\.|to_out\.0\.weight|ffn\.net\.(0\.proj|2\.weight)")
    unsliced = sum(v.numel() for k, v in pruned.state_dict().items() if not sliced.search(k))
    assert sum(cloned) == unsliced > 0
    ours = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    assert not ours & {t.untyped_storage().data_ptr() for t in pruned.state_dict().values()}
    with torch.no_grad():
        for p in pruned.parameters():
            p.add_(1.0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_in_place_pruning_gives_the_same_model_and_frees_what_it_slices():
    """`pare prune` slices the model it loaded in place: the same weights as a copying prune (the norm scales
    applied afterwards equal those applied while slicing), the original's sliced tensors emptied, and nothing
    of what is kept copied."""
    from pare.pruning.prune import apply_norm_scales

    plan = WidthPlan([[1], [0, 1]], [[0, 1], [0]], [list(range(0, 32, 2)), list(range(32))])
    batches = [dict(hidden_states=X, timestep=T, encoder_hidden_states=E)]
    model = tiny_wan()
    scales = norm_scales(model, plan, batches)
    want, _ = prune(model, plan, scales)
    kept = {k: v.data_ptr() for k, v in model.state_dict().items()}
    got, report = prune(model, plan, in_place=True)
    apply_norm_scales(got, plan, scales, model.config.num_attention_heads)
    assert got.state_dict().keys() == want.state_dict().keys()
    assert all(torch.equal(v, want.state_dict()[k]) for k, v in got.state_dict().items())
    assert report.params_after == sum(p.numel() for p in want.parameters()) < report.params_before
    left = model.state_dict()
    sliced = {k for k in left if left[k].numel() == 0}
    assert sliced and all("blocks." in k for k in sliced)  # embeddings, output head: untouched
    # everything not sliced is shared, not copied
    assert all(got.state_dict()[k].data_ptr() == kept[k] for k in left if k not in sliced)


def test_pruned_transformer_runs_in_wan_pipeline():
    parts = tiny_pipeline_parts()
    transformer = parts[2]
    n = len(transformer.blocks)
    pruned, _ = prune(transformer, WidthPlan([[1]] * n, [[0]] * n, [list(range(16))] * n))
    assert_pipeline_matches_sampler(pruned.eval(), parts)


def test_cache_hooks_still_find_the_blocks():
    """diffusers' First Block Cache on a pruned model: the same input twice skips the later blocks (their FFNs
    do not run) and returns the cached result; at threshold 0 another input is computed in full and gives the
    uncached model's output (diffusers skips when the first block's change is not above the threshold, so an
    identical input is skipped even at 0)."""
    from diffusers import FirstBlockCacheConfig

    model = tiny_wan(num_layers=3)
    pruned, _ = prune(model, WidthPlan([[0]] * 3, [[1]] * 3, [list(range(8))] * 3))
    x2 = X * 1.01
    plain, plain2 = out(pruned), out(pruned, x2)
    calls = [0] * 3
    for i, block in enumerate(pruned.blocks):
        block.ffn.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    for threshold, x, second_calls, want in ((0.2, X, [2, 1, 1], plain), (0.0, x2, [2, 2, 2], plain2)):
        calls[:] = [0] * 3
        pruned.enable_cache(FirstBlockCacheConfig(threshold=threshold))
        with pruned.cache_context("cond"):
            first = out(pruned)
            assert calls == [1, 1, 1]
            second = out(pruned, x)
        pruned.disable_cache()
        assert calls == second_calls, threshold
        torch.testing.assert_close(first, plain, rtol=0, atol=1e-6)
        torch.testing.assert_close(second, want, rtol=0, atol=1e-6)


def test_allocation_known_answers():
    scores = [torch.tensor([4.0, 3.0, 0.1, 0.2]), torch.tensor([0.5, 0.6, 0.7, 0.8])]
    assert allocate(scores, 0.5, "global") == [[0, 1], [2, 3]]  # top 4 overall: 4, 3, 0.8, 0.7
    assert allocate([torch.tensor([4.0, 3.0, 2.0, 1.0]), torch.tensor([0.5, 0.6, 0.7, 0.8])], 0.75, "global") == [[0], [3]]
    assert allocate(scores, 0.5, "uniform") == [[0, 1], [2, 3]]
    assert allocate(scores, 0.25, "uniform") == [[0, 1, 3], [1, 2, 3]]
    # multiples of 2: units (4+3, 0.2+0.1) and (0.8+0.7, 0.6+0.5)
    assert allocate(scores, 0.5, "global", multiple_of=2) == [[0, 1], [2, 3]]
    assert allocate(scores, 0.25, "global", multiple_of=2) in ([[0, 1], [0, 1, 2, 3]],)
    # forced heads are kept first
    assert allocate(scores, 0.5, "global", forced=[[2], []]) == [[0, 1, 2], [3]]  # head 2 forced, then 4, 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ratio=1.0), "ratio in \\[0, 1\\)"),
        (dict(ratio=-0.1), "ratio in \\[0, 1\\)"),
        (dict(ratio=0.9), "fewer than one unit"),
        (dict(ratio=0.5, allocation="random"), "--allocation must be"),
        (dict(ratio=0.5, multiple_of=3), "not a multiple of --heads-multiple-of 3"),
    ],
)
def test_allocation_errors(kwargs, message):
    scores = [torch.tensor([4.0, 3.0, 0.1, 0.2]), torch.tensor([0.5, 0.6, 0.7, 0.8]), torch.ones(4), torch.ones(4),
              torch.ones(4), torch.ones(4), torch.ones(4), torch.ones(4), torch.ones(4), torch.ones(4)]  # fmt: skip
    with pytest.raises(PareError, match=message):
        allocate(scores, kwargs.pop("ratio"), kwargs.pop("allocation", "global"), **kwargs)


def test_norm_correction_restores_what_slicing_shifts():
    """A block whose pruned head carried most of the q/k energy: the kept head's norm is far off until corrected."""
    model = tiny_wan()
    with torch.no_grad():
        for proj in (model.blocks[0].attn1.to_q, model.blocks[0].attn1.to_k):
            proj.weight[12:] *= 20  # head 1 of block 0 dominates the RMS over both heads
            proj.bias[12:] *= 20
    plan = WidthPlan([[0], [0, 1]], [[0, 1], [0, 1]], [list(range(32))] * 2)
    batches = [dict(hidden_states=X, timestep=T, encoder_hidden_states=E)]
    scales = norm_scales(model, plan, batches)
    assert scales[(0, "attn1", "norm_q")] < 0.2 and scales[(1, "attn1", "norm_q")] == pytest.approx(1.0)
    plain, _ = prune(model, plan)
    fixed, _ = prune(model, plan, scales)
    # the kept head's normalised queries: before pruning vs after, with and without the correction
    a = model.blocks[0].attn1
    x = torch.randn(4, 10, 24)
    with torch.no_grad():
        want = a.norm_q(a.to_q(x))[..., :12]
        got_plain = plain.blocks[0].attn1.norm_q(plain.blocks[0].attn1.to_q(x))
        got_fixed = fixed.blocks[0].attn1.norm_q(fixed.blocks[0].attn1.to_q(x))
    assert (got_fixed - want).norm() < 0.3 * (got_plain - want).norm()


@pytest.fixture(scope="module")
def profiled(tmp_path_factory, pixel_model_dir, embeds_file):
    from pare.components import EmbeddingsFile

    bundle = load_bundle(str(pixel_model_dir))
    enc = EmbeddingsFile(embeds_file)
    result = profile(bundle, ProfileConfig(videos=2, steps=3, timesteps=(0, 2), queries=8), enc.prompts, encoder=enc,
                     shape=(3, 8, 8), progress=False)  # fmt: skip
    d = tmp_path_factory.mktemp("profile")
    write_profile(result, d)
    return d / "heads.json", result


def test_role_aware_plan_protects_temporal_heads(profiled):
    _, result = profiled
    result = json.loads(json.dumps(result))
    for block in result["blocks"]:  # make head 1 temporal and the least important in every block
        block["heads"][0].update(role="spatial", removal_error=1.0)
        block["heads"][1].update(role="temporal", removal_error=0.4)
    aware = plan_from_profile(result, 0.5, 0.0, "uniform", temporal_multiplier=3.0, min_temporal_share=0.0)
    agnostic = plan_from_profile(result, 0.5, 0.0, "uniform", temporal_multiplier=1.0, min_temporal_share=0.0)
    share = plan_from_profile(result, 0.5, 0.0, "uniform", temporal_multiplier=1.0, min_temporal_share=1.0)
    assert aware.self_heads == [[1], [1]] and agnostic.self_heads == [[0], [0]] and share.self_heads == [[1], [1]]


def test_prune_cli(tmp_path, pixel_model_dir, embeds_file, profiled, capsys):
    heads_json, _ = profiled
    args = ["prune", "--model", str(pixel_model_dir), "--profile", str(heads_json), "--embeds", str(embeds_file),
            "--calibration-videos", "2"]  # fmt: skip
    assert main([*args, "--heads", "0.5", "--ffn", "0.5", "--out", str(tmp_path / "p")]) == 0
    text = capsys.readouterr().out
    assert "relative output error" in text and "parameters:" in text
    bundle = load_bundle(str(tmp_path / "p"))
    assert bundle.kind == "pare:pruned" and bundle.transformer.config.self_heads == [1, 1]
    assert bundle.manifest["report"]["error_with_correction"] is not None
    assert bundle.full_model.config.num_attention_heads == 2  # compute is reported against the unpruned model
    # every file of the folder has the mode of a file the user creates (safetensors alone would give 0600)
    mask = os.umask(0)
    os.umask(mask)
    files = [f for f in (tmp_path / "p").rglob("*") if f.is_file()]
    assert any(f.suffix == ".safetensors" for f in files) and {f.stat().st_mode & 0o777 for f in files} == {0o666 & ~mask}
    video = tmp_path / "v.gif"
    assert main(["generate", "--model", str(tmp_path / "p"), "--embeds", str(embeds_file), "--prompt",
                 "a red circle", "--frames", "3", "--height", "8", "--width", "8", "--steps", "2",
                 "--out", str(video)]) == 0  # fmt: skip
    record = json.loads(video.with_suffix(".json").read_text())
    assert record["steps"][0]["flops"] < record["steps"][0]["full_flops"]
    # errors: ratios, and a profile of another model
    for extra, message in [(["--heads", "1.0"], "--heads must be a ratio"), (["--ffn", "-0.5"], "--ffn must be"),
                           (["--heads", "0.9"], "fewer than one unit")]:  # fmt: skip
        assert main([*args, *extra, "--out", str(tmp_path / "q")]) == 2
        assert message in capsys.readouterr().err
    other = tmp_path / "other"
    tiny_wan(seed=5).save_pretrained(other)
    assert main(["prune", "--model", str(other), "--profile", str(heads_json), "--embeds", str(embeds_file),
                 "--out", str(tmp_path / "r")]) == 2  # fmt: skip
    assert "made on another model" in (err := capsys.readouterr().err) and "same config, other weights" in err
    tiny_wan(ffn_dim=48).save_pretrained(tmp_path / "wider")
    assert main(["prune", "--model", str(tmp_path / "wider"), "--profile", str(heads_json), "--embeds",
                 str(embeds_file), "--out", str(tmp_path / "r")]) == 2  # fmt: skip
    assert "made on another model" in (err := capsys.readouterr().err) and "another config" in err
    assert not (tmp_path / "q").exists() and not (tmp_path / "r").exists()


@pytest.mark.parametrize("edit, message", [
    (lambda p: p.update(blocks=p["blocks"][:1]), "1 blocks for a model of 2"),
    (lambda p: p["blocks"][0].update(heads=p["blocks"][0]["heads"][:1]), "block 0 lists heads [0], the model has 2"),
    (lambda p: p["blocks"][1]["heads"][0].update(head=9), "block 1 lists heads [1, 9], the model has 2"),
    (lambda p: p["blocks"][0]["heads"][1].update(removal_error=None), "without a finite 'removal_error' score"),
    (lambda p: p["blocks"][0].update(ffn_taylor=[1.0]), "block 0 has 1 ffn_taylor scores, the model 32"),
    (lambda p: p["blocks"].__setitem__(0, 5), "TypeError"),
    (lambda p: p.update(settings=None), "TypeError"),
])  # fmt: skip
def test_a_hand_edited_profile_is_refused_before_pruning(tmp_path, pixel_model_dir, embeds_file, profiled, capsys,
                                                         edit, message):
    """A profile whose entries do not cover the model's blocks, heads and channels is refused in one line, where
    it would otherwise prune a model silently from what is left (or stop in a traceback)."""
    heads_json, result = profiled
    data = json.loads(json.dumps(result))
    edit(data)
    edited = tmp_path / "heads.json"
    edited.write_text(json.dumps(data))
    assert main(["prune", "--model", str(pixel_model_dir), "--profile", str(edited), "--embeds", str(embeds_file),
                 "--heads", "0.5", "--ffn", "0.5", "--out", str(tmp_path / "p")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "the head profile is malformed" in err and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "p").exists()


def test_output_folder_guard_and_profile_refuses_pruned(tmp_path, pixel_model_dir, embeds_file, profiled, capsys):
    heads_json, result = profiled
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    assert main(["prune", "--model", str(pixel_model_dir), "--profile", str(heads_json), "--embeds", str(embeds_file),
                 "--out", str(busy)]) == 2  # fmt: skip
    assert "already holds other files" in capsys.readouterr().err and (busy / "notes.txt").read_text() == "keep me"
    # the same model by another path has the same fingerprint
    from pathlib import Path

    rel = Path(pixel_model_dir).relative_to(Path.cwd()) if Path(pixel_model_dir).is_relative_to(Path.cwd()) else None
    assert fingerprint(load(str(pixel_model_dir))) == result["fingerprint"]
    if rel is not None:
        assert fingerprint(load(str(rel))) == result["fingerprint"]
    # role-agnostic: a multiplier of 1 and no share of temporal heads kept; the profile's share otherwise
    data = json.loads(json.dumps(result))
    for block in data["blocks"]:
        block["heads"][0].update(role="spatial", removal_error=1.0)
        block["heads"][1].update(role="temporal", removal_error=0.4)
    agnostic = plan_from_profile(data, 0.5, 0.0, "uniform", temporal_multiplier=1.0, min_temporal_share=0.0)
    assert agnostic.self_heads == [[0], [0]]
    assert plan_from_profile(data, 0.5, 0.0, "uniform", temporal_multiplier=1.0).self_heads == [[1], [1]]
    pruned, _ = prune(load(str(pixel_model_dir)), WidthPlan([[0], [1]], [[0, 1]] * 2, [list(range(32))] * 2))
    pruned.save_pretrained(tmp_path / "p" / "transformer")
    from pare.artifacts import write_manifest

    write_manifest(tmp_path / "p", kind="pruned", base=str(pixel_model_dir), settings={})
    assert main(["profile", "--model", str(tmp_path / "p"), "--embeds", str(embeds_file), "--frames", "3",
                 "--height", "8", "--width", "8", "--out", str(tmp_path / "prof")]) == 2  # fmt: skip
    assert "profile the full model" in capsys.readouterr().err


def test_fingerprint_sees_every_tensor(pixel_model_dir):
    """A change of one weight in the last block, or two weights trading places, is another model."""
    model = load(str(pixel_model_dir))
    base = fingerprint(model)
    assert fingerprint(load(str(pixel_model_dir))) == base  # deterministic
    last = arch.blocks(model)[-1]
    w = arch.ffn_linears(last)[1].weight
    with torch.no_grad():
        w[-1, -1] += 1e-3
    changed = fingerprint(model)
    assert changed != base
    with torch.no_grad():
        w[-1, -1] -= 1e-3
        assert fingerprint(model) == base
        a, b = w[0, 0].item(), w[-1, -1].item()
        w[0, 0], w[-1, -1] = b, a
    assert fingerprint(model) != base
