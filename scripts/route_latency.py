"""Wall-clock saving of a routed model against its FLOP saving, and the router's own cost, side by side in one
run (interleaved repeats, medians): the same weights with every block on (dense) and with the trained routes.

    python scripts/route_latency.py --model runs/route-content/model --batch 16 --repeats 15
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pare import arch
from pare.flops import count_flops
from pare.loading import load_bundle


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=15)
    a = p.parse_args()
    torch.set_grad_enabled(False)
    bundle = load_bundle(a.model)
    model = bundle.transformer.eval()
    c = model.config
    grid = arch.token_grid(c, bundle.latent, *bundle.default_shape)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.batch, c.in_channels, *bundle.latent.latent_shape(*bundle.default_shape), generator=g)
    t = torch.linspace(50, 950, a.batch)
    from pare.shapes.domain import heldout_prompts

    text = bundle.prompt_encoder.encode(heldout_prompts(a.batch), "cpu", torch.float32)
    routed_mode = c.route_mode
    report = count_flops(model, grid, bundle.text_tokens)

    def run(mode):
        model.register_to_config(route_mode=mode)
        model(x, t, text)

    for mode in (routed_mode, "dense"):  # warm-up
        run(mode)
    model.register_to_config(route_mode=routed_mode)
    model(x, t, text)
    runs = [[r.nonzero().flatten().tolist() for r in model.last_route]]
    routed_flops = sum(report.total(r) for r in runs[0])
    dense_flops = a.batch * report.total()
    routed_t, dense_t = [], []
    for _ in range(a.repeats):  # interleaved, so that machine noise hits both alike
        routed_t += timed(lambda: run(routed_mode), 1)
        dense_t += timed(lambda: run("dense"), 1)
    model.register_to_config(route_mode=routed_mode)
    feats = (torch.randn(a.batch, model.config.num_attention_heads * model.config.attention_head_dim) for _ in range(3))
    f1, f2, f3 = feats
    router_t = timed(lambda: model.router(f1, f2, f3), a.repeats * 10)
    rt, dt, ro = statistics.median(routed_t), statistics.median(dense_t), statistics.median(router_t)
    print(f"{a.model}: batch {a.batch}, {grid.tokens} tokens, mode {routed_mode}, {a.repeats} interleaved repeats")
    print(f"{'':<22} {'s/forward':>10} {'GFLOP':>10}")
    print(f"{'dense (every block)':<22} {dt:>10.4f} {dense_flops / 1e9:>10.2f}")
    print(f"{'routed':<22} {rt:>10.4f} {routed_flops / 1e9:>10.2f}")
    print(f"wall-clock speed-up {dt / rt:.3f} x against a FLOP ratio of {dense_flops / routed_flops:.3f} x; "
          f"router alone {ro * 1e3:.3f} ms ({100 * ro / rt:.2f}% of a routed forward, "
          f"{100 * model.router.flops() * a.batch / routed_flops:.4f}% of its FLOPs)")


if __name__ == "__main__":
    main()
