import torch

from conftest import tiny_wan
from pare.gates import Gates, gated

X = torch.randn(2, 3, 2, 8, 8, generator=torch.Generator().manual_seed(0))
T = torch.tensor([300, 800])
E = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(1))


def run(model):
    with torch.no_grad():
        return model(X, T, E, return_dict=False)[0]


def test_open_gates_change_nothing_and_hooks_come_off():
    model = tiny_wan()
    before = run(model)
    with gated(model, Gates.ones(model)):
        assert torch.equal(run(model), before)
    assert torch.equal(run(model), before)
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_closed_head_gate_equals_zeroed_output_columns():
    model = tiny_wan()
    gates = Gates.ones(model)
    gates.self_heads[1][0] = 0.0
    gates.ffn[0][5] = 0.0
    with gated(model, gates):
        gated_out = run(model)
    with torch.no_grad():
        model.blocks[1].attn1.to_out[0].weight[:, :12] = 0  # head 0 of 2, head_dim 12
        model.blocks[0].ffn.net[2].weight[:, 5] = 0
    torch.testing.assert_close(gated_out, run(model), rtol=0, atol=1e-6)
