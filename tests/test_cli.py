import json

import numpy as np
import pytest

from pare.cli import main
from pare.flops import count_flops
from pare.arch import TokenGrid
from pare.video import read_video
from conftest import tiny_wan


def run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_lists_commands(capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    for command in ("flops", "generate", "bench-latency"):
        assert command in out
    code, bare, _ = run([], capsys)  # bare `pare`: the same help, exit 0
    assert code == 0 and "generate" in bare and "Usage: pare" in bare
    code, out, _ = run(["generate", "--help"], capsys)  # values named plainly, no `<int>`-style tags
    assert code == 0 and "--steps N" in out and "--out PATH" in out and "<" + "int>" not in out and "<bool>" not in out


@pytest.mark.parametrize("args", [["--help"], ["generate", "--model", "/no/such/model", "--prompt", "x"]])
def test_the_process_group_is_torn_down_after_a_command(tmp_path, capsys, args):
    """A command run under torchrun leaves no process group to the interpreter's exit, where gloo aborts the
    process (SIGABRT) after its work is done; after a success and after bad input alike."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        code, _, _ = run(args, capsys)
        assert code == (0 if args == ["--help"] else 2)
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("worker", [False, True])
def test_a_worker_leaves_past_the_interpreter_exit(tmp_path, worker):
    """`pare` (the console script) in a worker of a multi-process launch: its output flushed and its exit code kept,
    it leaves through os._exit (no atexit handler, no teardown of objects that still hold the gloo group, where gloo
    can abort a finished worker); a single process exits normally."""
    import subprocess
    import sys

    script = (
        "import atexit, sys, torch.distributed as dist\n"
        f"if {worker}:\n"
        f"    dist.init_process_group('gloo', store=dist.FileStore({str(tmp_path / 'store')!r}, 1), rank=0, world_size=1)\n"
        "atexit.register(lambda: print('atexit ran'))\n"
        "from pare.cli import entry\n"
        "entry(sys.argv[1:])\n"
    )  # fmt: skip
    for args, code in ((["--help"], 0), (["generate", "--model", "/no/such/model", "--prompt", "x"], 2)):
        ran = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120)
        assert ran.returncode == code, ran.stderr[-2000:]
        assert ("Usage: pare" in ran.stdout) == (code == 0) and ("pare: error:" in ran.stderr) == (code == 2)
        assert ("atexit ran" in ran.stdout) == (not worker)


@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_generate_on_saved_transformer(tmp_path, pixel_model_dir, embeds_file, capsys, suffix):
    out = tmp_path / f"video{suffix}"
    code, stdout, err = run(["generate", "--model", str(pixel_model_dir), "--embeds", str(embeds_file),
                             "--prompt", "a red circle", "--frames", "4", "--height", "8", "--width", "8",
                             "--steps", "3", "--out", str(out)], capsys)  # fmt: skip
    assert code == 0, err
    frames = read_video(out)
    assert frames.shape == (4, 256, 256, 3)  # 8x8 enlarged 32x for viewing
    record = json.loads(out.with_suffix(".json").read_text())
    per_forward = count_flops(tiny_wan(), TokenGrid(4, 4, 4), 7).total()
    assert record["flops_per_forward_full"] == per_forward
    assert [s["flops"] for s in record["steps"]] == [2 * per_forward] * 3  # cond + uncond, every block
    assert "total:" in stdout and "1.000" in stdout


def test_generate_batch_writes_one_video_per_prompt(tmp_path, pixel_model_dir, embeds_file, capsys):
    out = tmp_path / "v.gif"
    code, _, err = run(["generate", "--model", str(pixel_model_dir), "--embeds", str(embeds_file), "--prompt",
                        "a red circle", "--prompt", "a blue square", "--frames", "2", "--height", "8", "--width", "8",
                        "--steps", "2", "--out", str(out)], capsys)  # fmt: skip
    assert code == 0, err
    a, b = read_video(tmp_path / "v-0.gif"), read_video(tmp_path / "v-1.gif")
    assert a.shape == b.shape == (2, 256, 256, 3) and not np.array_equal(a, b)


def test_generate_on_pipeline_folder(tmp_path, pipeline_dir, capsys):
    out = tmp_path / "wan.mp4"
    code, stdout, err = run(["generate", "--model", str(pipeline_dir), "--prompt", "a red circle moving left",
                             "--frames", "5", "--height", "32", "--width", "32", "--steps", "2", "--out", str(out)],
                            capsys)  # fmt: skip
    assert code == 0, err
    assert read_video(out).shape == (5, 256, 256, 3)
    assert len(json.loads(out.with_suffix(".json").read_text())["steps"]) == 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prompt", "a red circle"], "without a text encoder: pass --embeds"),
        (["--embeds", "{embeds}", "--prompt", "a green star"], "is not in"),
        (["--embeds", "{embeds}", "--prompt", "a red circle", "--steps", "0"], "--steps must be at least 1"),
        (["--embeds", "{embeds}", "--prompt", "a red circle", "--scheduler", "ddim"], "--scheduler must be one of"),
        (["--embeds", "{tmp}/none.safetensors", "--prompt", "a red circle"], "no embeddings file"),
        (["--embeds", "{embeds}", "--prompt", "a red circle", "--device", "tpu9"], "--device must be"),
        (["--embeds", "{embeds}", "--prompt", "a red circle", "--height", "7"], "patch size"),
        (["--embeds", "{embeds}", "--prompt", "a red circle", "--guidance", "nan"], "--guidance must be a finite number"),
        (["--embeds", "{embeds}", "--prompt", "a red circle", "--shift", "inf"], "--shift must be a positive number"),
    ],
)
def test_generate_bad_input(tmp_path, pixel_model_dir, embeds_file, capsys, extra, message):
    out = tmp_path / "v.mp4"
    extra = [e.format(embeds=embeds_file, tmp=tmp_path) for e in extra]
    code, _, err = run(["generate", "--model", str(pixel_model_dir), "--frames", "2", "--height", "8", "--width", "8",
                        "--out", str(out), *extra], capsys)  # fmt: skip
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_generate_bad_out_suffix_and_missing_size(tmp_path, pixel_model_dir, embeds_file, capsys):
    code, _, err = run(["generate", "--model", str(pixel_model_dir), "--embeds", str(embeds_file), "--prompt",
                        "a red circle", "--out", str(tmp_path / "v.avi")], capsys)  # fmt: skip
    assert code == 2 and "--out must end in .mp4 or .gif" in err
    code, _, err = run(["generate", "--model", str(pixel_model_dir), "--embeds", str(embeds_file), "--prompt",
                        "a red circle", "--out", str(tmp_path / "v.mp4")], capsys)  # fmt: skip
    assert code == 2 and "no default video size: pass --frames --height --width" in err


def test_generate_refuses_image_to_video(tmp_path, capsys):
    d = tmp_path / "i2v"
    tiny_wan(in_channels=5, image_dim=8, added_kv_proj_dim=24).save_pretrained(d)
    code, _, err = run(["generate", "--model", str(d), "--prompt", "x", "--frames", "5", "--height", "16",
                        "--width", "16", "--out", str(tmp_path / "v.mp4")], capsys)  # fmt: skip
    assert code == 2 and "image-to-video" in err


def test_bench_latency_cpu_tiny(pixel_model_dir, capsys):
    code, out, err = run(["bench-latency", "--model", str(pixel_model_dir), "--frames", "2", "--height", "8",
                          "--width", "8", "--iters", "2", "--warmup", "1", "--json"], capsys)  # fmt: skip
    assert code == 0, err
    r = json.loads(out)
    assert r["device"] == "cpu" and r["dtype"] == "fp32" and r["tokens"] == 32 and len(r["seconds_all"]) == 2
    assert r["tflop_per_step"] * 1e12 == pytest.approx(count_flops(tiny_wan(), TokenGrid(2, 4, 4), 512).total())
    assert "not representative" in r["note"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "wan2.1-t2v-14b", "--frames", "81", "--height", "480", "--width", "832"], "tiny shapes only"),
        (["--model", "wan2.1-t2v-1.3b", "--frames", "5", "--height", "32", "--width", "32", "--dtype", "int3"], "--dtype"),
        (["--model", "wan2.1-t2v-1.3b", "--frames", "5", "--height", "32", "--width", "32", "--iters", "0"], "--iters"),
        (["--model", "wan2.1-t2v-1.3b", "--frames", "5", "--height", "32", "--width", "32", "--device", "cuda"], "no CUDA"),
    ],
)
def test_bench_latency_bad_input(extra, message, capsys):
    code, _, err = run(["bench-latency", *extra], capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("args", [
    ["profile", "--model", "builtin:shapes-t2v"],
    ["prune", "--model", "builtin:shapes-t2v", "--profile", "heads.json"],
    ["data", "--teacher", "builtin:shapes-t2v"],
    ["distill", "--teacher", "builtin:shapes-t2v", "--student", "s", "--data", "d"],
    ["route", "--teacher", "builtin:shapes-t2v", "--student", "s", "--data", "d"],
    ["teacher", "train"],
    ["eval", "--model", "builtin:shapes-t2v", "--reference", "builtin:shapes-t2v"],
    ["bench", "--model", "builtin:shapes-t2v"],
    ["eval-shapes", "--model", "builtin:shapes-t2v"],
])  # fmt: skip
def test_every_command_refuses_a_folder_of_other_files(tmp_path, capsys, args):
    """One rule for every command that writes a folder: a folder holding other files is refused, untouched."""
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    assert main([*args, "--out", str(busy)]) == 2
    err = capsys.readouterr().err
    assert "already holds other files" in err and err.count("\n") == 1
    assert [p.name for p in busy.iterdir()] == ["notes.txt"] and (busy / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("command, marker", [("profile", "heads.json"), ("prune", "pare.json")])
def test_a_file_of_the_user_s_named_like_an_output_marker_is_not_taken_for_one(tmp_path, capsys, command, marker):
    """A folder is an earlier output when its marker is PARE's own file: a heads.json (or pare.json) of the user's,
    which is not, leaves the folder the user's, refused and untouched."""
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / marker).write_text('{"mine": true}')
    args = {"profile": ["profile", "--model", "builtin:shapes-t2v"],
            "prune": ["prune", "--model", "builtin:shapes-t2v", "--profile", "heads.json"]}[command]
    assert main([*args, "--out", str(busy)]) == 2
    err = capsys.readouterr().err
    assert "already holds other files" in err and err.count("\n") == 1, err
    assert (busy / marker).read_text() == '{"mine": true}'


