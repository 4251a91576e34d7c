"""`pare compress`: the stages in one command, skipped when finished, resumed after a kill, the report."""

import json
import os
import shutil
import subprocess

import pytest

import pare.compress as compress_module
from pare.cli import main
from pare.loading import load_bundle

TINY = ["--profile-videos", "2", "--sample-steps", "4", "--data-videos", "6", "--distill-steps", "3",
        "--route-steps", "3", "--batch-size", "8", "--eval-n", "3", "--baselines"]  # fmt: skip
STAGES = ["profile", "prune", "data", "distill", "route", "model", "eval", "bench", "report"]


@pytest.fixture(scope="module")
def compressed(stage_inputs, tmp_path_factory):
    """A compress run killed in the distill stage, then run again to the end; the stages each run ran."""
    _, teacher = stage_inputs
    out = tmp_path_factory.mktemp("compress") / "run"
    ran: list[list[str]] = [[], []]
    real = compress_module._run_cli

    def killed_in_distill(stage):
        ran[0].append(stage.name)
        real(stage)

    import pare.distill

    train = pare.distill.distill

    def ctrl_c(*args, **kwargs):  # Ctrl-C inside the distill command itself
        raise KeyboardInterrupt

    compress_module._run_cli, pare.distill.distill = killed_in_distill, ctrl_c
    try:
        assert main(["compress", "--model", teacher, "--out", str(out), *TINY]) == 130  # "pare: interrupted"
    finally:
        compress_module._run_cli, pare.distill.distill = real, train
    first = json.loads((out / "stages.json").read_text())["stages"]

    def counted(stage):
        ran[1].append(stage.name)
        real(stage)

    compress_module._run_cli = counted
    try:
        assert main(["compress", "--model", teacher, "--out", str(out), *TINY]) == 0
    finally:
        compress_module._run_cli = real
    return teacher, out, ran, first


def test_a_killed_run_resumes_without_redoing_finished_stages(compressed):
    teacher, out, ran, first = compressed
    assert ran[0] == ["profile", "prune", "data", "distill"]
    assert {k: v["finished"] for k, v in first.items()} == {"profile": True, "prune": True, "data": True,
                                                            "distill": False}  # fmt: skip
    assert ran[1] == ["distill", "route", "eval", "bench"]  # model/ and the report are compress's own steps, not commands
    stages = json.loads((out / "stages.json").read_text())["stages"]
    assert list(stages) == STAGES and all(s["finished"] for s in stages.values())
    assert all(stages[k]["seconds"] == first[k]["seconds"] for k in ("profile", "prune", "data"))  # not redone


def test_a_finished_run_skips_every_stage(compressed, capsys, monkeypatch):
    teacher, out, _, _ = compressed
    before = (out / "stages.json").read_text()
    monkeypatch.setattr(compress_module, "_run_cli", lambda s: pytest.fail(f"{s.name} ran again"))
    assert main(["compress", "--model", teacher, "--out", str(out), *TINY]) == 0
    out_text = capsys.readouterr().out
    assert out_text.count("finished earlier with the same settings, skipped") == len(STAGES)
    stages = json.loads((out / "stages.json").read_text())["stages"]
    old = json.loads(before)["stages"]
    assert stages == old


def test_what_runs_again(tmp_path):
    """Finished stages with the same command are skipped, up to the first that is not: it and every stage after
    it run (their inputs change), so a bench stage added to a finished run gets a new report."""
    c = compress_module.CompressConfig(baselines=True).resolved()
    stages = compress_module.plan("builtin:shapes-t2v", tmp_path, c, 25)
    names = [s.name for s in stages]
    finished = {s.name: {"argv": s.argv, "finished": True} for s in stages}
    assert compress_module.to_run(stages, finished) == []
    without_bench = {k: v for k, v in finished.items() if k != "bench"}
    assert [s.name for s in compress_module.to_run(stages, without_bench)] == ["bench", "report"]
    killed = {**finished, "route": {**finished["route"], "finished": False}}
    assert [s.name for s in compress_module.to_run(stages, killed)] == names[names.index("route"):]


