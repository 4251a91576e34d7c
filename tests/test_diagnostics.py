import importlib.util
from pathlib import Path

import torch

SCRIPTS = Path(__file__).parents[1] / "scripts"


def script(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prompt_sensitivity_swaps_one_word():
    swap = script("prompt_sensitivity").swap
    p = "a red square and a blue circle moving up-left slowly"
    assert swap(p, "direction") == "a red square and a blue circle moving down-right slowly"
    assert swap(p, "speed") == "a red square and a blue circle moving up-left quickly"
    assert swap(p, "shape") == "a red triangle and a blue circle moving up-left slowly"
    # the next colour in the palette, skipping the second object's (red -> green, taken -> blue)
    assert swap(p, "colour") == "a green square and a blue circle moving up-left slowly"
    assert swap("a red square and a green circle moving left slowly", "colour").startswith("a blue square")


def test_word_probe_reads_what_is_there_and_not_what_is_not():
    probe = script("word_probe").probe_accuracy
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 8, (400,), generator=g)
    readable = torch.nn.functional.one_hot(y, 8).float() + 0.1 * torch.randn(400, 8, generator=g)
    assert probe(torch.cat([readable, torch.randn(400, 24, generator=g)], 1), y) == 100.0
    assert probe(torch.randn(400, 32, generator=g), y) < 30  # chance is 12.5%


def test_binding_probe_reads_the_words_it_names(monkeypatch):
    from pare.shapes import text

    monkeypatch.syspath_prepend(str(SCRIPTS))  # the script imports word_probe beside it
    words = script("binding_probe").WORDS
    ids = text.tokenize(["a red square and a blue circle moving left slowly"])[0]
    read = {name: text.VOCAB[ids[pos]] for name, pos in words.items()}
    assert read == {"colour word of object 1": "red", "shape word of object 1": "square",
                    "colour word of object 2": "blue", "shape word of object 2": "circle"}  # fmt: skip


def test_role_experiment_verdicts_and_ranking():
    mod = script("role_experiment")
    # the predicted sign of (temporal removal) - (spatial removal): -1 (temporal hurts more) or +1
    assert mod.verdict({"low": -9.0, "high": -1.0}, -1) == "supported"
    assert mod.verdict({"low": 1.0, "high": 9.0}, -1) == "refuted"
    assert mod.verdict({"low": -1.0, "high": 9.0}, -1) == "inconclusive"
    assert mod.verdict({"low": 2.0, "high": 3.0}, +1) == "supported"
    assert mod.verdict({"low": 0.0, "high": 0.0}, +1) == "inconclusive"  # no difference at all
    profile = {"rule": {"score": "s"}, "blocks": [
        {"heads": [{"head": 0, "role": "temporal", "s": 0.5}, {"head": 1, "role": "spatial", "s": 2.0}]},
        {"heads": [{"head": 0, "role": "temporal", "s": 1.5}, {"head": 1, "role": "mixed", "s": 9.0}]}]}  # fmt: skip
    assert mod.ranked(profile, "temporal") == [(1, 0, 1.5), (0, 0, 0.5)]
    assert mod.ranked(profile, "spatial") == [(0, 1, 2.0)]


