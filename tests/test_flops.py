import copy
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import tiny_wan
from pare import arch
from pare.arch import PIXEL_SPACE, TokenGrid
from pare.cli import main
from pare.flops import count_flops, cpu_sdpa_flop_formula
from pare.loading import load

CPU_SDPA = cpu_sdpa_flop_formula()


def measured_flops(model, grid: TokenGrid, text_tokens: int, image_tokens: int = 0) -> int:
    """FLOPs of a real forward as torch's FlopCounterMode counts them (matmuls, convolution, attention)."""
    c = model.config
    p_t, p_h, p_w = c.patch_size
    x = torch.randn(1, c.in_channels, grid.frames * p_t, grid.height * p_h, grid.width * p_w)
    kwargs = {}
    if image_tokens:
        kwargs["encoder_hidden_states_image"] = torch.randn(1, image_tokens, c.image_dim)
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as counter, torch.no_grad():
        model(x, torch.tensor([500]), torch.randn(1, text_tokens, c.text_dim), return_dict=False, **kwargs)
    return counter.get_total_flops()


@pytest.mark.parametrize("grid", [TokenGrid(3, 4, 4), TokenGrid(5, 2, 6)])
def test_t2v_matches_flop_counter_mode(grid):
    model = tiny_wan()
    counted = count_flops(model, grid, text_tokens=7).total()
    measured = measured_flops(model, grid, 7)
    assert abs(counted - measured) <= 0.01 * measured


def test_i2v_counts_image_cross_attention():
    model = tiny_wan(image_dim=8, added_kv_proj_dim=24, in_channels=5)
    grid = TokenGrid(2, 4, 4)
    report = count_flops(model, grid, text_tokens=512, image_tokens=6)
    assert report.blocks[0].image_attn == 2 * grid.tokens * 6 * (24 + 24)
    measured = measured_flops(model, grid, 512, image_tokens=6)
    assert abs(report.total() - measured) <= 0.01 * measured


def test_pruned_structure_is_counted_as_it_runs():
    """Fewer heads in one block and a narrower FFN in another: the count follows the modules' real shapes."""
    model = tiny_wan()
    attn = model.blocks[0].attn1
    keep = slice(0, arch.head_dim(attn))  # keep head 0 of 2
    for name in ("to_q", "to_k", "to_v"):
        lin = getattr(attn, name)
        new = torch.nn.Linear(lin.in_features, keep.stop)
        new.weight.data, new.bias.data = lin.weight.data[keep].clone(), lin.bias.data[keep].clone()
        setattr(attn, name, new)
    out = attn.to_out[0]
    attn.to_out[0] = torch.nn.Linear(keep.stop, out.out_features)
    for norm in ("norm_q", "norm_k"):
        setattr(attn, norm, torch.nn.RMSNorm(keep.stop, eps=1e-6))
    attn.heads = 1
    up, down = arch.ffn_linears(model.blocks[1])
    model.blocks[1].ffn.net[0].proj = torch.nn.Linear(up.in_features, 8)
    model.blocks[1].ffn.net[2] = torch.nn.Linear(8, down.out_features)

    grid = TokenGrid(3, 4, 4)
    full = count_flops(tiny_wan(), grid, 7)
    pruned = count_flops(model, grid, 7)
    S, D = grid.tokens, 24
    assert full.blocks[0].self_attn - pruned.blocks[0].self_attn == 2 * S * S * (12 + 12)
    assert full.blocks[1].ffn - pruned.blocks[1].ffn == 2 * S * (D * 24 + 24 * D)
    measured = measured_flops(model, grid, 7)
    assert abs(pruned.total() - measured) <= 0.01 * measured


def test_routed_blocks_count_only_what_runs():
    model = tiny_wan(num_layers=3)
    grid = TokenGrid(3, 4, 4)
    report = count_flops(model, grid, 7)
    skipped = copy.deepcopy(model)
    skipped.blocks = torch.nn.ModuleList([skipped.blocks[0], skipped.blocks[2]])
    measured = measured_flops(skipped, grid, 7)
    assert abs(report.total([0, 2]) - measured) <= 0.01 * measured
    assert report.total([0, 2]) == report.total() - report.blocks[1].total


def hand_count_wan(S: int, L: int, D: int, F: int, n_blocks: int, text_dim=4096, freq=256, c_in=16, patch=4) -> int:
    """Wan2.1 T2V forward FLOPs written out term by term (2 x multiply-adds; attention QK^T + AV)."""
    self_attn = 2 * (4 * S * D * D) + 2 * (2 * S * S * D)  # q, k, v, out projections; QK^T and AV
    cross_attn = 2 * (2 * S * D * D + 2 * L * D * D) + 2 * (2 * S * L * D)  # q, out on video; k, v on text
    ffn = 2 * (2 * S * D * F)
    embed = 2 * (S * c_in * patch * D) + 2 * (freq * D + D * D + D * 6 * D) + 2 * L * (text_dim * D + D * D)
    head = 2 * S * D * c_in * patch
    return n_blocks * (self_attn + cross_attn + ffn) + embed + head


def test_wan_14b_480p_hand_count():
    model = load("wan2.1-t2v-14b", weights=False)
    assert next(model.parameters()).device.type == "meta"
    grid = arch.token_grid(model.config, arch.WAN_VAE, 81, 480, 832)
    assert (grid.frames, grid.height, grid.width, grid.tokens) == (21, 30, 52, 32760)
    total = count_flops(model, grid, text_tokens=512).total()
    assert total == hand_count_wan(S=32760, L=512, D=5120, F=13824, n_blocks=40)
    assert round(total / 1e15, 3) == 1.678  # the measured anchor: 1678 TFLOP per step


def test_wan_1p3b_480p_hand_count():
    model = load("wan2.1-t2v-1.3b", weights=False)
    total = count_flops(model, arch.token_grid(model.config, arch.WAN_VAE, 81, 480, 832), 512).total()
    assert total == hand_count_wan(S=32760, L=512, D=1536, F=8960, n_blocks=30)
    assert round(total / 1e12) == 283


def test_cli_flops_json(capsys):
    assert main(["flops", "--model", "wan2.1-t2v-14b", "--frames", "81", "--height", "480", "--width", "832", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["total"] == hand_count_wan(S=32760, L=512, D=5120, F=13824, n_blocks=40)
    assert d["tokens"] == 32760 and len(d["per_block"]) == 40


def test_cli_flops_on_saved_folder_matches_function(pixel_model_dir, capsys):
    assert main(["flops", "--model", str(pixel_model_dir), "--frames", "4", "--height", "8", "--width", "8", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["total"] == count_flops(tiny_wan(), TokenGrid(4, 4, 4), 512).total()
    assert PIXEL_SPACE.latent_shape(4, 8, 8) == (4, 8, 8)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "wan2.1-t2v-14b", "--frames", "80", "--height", "480", "--width", "832"], "1 + a multiple of 4"),
        (["--model", "wan2.1-t2v-14b", "--frames", "81", "--height", "484", "--width", "832"], "multiple of 8"),
        (["--model", "wan2.1-t2v-14b", "--frames", "81", "--height", "488", "--width", "832"], "patch size"),
        (["--model", "no/such/dir", "--frames", "81", "--height", "480", "--width", "832"], "no model at"),
        (["--frames", "81", "--height", "480", "--width", "832"], "Missing option '--model'"),
        (["--model", "wan2.1-t2v-14b", "--frames", "x", "--height", "480", "--width", "832"], "Invalid value"),
    ],
)
def test_cli_flops_bad_input(args, message, capsys):
    assert main(["flops", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
