import pytest
import torch

from pare import PareError
from pare.shapes import domain, text


def test_render_is_deterministic_by_seed():
    scenes = domain.sample_scenes(6, seed=1)
    a, b = domain.render(scenes, seed=2), domain.render(scenes, seed=2)
    assert a.shape == (6, 3, domain.FRAMES, domain.HEIGHT, domain.WIDTH)
    assert torch.equal(a, b) and not torch.equal(a, domain.render(scenes, seed=3))
    assert a.min() >= -1 and a.max() <= 1
    same = domain.sample_scenes(6, seed=1)
    assert same.prompts() == scenes.prompts()


def test_single_object_colour_and_motion_by_construction():
    """A red square moving right: red pixels exist in every frame and their centre moves right each frame."""
    scenes = domain.parse_prompt("a red square moving right quickly")
    video = (domain.render(scenes, seed=0)[0] + 1) / 2  # (3, F, H, W)
    red = torch.tensor(domain.COLOURS["red"]).view(3, 1, 1, 1)
    mask = ((video - red).abs().sum(0) < 0.05).float()  # (F, H, W)
    assert (mask.sum((1, 2)) > 20).all()
    xs = torch.arange(domain.WIDTH).float()
    cx = (mask.sum(1) * xs).sum(1) / mask.sum((1, 2))
    assert (cx.diff() > 1).all()
    assert abs((cx[-1] - cx[0]).item() - (domain.FRAMES - 1) * domain.SPEEDS["quickly"]) < 1.0


def test_heldout_split_is_fixed_and_disjoint():
    table = domain.heldout_table()
    C, S = len(domain.COLOURS), len(domain.SHAPES)
    # symmetric in the two objects, and about HELDOUT_PERCENT of all compositions
    assert torch.equal(table[:C, :, :C], table[:C, :, :C].permute(2, 3, 0, 1, 4))
    share = table[:C].float().mean().item()
    assert abs(share - domain.HELDOUT_PERCENT / 100) < 0.03
    train = domain.sample_scenes(4000, "train", seed=5)
    assert not domain.is_heldout(train).any()
    prompts = domain.heldout_prompts(64)
    assert len(set(prompts)) == 64 and domain.is_heldout(domain.parse_prompts(prompts)).all()
    assert prompts == domain.heldout_prompts(64)
    assert not set(prompts) & set(train.prompts())


def test_heldout_prompts_are_bounded_by_the_split():
    """The held-out split has a known number of distinct prompts: asking for all of them returns them, every one
    held out; asking for one more is refused at once (it used to draw forever)."""
    total = domain.heldout_prompt_count()
    every = domain.heldout_prompts(total)
    assert len(set(every)) == total and domain.is_heldout(domain.parse_prompts(every)).all()
    # and they are all there is: a large draw of held-out scenes gives exactly them
    assert set(domain.sample_scenes(20000, "heldout", seed=11).prompts()) == set(every)
    with pytest.raises(PareError, match=f"has {total} distinct"):
        domain.heldout_prompts(total + 1)


def test_circling_share_of_training_scenes():
    """--circling P: every scene circles at P = 1, none at P = 0, about P of them in between, the other motions
    alike; unset, every motion alike (the recorded teacher losses pin that draw)."""
    n = 6000
    plain = domain.sample_scenes(n, seed=3)
    assert abs((plain.motion == domain.CIRCLING).float().mean().item() - 1 / len(domain.MOTIONS)) < 0.015
    assert (domain.sample_scenes(64, seed=3, circling=1.0).motion == domain.CIRCLING).all()
    none = domain.sample_scenes(n, seed=3, circling=0.0).motion
    assert not (none == domain.CIRCLING).any() and len(none.unique()) == len(domain.MOTIONS) - 1
    third = domain.sample_scenes(n, seed=3, circling=0.3)
    assert abs((third.motion == domain.CIRCLING).float().mean().item() - 0.3) < 0.02
    assert not domain.is_heldout(third).any()
    rest = torch.bincount(third.motion, minlength=len(domain.MOTIONS)).float()
    rest = rest[torch.arange(len(domain.MOTIONS)) != domain.CIRCLING]
    assert (rest / rest.sum() - 1 / (len(domain.MOTIONS) - 1)).abs().max() < 0.015


def test_vocabulary_covers_the_brief():
    assert len(domain.COLOURS) >= 5 and set(domain.SHAPES) == {"circle", "square", "triangle"}
    for m in ("left", "right", "up", "down", "up-right", "still", "bouncing", "circling"):
        assert m in domain.MOTIONS
    scenes = domain.sample_scenes(2000, seed=0)
    assert set(scenes.count.tolist()) == {1, 2} and set(scenes.motion.tolist()) == set(range(len(domain.MOTIONS)))