def test_compare_models_claims_on_constructed_scores():
    """`compare_models.summarize` on per-video rows made up so that the answers are known: A gets every direction
    right where B gets half wrong and nothing else differs (A > B supported, B > A refuted); C is ahead of B on
    direction but behind on shape (mixed); a sweep names the value with the best mean accuracy."""
    summarize = script("compare_models").summarize

    def model(direction_wrong=0, shape_wrong=0, n=40):
        rows = [{"prompt": f"p{i}", "colour": [True], "shape": [i >= shape_wrong], "direction": [i >= direction_wrong],
                 "speed": [True], "count": 1.0, "motion_smoothness": 0.9} for i in range(n)]  # fmt: skip
        mean = {m: 100.0 * sum(r[m][0] for r in rows) / n for m in ("colour", "shape", "direction", "speed")}
        return {**mean, "count": 100.0, "motion_smoothness": 0.9, "fd": 10.0 + direction_wrong, "per_video": rows}

    rows = {"teacher": model(), "A": model(), "B": model(direction_wrong=20), "C": model(shape_wrong=20)}
    sweep = {"label": "knob", "points": [(1.0, "B"), (2.0, "A"), (3.0, "C")]}
    out = summarize(rows, [("A", "B"), ("B", "A"), ("C", "B"), ("A", "teacher")], [sweep])
    tests = {t["claim"]: t for t in out["claims"]}
    assert tests["A > B"]["verdict"] == "supported" and tests["B > A"]["verdict"] == "refuted"
    ab = tests["A > B"]["metrics"]
    assert ab["direction"]["diff"] == 50.0 and ab["direction"]["verdict"] == "supported"
    assert ab["shape"] == {"a": 100.0, "b": 100.0, "diff": 0.0, "low": 0.0, "high": 0.0, "verdict": "inconclusive"}
    assert ab["fd"]["diff"] == -20.0  # A's Frechet distance minus B's
    assert tests["C > B"]["verdict"] == "mixed"
    assert tests["A > teacher"]["verdict"] == "inconclusive"  # equal everywhere
    assert out["changes"]["B"]["direction"]["diff"] == -50.0 and "teacher" not in out["changes"]
    assert out["sweeps"][0]["best"] == (2.0, "A") and out["sweeps"][0]["mean_accuracy"]["B"] == 90.0
    assert all("per_video" not in r for r in out["rows"].values())
    # the table: each model's cost (its own steps x passes, FLOPs per step and per video) beside its scores
    cost = {"teacher": (4, 2, 1.0, 1.0, 0.8), "A": (2, 1, 0.5, 0.125, 0.1), "B": (4, 2, 0.6, 0.6, 0.5),
            "C": (4, 2, 1.0, 1.0, 0.8)}
    for name, (steps, passes, per_step, per_video, seconds) in cost.items():
        out["rows"][name].update(steps=steps, passes=passes, flops_ratio=per_step, video_flops_ratio=per_video,
                                 seconds_per_video=seconds)  # fmt: skip
    sampler = {"steps": 4, "guidance_scale": 2.0}
    table = script("compare_models").markdown({"prompts": 40, "seed": 0, "sampler": sampler, **out})
    assert "| A | 2 x 1 | 0.500 | 0.125 | 0.100 | 100.0 (+0.0 [0.0, 0.0]) |" in table
    assert "first_frame_psnr" not in table  # text-to-video models: no first frame
    # image-to-video models: the first frame's PSNR to the given frame is a column, and is paired per video
    rows = {"teacher": model(), "A": model(), "B": model(direction_wrong=20), "C": model(shape_wrong=20)}
    i2v = {name: {**row, "first_frame_psnr": 30.0,
                  "per_video": [r | {"first_frame_psnr": 30.0 - (name == "B")} for r in row["per_video"]]}
           for name, row in rows.items()}  # fmt: skip
    out = summarize(i2v, [("A", "B")], [])
    assert out["changes"]["B"]["first_frame_psnr"]["diff"] == -1.0
    assert out["claims"][0]["metrics"]["first_frame_psnr"]["diff"] == 1.0
    assert out["claims"][0]["verdict"] == "supported"  # decided by the accuracies alone, as before
    for name, (steps, passes, per_step, per_video, seconds) in cost.items():
        out["rows"][name].update(steps=steps, passes=passes, flops_ratio=per_step, video_flops_ratio=per_video,
                                 seconds_per_video=seconds)  # fmt: skip
    table = script("compare_models").markdown({"prompts": 40, "seed": 0, "sampler": sampler, **out})
    assert "| first_frame_psnr | PSNR to reference (dB) |" in table
    assert "| +0.000 [0.000, 0.000] inconclusive | -20.0 | +1.0 [1.0, 1.0] supported | **supported** |" in table