@pytest.mark.parametrize("args", [
    ["generate", "--model", "builtin:shapes-t2v", "--prompt", "a red circle moving left"],
    ["profile", "--model", "builtin:shapes-t2v"],
    ["prune", "--model", "builtin:shapes-t2v", "--profile", "heads.json"],
    ["data", "--teacher", "builtin:shapes-t2v"],
    ["distill", "--teacher", "builtin:shapes-t2v", "--student", "s", "--data", "d"],
    ["step-distill", "--teacher", "builtin:shapes-t2v", "--data", "d"],
    ["route", "--teacher", "builtin:shapes-t2v", "--student", "s", "--data", "d"],
    ["eval", "--model", "builtin:shapes-t2v", "--reference", "builtin:shapes-t2v"],
    ["bench", "--model", "builtin:shapes-t2v"],
    ["compress", "--model", "builtin:shapes-t2v"],
])  # fmt: skip
def test_an_output_path_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys, args):
    """An --out under a file (or on a mount that refuses writes) fails first, in one line, not in a traceback
    after the command's work is done."""
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    out = blocker / ("v.gif" if args[0] == "generate" else "run")
    assert main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--out {out}: cannot write there" in err and err.count("\n") == 1, err
    assert blocker.read_text() == "keep me"


def test_data_refuses_a_shape_the_patches_do_not_tile_before_writing(tmp_path, capsys):
    out = tmp_path / "data"
    assert main(["data", "--teacher", "builtin:shapes-t2v", "--videos", "2", "--shard-videos", "1", "--steps", "2",
                 "--frames", "9", "--out", str(out)]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "latent frames 9 is not divisible by the patch size 2" in err and err.count("\n") == 1, err
    assert not out.exists()


def test_a_missing_extra_says_how_to_install_it():
    from pare import PareError
    from pare.errors import optional_module

    assert optional_module("json").dumps([1]) == "[1]"
    missing = optional_module("no_such_module_for_pare")
    with pytest.raises(PareError, match=r"needs no_such_module_for_pare, which is not installed: pip install 'pare\[eval\]'"):
        missing.imread