def test_the_compressed_model_loads_and_routes(compressed):
    _, out, _, _ = compressed
    bundle = load_bundle(str(out / "model"))
    assert type(bundle.transformer).__name__ == "RoutedWanTransformer3DModel"
    manifest = json.loads((out / "model" / "pare.json").read_text())
    assert manifest["kind"] == "routed" and manifest["settings"]["budget"] == 0.9  # the quick preset's budget


def test_report_numbers_equal_the_eval_command_run_by_hand(compressed, tmp_path, capsys):
    """The eval stage is `pare eval` itself: typed by hand with the recorded settings it gives the same numbers,
    and those numbers are the report's table."""
    teacher, out, _, _ = compressed
    stages = json.loads((out / "stages.json").read_text())["stages"]
    argv = stages["eval"]["argv"]
    by_hand = list(argv)
    by_hand[by_hand.index("--out") + 1] = str(tmp_path / "eval")
    assert main(by_hand) == 0
    capsys.readouterr()
    mine, theirs = (json.loads((d / "results.json").read_text()) for d in (out / "eval", tmp_path / "eval"))
    for side in ("model_scores", "reference_scores"):
        for key in ("seconds_per_video",):  # measured time: the one field that differs run to run
            mine[side].pop(key), theirs[side].pop(key)
    assert mine == theirs
    from pare.evaluation import table_rows

    page = (out / "report.html").read_text()
    for name, a, b in table_rows(json.loads((out / "eval" / "results.json").read_text())):
        if "seconds" not in name:
            assert f"<td>{name}</td><td>{a:.4g}</td>" in page.replace("&#x27;", "'")


@pytest.mark.parametrize("extra, message", [
    (["--preset", "huge"], "--preset must be one of quick, default, wan-14b"),
    (["--budget", "0"], "--budget must be in (0, 1]"),
    (["--budget", "1.5"], "--budget must be in (0, 1]"),
    (["--router", "random"], "--router must be one of content, timestep, static"),
    (["--guided-weight", "-1"], "--guided-weight must be >= 0"),
    (["--device", "tpu"], "--device must be cpu, cuda or cuda:N, got 'tpu'"),
    (["--dtype", "fp8"], "--dtype must be one of fp32, bf16, fp16, got 'fp8'"),
    (["--eval-prompts", "{empty}"], "holds no prompts"),
])  # fmt: skip
def test_bad_input_fails_before_any_stage(stage_inputs, tmp_path, capsys, monkeypatch, extra, message):
    _, teacher = stage_inputs
    monkeypatch.setattr(compress_module, "_run_cli", lambda s: pytest.fail("a stage started"))
    (tmp_path / "empty.txt").write_text("\n")
    extra = [e.format(empty=tmp_path / "empty.txt") for e in extra]
    assert main(["compress", "--model", teacher, "--out", str(tmp_path / "c"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "c").exists()


def test_a_model_the_loader_refuses_fails_before_any_stage(tmp_path, capsys):
    assert main(["compress", "--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "no model at" in err and err.count("\n") == 1
    assert not (tmp_path / "c").exists()


def test_a_transformer_without_text_encoder_is_refused(pixel_model_dir, tmp_path, capsys):
    assert main(["compress", "--model", str(pixel_model_dir), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "comes without a text encoder" in err and err.count("\n") == 1
    assert not (tmp_path / "c").exists()


def test_an_out_holding_other_files_is_refused_untouched(stage_inputs, tmp_path, capsys):
    _, teacher = stage_inputs
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    assert main(["compress", "--model", teacher, "--out", str(busy)]) == 2
    assert "already holds other files" in capsys.readouterr().err
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]


def test_other_settings_on_a_finished_run_are_refused(compressed, capsys):
    teacher, out, _, _ = compressed
    before = (out / "stages.json").read_text()
    assert main(["compress", "--model", teacher, "--out", str(out), *TINY[:-3], "--eval-n", "4", "--baselines"]) == 2
    err = capsys.readouterr().err
    assert "finished eval stage made with other settings" in err and err.count("\n") == 1
    assert (out / "stages.json").read_text() == before


def test_side_by_side_gif_sizes_and_frames():
    from PIL import Image, ImageSequence
    import io
    import numpy as np

    from pare.report import MAX_GIF_WIDTH, side_by_side_gif

    left = np.zeros((3, 32, 32, 3), np.uint8)
    left[:, :, :, 0] = np.arange(3)[:, None, None] * 60  # frames that differ (Pillow merges equal ones)
    right = np.full((3, 32, 32, 3), 255, np.uint8)
    gif = Image.open(io.BytesIO(side_by_side_gif(left, right, gap=2)))
    frames = [f.convert("RGB") for f in ImageSequence.Iterator(gif)]
    assert len(frames) == 3 and frames[0].size == (2 * 320 + 2, 320)  # 32 -> 320: x10, whole pixels
    px = np.asarray(frames[1])
    assert (px[:, :320] == [60, 0, 0]).all() and (px[:, 322:] == 255).all() and (px[:, 320:322] == 128).all()
    wan = np.zeros((2, 480, 832, 3), np.uint8)  # a Wan 480p video shrinks to the report's width
    assert Image.open(io.BytesIO(side_by_side_gif(wan, wan))).size == (2 * MAX_GIF_WIDTH + 2, 185)


def test_timesteps_spread_like_the_profile_default():
    assert compress_module._timesteps(25) == "0,6,12,18,24"
    assert compress_module._timesteps(4) == "0,1,2,3"
    assert compress_module._timesteps(2) == "0,1"


# --- the report in a browser -------------------------------------------------------------------------------

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
CHECK = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images], vids = [...document.querySelectorAll('video')];
  const bad = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt)
    .concat(vids.filter(v => v.error || v.readyState < 2).map(v => 'video'));
  const out = document.createElement('pre'); out.id = 'pare-check';
  out.textContent = JSON.stringify({images: imgs.length, videos: vids.length, bad: bad});
  document.body.appendChild(out);
});</script>"""


@pytest.fixture(scope="module")
def chromium():
    """Debian's chromium, installed here where it is missing (as root, with apt); skipped where it cannot be."""
    path = shutil.which("chromium")
    if path is None and shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], env=env, capture_output=True, timeout=900)
        path = shutil.which("chromium")
    if path is None:
        pytest.skip("no chromium, and it cannot be installed here (needs root and Debian's apt-get)")
    return path


