import json

import pytest
import torch

from pare import PareError, arch, load_bundle
from pare.cli import main
from pare.evaluation.bench import pareto
from pare.flops import count_flops


def test_pareto_known_answer():
    # (cost, quality): lower cost and higher quality win
    points = [(1.0, 30), (0.5, 20), (0.5, 25), (0.8, 24), (0.3, 10), (0.9, 31)]
    assert pareto(points) == [4, 2, 5]


def test_bench_end_to_end(stage_inputs, tmp_path, capsys):
    d, teacher = stage_inputs
    out = tmp_path / "bench"
    assert main(["bench", "--model", teacher, "--variant", f"pruned={d / 'student'}", "--n", "2", "--batch-size", "2",
                 "--steps", "6", "--out", str(out)]) == 0  # fmt: skip
    r = json.loads((out / "results.json").read_text())
    rows = {(x["method"], x["setting"]): x for x in r["rows"]}
    assert set(m for m, _ in rows) == {"teacher", "pruned", "First Block Cache", "Pyramid Attention Broadcast",
                                       "TaylorSeer", "MagCache"}  # fmt: skip
    assert all("why_not" not in x for x in r["rows"]), [x.get("why_not") for x in r["rows"]]
    base = rows[("teacher", "")]
    assert base["psnr"] == float("inf") and base["flops_ratio"] == 1.0 and base["speedup"] == 1.0
    # executed FLOPs per step and video = both CFG branches of one counted forward, for the teacher and the student
    for spec, row in ((teacher, base), (str(d / "student"), rows[("pruned", "")])):
        bundle = load_bundle(spec)
        grid = arch.token_grid(bundle.transformer.config, bundle.latent, *bundle.default_shape)
        expected = 2 * count_flops(bundle.transformer, grid, bundle.text_tokens).total()
        assert row["flops_per_step"] == pytest.approx(expected, rel=0.01)
        assert row["parameters"] == sum(p.numel() for p in bundle.transformer.parameters())
    assert rows[("pruned", "")]["flops_ratio"] < 1.0 and rows[("pruned", "")]["parameters"] < base["parameters"]
    # a cache that predicts every other step's attention and FFN outputs executes less than the teacher
    assert rows[("TaylorSeer", "interval 4, order 1")]["flops_ratio"] < 1.0
    assert all(x["flops_ratio"] <= 1.0 + 1e-9 for x in r["rows"])
    # each row's accuracies are the evaluator's on that method's stored videos
    from pare.shapes.evaluate import evaluate_videos
    import numpy as np

    (stored,) = (out / "methods").glob("teacher-*.npz")
    with np.load(stored) as f:
        scores = evaluate_videos(f["videos"], r["prompts"])
    assert base["shapes"] == {k: scores[k] for k in base["shapes"]}
    assert (out / "pareto.png").stat().st_size > 0 and "| MagCache |" in (out / "results.md").read_text()
    # run again without the caches: the finished methods are reused from OUT/methods, measurements and all
    assert main(["bench", "--model", teacher, "--variant", f"pruned={d / 'student'}", "--n", "2", "--batch-size", "2",
                 "--steps", "6", "--caches", "none", "--out", str(out)]) == 0  # fmt: skip
    again = json.loads((out / "results.json").read_text())["rows"]
    assert [x["method"] for x in again] == ["teacher", "pruned"]
    assert again == [base, rows[("pruned", "")]]


def test_bench_combines_a_pare_model_with_a_cache(stage_inputs, tmp_path):
    """--combine LABEL=CACHE runs the width-only variant with each of the cache's settings: MagCache calibrated on
    that model, not on the teacher; a cache on the pruned model executes less than the pruned model alone."""
    d, teacher = stage_inputs
    out = tmp_path / "bench"
    assert main(["bench", "--model", teacher, "--variant", f"pruned={d / 'student'}", "--caches", "none", "--combine",
                 "pruned=taylorseer", "--combine", "pruned=magcache", "--n", "2", "--batch-size", "2", "--steps", "6",
                 "--out", str(out)]) == 0  # fmt: skip
    rows = {(x["method"], x["setting"]): x for x in json.loads((out / "results.json").read_text())["rows"]}
    assert all("why_not" not in x for x in rows.values()), [x.get("why_not") for x in rows.values()]
    assert {m for m, _ in rows} == {"teacher", "pruned", "pruned + TaylorSeer", "pruned + MagCache"}
    assert {x["family"] for (m, _), x in rows.items() if "+" in m} == {"PARE + cache"}
    pruned = rows[("pruned", "")]["flops_ratio"]
    assert rows[("pruned + TaylorSeer", "interval 4, order 1")]["flops_ratio"] < pruned < 1.0
    assert all(x["flops_ratio"] <= pruned + 1e-9 for (m, _), x in rows.items() if "+" in m)


def test_a_cache_is_refused_on_a_routed_model():
    from types import SimpleNamespace

    from pare.evaluation.bench import cache_methods
    from pare.routing.model import RoutedWanTransformer3DModel

    from conftest import TINY

    routed = SimpleNamespace(transformer=RoutedWanTransformer3DModel(**TINY, router_hidden=8, budget=0.5))
    with pytest.raises(PareError, match="routed model"):
        cache_methods(routed, ["fbc"], on=("PARE", routed))