def test_prompts_round_trip_and_bad_prompts():
    scenes = domain.sample_scenes(300, seed=4)
    for p in scenes.prompts():
        assert domain.parse_prompt(p).prompts() == [p]
    assert domain.parse_prompt("a blue square and a yellow triangle bouncing").count.item() == 2
    for bad in ("a pink circle moving left slowly", "a red circle", "a red circle and a red square bouncing", ""):
        with pytest.raises(PareError, match="not a prompt of the shapes domain"):
            domain.parse_prompt(bad)


def test_scene_tokens_equal_string_tokens():
    scenes = domain.sample_scenes(1000, seed=9)
    assert torch.equal(text.tokenize_scenes(scenes), text.tokenize(scenes.prompts()))
    assert text.tokenize([""])[0, 0] == text.WORD_ID[text.BOS] and (text.tokenize([""])[0, 1:] == 0).all()
    with pytest.raises(PareError, match="not in the shapes vocabulary"):
        text.tokenize(["a pink elephant"])


def test_text_encoder_layout_and_round_trip(tmp_path):
    torch.manual_seed(0)
    enc = text.ShapesTextEncoder(text_dim=16).eval()
    ids = text.tokenize(["a red circle bouncing", ""])
    out = enc(ids)
    assert out.shape == (2, text.TEXT_TOKENS, 16)
    assert (out[0, 5:] == 0).all() and (out[0, :5] != 0).any() and (out[1, 1:] == 0).all()
    enc.save(tmp_path / "t.safetensors")
    loaded = text.ShapesTextEncoder.load(tmp_path / "t.safetensors")
    assert torch.equal(loaded(ids), out)


def test_object_tokens_carry_their_own_phrase_and_start_as_the_plain_encoder(tmp_path):
    prompts = ["a red square and a blue circle moving left slowly", "a green triangle bouncing", ""]
    ids = text.tokenize(prompts)
    assert text.object_membership(ids).tolist() == [[0, 1, 1, 1, 0, 2, 2, 2] + [0] * 8, [0, 1, 1, 1] + [0] * 12,
                                                    [0] * 16]  # fmt: skip
    torch.manual_seed(0)
    plain = text.ShapesTextEncoder(text_dim=16).eval()
    bound = text.ShapesTextEncoder(text_dim=16, object_tokens=True).eval()
    missing = bound.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing == ["objects.weight"] and torch.equal(bound(ids), plain(ids))  # zero map: the plain encoder
    with torch.no_grad():
        bound.objects.weight.copy_(torch.eye(16))
    e = lambda *words: sum(plain.tokens.weight[text.WORD_ID[w]] for w in words)  # noqa: E731
    with torch.no_grad():
        added = bound(ids) - plain(ids)
        for pos in (1, 2, 3):
            assert torch.allclose(added[0, pos], e("a", "red", "square"), atol=1e-6)
            assert torch.allclose(added[1, pos], e("a", "green", "triangle"), atol=1e-6)
        for pos in (5, 6, 7):
            assert torch.allclose(added[0, pos], e("a", "blue", "circle"), atol=1e-6)
    assert (added[0, [0, 4, 8, 9, 10]] == 0).all() and (added[2] == 0).all()  # <bos>, "and", motion, empty prompt
    bound.save(tmp_path / "b.safetensors")
    loaded = text.ShapesTextEncoder.load(tmp_path / "b.safetensors")
    assert loaded.config["object_tokens"] and torch.equal(loaded(ids), bound(ids))


def test_opposite_directions():
    assert domain.OPPOSITE["up-left"] == "down-right" and domain.OPPOSITE["left"] == "right"
    assert sorted(domain.OPPOSITE) == sorted(domain.LINEAR)
    assert all(domain.OPPOSITE[domain.OPPOSITE[d]] == d and domain.OPPOSITE[d] != d for d in domain.LINEAR)


def test_linear_heldout_prompts_and_flip_direction():
    prompts = domain.linear_heldout_prompts(5)
    assert len(prompts) == 5 and all(domain.parse_prompt(p).motion[0] < domain.N_LINEAR for p in prompts)
    assert set(prompts) <= set(domain.heldout_prompts(40))
    assert domain.flip_direction("a red circle and a blue square moving up-left quickly") == (
        "a red circle and a blue square moving down-right quickly")
    assert domain.flip_direction("a red circle circling") == "a red circle circling"