def test_every_image_of_the_report_loads_in_chromium(compressed, chromium, tmp_path):
    _, out, _, _ = compressed
    page = (out / "report.html").read_text()
    assert page.count("<img ") == 7  # 4 report prompts as GIFs, the routes picture, the head-role map, Pareto
    checked = tmp_path / "report.html"
    checked.write_text(page.replace("</body>", CHECK + "</body>"))
    dom = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                          "--virtual-time-budget=10000", "--dump-dom", checked.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout  # fmt: skip
    start = dom.index('<pre id="pare-check">') + len('<pre id="pare-check">')
    result = json.loads(dom[start : dom.index("</pre>", start)])
    assert result == {"images": 7, "videos": 0, "bad": []}


def test_the_wan_14b_preset_launches_the_training_stages_on_8_processes(tmp_path):
    c = compress_module.CompressConfig(preset="wan-14b", prompts=None).resolved()
    stages = {s.name: s for s in compress_module.plan("/ckpt/Wan2.1-T2V-14B", tmp_path / "c", c, 50)}
    assert [s.processes for s in stages.values()] == [1, 1, 1, 8, 8, 1, 1, 1]
    for name in ("distill", "route"):  # the settings scripts/wan14b_estimates.py finds under 80 GB per GPU
        command = stages[name].command()
        assert command.startswith("accelerate launch --num_processes 8 --mixed_precision bf16 --use_fsdp ")
        assert f"-m pare.cli {name} " in command and command.endswith("--gradient-checkpointing")
        assert "--batch-size 8 " in command
    assert "--frames 17 --height 240 --width 416" in stages["profile"].command()
    assert "--shard-videos 5 " in stages["data"].command()
    assert stages["profile"].argv[-4:] == ["--device", "cuda", "--dtype", "bf16"]
    assert "--heads-multiple-of 8" in stages["prune"].command()