@pytest.mark.parametrize("args, message", [
    (["--variant", "no-equals-sign"], "--variant takes LABEL=FOLDER"),
    (["--caches", "fbc,teacache"], "--caches takes"),
    (["--combine", "nothing=fbc"], "--combine takes LABEL=CACHE"),
    (["--variant", "a=x", "--baseline", "a=y"], "the label 'a' is given twice"),
])  # fmt: skip
def test_bench_bad_input(args, message, tmp_path, capsys):
    assert main(["bench", "--model", "builtin:shapes-t2v", "--out", str(tmp_path / "b"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not (tmp_path / "b").exists()


def test_bench_reports_known_refusals_and_fails_on_bugs(stage_inputs, tmp_path):
    """A cache diffusers refuses becomes a row that says why; any other exception stops the benchmark."""
    from pare.evaluation import EvalConfig
    from pare.evaluation.bench import Method, bench

    _, teacher = stage_inputs
    bundle = load_bundle(teacher)
    config = EvalConfig(steps=2, batch_size=1)

    def refused(model, sampler):
        raise ValueError("Cache config <Nope> is not supported.")

    def broken(model, sampler):
        raise RuntimeError("a bug")

    rows = bench(bundle, [Method("Nope", "cache", "", bundle, refused)], ["a red circle bouncing"], config,
                 progress=False)["rows"]  # fmt: skip
    assert rows[1]["why_not"] == "diffusers refused the cache: Cache config <Nope> is not supported."
    with pytest.raises(RuntimeError, match="a bug"):
        bench(bundle, [Method("Broken", "cache", "", bundle, broken)], ["a red circle bouncing"], config, progress=False)


def test_bench_store_is_keyed_by_the_weights(stage_inputs, tmp_path):
    """The same folder with other weights is another model: its stored run is not reused."""
    from pare.evaluation import EvalConfig
    from pare.evaluation.bench import bench

    _, teacher = stage_inputs
    bundle = load_bundle(teacher)
    config = EvalConfig(steps=2, batch_size=1)
    store = tmp_path / "methods"
    first = bench(bundle, [], ["a red circle bouncing"], config, progress=False, store=store)["rows"][0]
    assert len(list(store.glob("*.npz"))) == 1
    with torch.no_grad():
        arch.ffn_linears(arch.blocks(bundle.transformer)[-1])[1].weight[0, 0] += 1.0
    again = bench(bundle, [], ["a red circle bouncing"], config, progress=False, store=store)["rows"][0]
    assert len(list(store.glob("*.npz"))) == 2 and again["flops_per_step"] == first["flops_per_step"]


def test_timing_rounds_time_every_method_side_by_side(stage_inputs, tmp_path, monkeypatch, capsys):
    """--timing-rounds R: every row's seconds per video are the median of R interleaved rounds of one batch (the
    methods in turn, round after round), stored rows included; without it, each method's own run."""
    from pare.evaluation import EvalConfig
    from pare.evaluation import bench as bench_module
    from pare.evaluation.bench import Method, bench, markdown

    d, teacher = stage_inputs
    bundle, student = load_bundle(teacher), load_bundle(str(d / "student"))
    config = EvalConfig(steps=2, batch_size=2)
    prompts = ["a red circle bouncing", "a blue square moving left slowly", "a green triangle standing still"]
    store = tmp_path / "methods"
    methods = [Method("pruned", "PARE", "", student)]
    first = bench(bundle, methods, prompts, config, progress=False, store=store)
    assert first["timing"] is None and "each method's generation of the 3 videos" in markdown(first)
    calls = []
    fake = {"teacher": [3.0, 9.0, 5.0], "pruned": [1.0, 2.0, 7.0]}  # seconds per round

    def timed(method, batch, sampler):
        calls.append((method.name, len(batch), sampler.steps))
        return fake[method.name][sum(name == method.name for name, _, _ in calls) - 1]

    monkeypatch.setattr(bench_module, "time_method", timed)
    again = bench(bundle, methods, prompts, config, progress=False, store=store, timing_rounds=3)
    assert calls == [("teacher", 2, 2), ("pruned", 2, 2)] * 3  # interleaved; one batch; each on its own sampler
    rows = again["rows"]
    assert [r["seconds_per_video"] for r in rows] == [5.0 / 2, 2.0 / 2] and rows[1]["speedup"] == 2.5
    assert again["timing"] == {"rounds": 3, "videos": 2} and "median of 3 rounds" in markdown(again)
    # everything but the timing is the stored run's
    for a, b in zip(first["rows"], rows):
        assert {k: v for k, v in a.items() if k not in ("seconds_per_video", "speedup")} == \
            {k: v for k, v in b.items() if k not in ("seconds_per_video", "speedup")}
    capsys.readouterr()  # the timing rounds have a progress bar of their own: one tick per method and round
    calls.clear()
    bench(bundle, methods, prompts, config, progress=True, store=store, timing_rounds=3)
    err = capsys.readouterr().err
    assert "timing: 100%" in err and "6/6" in err


def test_time_method_generates_the_batch(stage_inputs):
    from pare.evaluation import EvalConfig, paired_sampler
    from pare.evaluation.bench import Method, time_method

    _, teacher = stage_inputs
    bundle = load_bundle(teacher)
    seconds = time_method(Method("teacher", "teacher", "", bundle), ["a red circle bouncing"],
                          paired_sampler(bundle, EvalConfig(steps=2)))  # fmt: skip
    assert seconds > 0