def test_bench_claims_pairs_rows_at_equal_flops_and_tests_them_video_by_video(tmp_path, monkeypatch):
    """`bench_claims.py` on a bench folder made by hand: the pairing at equal FLOPs on constructed rows, then a
    row that repeats the teacher's videos (equal to it: inconclusive) and one of blank videos (every accuracy
    lost: "blank > cache" refuted), read from the files whose key holds the bench's prompts (a decoy of other
    prompts is passed over)."""
    import json
    import re

    import numpy as np
    import pytest

    from pare.components import to_uint8_video
    from pare.errors import PareError
    from pare.shapes import domain
    from pare.shapes.evaluate import REAL_SEED

    monkeypatch.syspath_prepend(str(SCRIPTS))  # the script imports compare_models beside it
    bc = script("bench_claims")
    rows = [("teacher", "teacher", "", 1.0), ("width", "PARE", "", 0.75), ("depth", "PARE", "", 0.4),
            ("FBC", "cache", "threshold 0.1", 0.5), ("PAB", "cache", "every 2", 0.8),
            ("width + FBC", "PARE + cache", "threshold 0.1", 0.38)]  # fmt: skip
    rows = [dict(zip(("method", "family", "setting", "flops_ratio"), r)) for r in rows]
    assert bc.equal_flops_claims(rows) == [("width", "PAB every 2"), ("depth", "FBC threshold 0.1"),
                                           ("width + FBC threshold 0.1", "FBC threshold 0.1"),
                                           ("width + FBC threshold 0.1", "depth")]  # fmt: skip

    prompts = domain.heldout_prompts(8)
    real = to_uint8_video(domain.render(domain.parse_prompts(prompts), seed=REAL_SEED)).numpy()  # (N, F, H, W, 3)
    sampler = {"steps": 25, "guidance_scale": 2.0, "seed": 0}
    bench = tmp_path / "bench"
    (bench / "methods").mkdir(parents=True)
    made = [("teacher", "teacher", "", 1.0, real), ("cache", "cache", "every 2", 0.5, real),
            ("blank", "PARE", "", 0.45, np.full_like(real, 128))]  # fmt: skip
    for method, family, setting, flops, videos in made:
        slug = re.sub(r"[^a-z0-9]+", "-", f"{method} {setting}".lower()).strip("-")  # as `pare bench` names them
        key = json.dumps({"method": method, "prompts": prompts, "sampler": sampler})
        np.savez(bench / "methods" / f"{slug}-0123456789.npz", key=np.array(key), videos=videos)
    decoy = json.dumps({"method": "blank", "prompts": prompts[:4], "sampler": sampler})
    np.savez(bench / "methods" / "blank-0000000000.npz", key=np.array(decoy), videos=real[:4])
    result = {"sampler": sampler, "prompts": prompts,
              "rows": [{"method": m, "family": f, "setting": s, "flops_ratio": r, "model": "builtin:shapes-t2v",
                        "psnr": 20.0, "seconds_per_video": 1.0} for m, f, s, r, _ in made]}  # fmt: skip
    (bench / "results.json").write_text(json.dumps(result))
    out = bc.run(bench, [("cache every 2", "teacher")], equal_flops=True)
    tests = {t["claim"]: t for t in out["claims"]}
    assert list(tests) == ["cache every 2 > teacher", "blank > cache every 2"]
    assert tests["cache every 2 > teacher"]["verdict"] == "inconclusive"
    assert tests["cache every 2 > teacher"]["metrics"]["colour"]["diff"] == 0.0
    assert tests["blank > cache every 2"]["verdict"] == "refuted"
    assert out["rows"]["blank"]["flops_ratio"] == 0.45 and out["rows"]["cache every 2"]["colour"] > 90
    with pytest.raises(PareError, match="'nothing' is not a row"):
        bc.run(bench, [("nothing", "teacher")])
    (bench / "methods" / "blank-0123456789.npz").unlink()
    with pytest.raises(PareError, match="no videos of 'blank'"):
        bc.run(bench, [], equal_flops=True)


def test_count_misses_base_rate_of_the_second_object_being_smaller(monkeypatch):
    """`second_smaller` on drawn two-object videos: naming the objects in the other order turns "the second is the
    smaller" into its complement, less the videos whose two objects cover the same area; one-object prompts and
    videos counted wrong are left out."""
    from pare.shapes import domain
    from pare.shapes.evaluate import colour_area, to_frames01

    monkeypatch.syspath_prepend(str(SCRIPTS))  # the script imports compare_models beside it
    second_smaller = script("count_misses").second_smaller
    prompts = domain.heldout_prompts(40)
    videos = domain.render(domain.parse_prompts(prompts), seed=3)  # (B, 3, F, H, W) in [-1, 1]
    two = [i for i, p in enumerate(prompts) if " and " in p]
    first, second = zip(*(prompts[i].split(" and ", 1) for i in two))
    motion = [s.split(" ", 3)[3] for s in second]  # "a blue circle moving left slowly" -> the motion words
    swapped = [f"{b.rsplit(' ' + m, 1)[0]} and {a} {m}" for a, b, m in zip(first, second, motion)]
    k, n = second_smaller(videos[two], [prompts[i] for i in two])
    k_swapped, n_swapped = second_smaller(videos[two], swapped)
    frames = to_frames01(videos[two])
    ties = sum(colour_area(v, a.split()[1]) == colour_area(v, b.split()[1]) for v, a, b in zip(frames, first, second))
    assert n == n_swapped == len(two) > 5 and k + k_swapped + ties == n and 0 < k < n and ties < 3
    assert second_smaller(videos, prompts) == [k, n]  # one-object prompts add nothing
    blank = videos[two].clone()
    blank[:] = blank[:, :, :1, :1, :1]  # every frame one background colour: no objects, count wrong
    assert second_smaller(blank, [prompts[i] for i in two]) == [0, 0]