def test_a_wan_config_without_weights_is_refused(tmp_path, capsys):
    assert main(["compress", "--model", "wan2.1-t2v-14b", "--preset", "wan-14b", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "config without weights" in err and err.count("\n") == 1


def test_an_i2v_model_s_first_frames_reach_every_stage_that_samples(tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    c = compress_module.CompressConfig(preset="wan-14b", prompts=None, images=frames, baselines=True).resolved()
    stages = {s.name: s for s in compress_module.plan("/ckpt/Wan2.1-I2V-14B", tmp_path / "c", c, 50)}
    takes = {name for name, s in stages.items() if f"--images {frames.resolve()}" in s.command()}
    assert takes == {"profile", "prune", "data", "eval", "bench"}  # distill and route read the data's
    with pytest.raises(compress_module.PareError, match="expected a folder of first frames"):
        compress_module.CompressConfig(preset="wan-14b", images=tmp_path / "none").resolved()


def test_held_out_prompts_and_frames_go_to_eval_and_bench_only(tmp_path):
    """--eval-prompts and --eval-images: the eval and bench stages (and the report) score on them; the stages that
    compress the model keep --prompts and --images."""
    frames, held, prompts, held_prompts = (tmp_path / n for n in ("frames", "held", "p.txt", "h.txt"))
    for folder in (frames, held):
        folder.mkdir()
    prompts.write_text("a cat\n")
    held_prompts.write_text("a dog\n")
    c = compress_module.CompressConfig(preset="wan-14b", prompts=prompts, images=frames, eval_prompts=held_prompts,
                                       eval_images=held, baselines=True).resolved()  # fmt: skip
    assert c.held_out == (held_prompts, held)
    stages = {s.name: s for s in compress_module.plan("/ckpt/Wan2.1-I2V-14B", tmp_path / "c", c, 50)}
    own = {name for name, s in stages.items() if f"--prompts {prompts.resolve()}" in s.command()}
    scored = {name for name, s in stages.items() if f"--prompts {held_prompts.resolve()} --images {held.resolve()}"
              in s.command()}  # fmt: skip
    assert own == {"profile", "prune", "data"} and scored == {"eval", "bench"}
    assert not any(str(frames.resolve()) in stages[n].command() for n in scored)
    c = compress_module.CompressConfig(preset="wan-14b", prompts=prompts, images=frames).resolved()
    assert c.held_out == (prompts, frames)  # by default, the same ones
    for bad, message in (({"eval_prompts": tmp_path / "no.txt"}, "--eval-prompts .*no.txt: no such file"),
                         ({"eval_images": tmp_path / "none"}, "--eval-images .*none: expected a folder"),
                         ({"images": None, "eval_images": held}, "--eval-images is for image-to-video models")):
        with pytest.raises(compress_module.PareError, match=message):
            compress_module.CompressConfig(**{"preset": "wan-14b", "prompts": prompts, "images": frames, **bad}).resolved()


def test_guided_weight_reaches_the_distill_stage_alone(tmp_path):
    """--guided-weight is stage 1's loss term: it is passed to `pare distill` and to no other stage; at 0 the
    distill command is the one written before the knob existed, so finished runs recorded then still resume."""
    plans = {}
    for weight in (0.0, 0.5):
        c = compress_module.CompressConfig(preset="quick", guided_weight=weight).resolved()
        plans[weight] = {s.name: s.command() for s in compress_module.plan("builtin:shapes-t2v", tmp_path / "c", c, 25)}
    assert {n for n, cmd in plans[0.5].items() if "--guided-weight" in cmd} == {"distill"}
    assert plans[0.5]["distill"] == plans[0.0]["distill"].replace("--seed 0", "--seed 0 --guided-weight 0.5")
    assert {n: cmd for n, cmd in plans[0.5].items() if n != "distill"} == {
        n: cmd for n, cmd in plans[0.0].items() if n != "distill"}
    for preset, weight in (("quick", "1.0"), ("default", "1.0")):  # the CPU presets' recipe; wan-14b is unmeasured
        c = compress_module.CompressConfig(preset=preset).resolved()
        distill = {s.name: s for s in compress_module.plan("builtin:shapes-t2v", tmp_path / "c", c, 25)}["distill"]
        assert f"--seed 0 --guided-weight {weight}" in distill.command()
    c = compress_module.CompressConfig(preset="wan-14b").resolved()
    assert "--guided-weight" not in {s.name: s for s in compress_module.plan("/ckpt/w", tmp_path / "c", c, 50)}[
        "distill"].command()
