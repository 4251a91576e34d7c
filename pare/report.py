"""`DIR/report.html` of `pare compress`: one self-contained page (every image embedded as a data URI, so the
file can be mailed or opened from anywhere) with what a person wants to see of a compressed model:

- teacher and compressed model side by side, as animated GIFs, on the same prompts and seeds;
- the router's decisions: blocks x sampling steps for each of those prompts, and where the prompts differ;
- the quality and compute table (the eval stage's `results.json`, the rows of `pare eval`'s `results.md`);
- the pruning plan (heads and FFN width kept per block) and the head-role map of the profile;
- the Pareto plot and table of `pare bench`, when the baselines were run;
- the stage commands, to re-run any stage by hand.
"""

from __future__ import annotations

import base64
import html
import io
import json
import textwrap
from pathlib import Path

import numpy as np
import torch

from .errors import optional_module
from .io import atomic_path

GIF_FRAME_MS = 160
MAX_GIF_WIDTH = 320  # pixels per video in the side-by-side GIFs


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _png_file(path: Path) -> str | None:
    return _data_uri(path.read_bytes(), "image/png") if path.is_file() else None


def side_by_side_gif(left: np.ndarray, right: np.ndarray, gap: int = 2) -> bytes:
    """Two videos (F, H, W, 3) uint8 as one animated GIF, left | gap | right, scaled up with nearest pixels so
    that tiny domain videos are large enough to look at."""
    Image = optional_module("PIL.Image")  # Pillow comes with matplotlib (the eval extra)
    F, H, W, _ = left.shape
    scale = MAX_GIF_WIDTH / W  # tiny videos grow by whole pixels; Wan's 832-wide ones shrink smoothly
    scale, resample = (max(1, int(scale)), Image.NEAREST) if scale >= 1 else (scale, Image.BILINEAR)
    w, h = max(1, round(W * scale)), max(1, round(H * scale))
    frames = []
    for f in range(F):
        canvas = Image.new("RGB", (2 * w + gap, h), (128, 128, 128))
        canvas.paste(Image.fromarray(left[f]).resize((w, h), resample), (0, 0))
        canvas.paste(Image.fromarray(right[f]).resize((w, h), resample), (w + gap, 0))
        frames.append(canvas)
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=GIF_FRAME_MS, loop=0)
    return buf.getvalue()


def routes_figure(routes: np.ndarray, prompts: list[str]) -> bytes:
    """routes: (prompts, steps, blocks) bool. One panel per prompt (blocks x steps, dark = run), and a last panel
    with the share of prompts running each block at each step: where it is neither 0 nor 1, routes differ."""
    matplotlib = optional_module("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    P, S, B = routes.shape
    fig, axes = plt.subplots(1, P + 1, figsize=(2.2 * (P + 1) + 0.6, 2.6), sharey=True)
    for ax, r, p in zip(axes, routes, prompts):
        ax.imshow(r.T, aspect="auto", cmap="Greys", vmin=0, vmax=1.4, interpolation="nearest")
        ax.set_title("\n".join(textwrap.wrap(p, 26)), fontsize=7)
        ax.set_xlabel("step", fontsize=8)
    share = routes.mean(0).T  # (blocks, steps)
    im = axes[-1].imshow(share, aspect="auto", cmap="coolwarm", vmin=0, vmax=1, interpolation="nearest")
    differ = (share > 0) & (share < 1)
    axes[-1].set_title(f"share of prompts running\n({int(differ.sum())} of {S * B} cells differ)", fontsize=7)
    axes[-1].set_xlabel("step", fontsize=8)
    axes[0].set_ylabel("block", fontsize=8)
    axes[0].set_yticks(range(B))
    for ax in axes:
        ax.set_xticks(range(0, S, max(1, S // 6)))
    fig.colorbar(im, ax=axes[-1], fraction=0.08)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def report_prompts(bundle, prompts_file: Path | None, n: int) -> list[str]:
    if prompts_file is not None:
        lines = [ln.strip() for ln in Path(prompts_file).read_text().splitlines() if ln.strip()]
        return lines[:n]
    return bundle.prompt_encoder.own_prompts(n, "heldout")


@torch.no_grad()
def side_by_side(teacher, compressed, prompts: list[str], sampler, progress: bool = True):
    """Generate with both models on the same prompts and seeds; returns (teacher videos, compressed videos,
    routes (prompts, steps, blocks) bool or None for a model without a router)."""
    from .generate import generate, heldout_images

    records: list[torch.Tensor] = []
    model = compressed.transformer
    hook = model.register_forward_hook(lambda m, a, o: records.append(m.last_route[: len(prompts)].cpu())) \
        if hasattr(model, "last_route") else None  # fmt: skip
    try:
        t = generate(teacher, prompts, sampler, progress=progress, images=heldout_images(teacher, prompts)).videos
        c = generate(compressed, prompts, sampler, progress=progress, images=heldout_images(compressed, prompts)).videos
    finally:
        if hook is not None:
            hook.remove()
    routes = None
    if records:  # one forward per step (batched CFG) or two (cond first): keep the conditional one
        per_step = len(records) // sampler.steps
        routes = torch.stack(records[::per_step]).transpose(0, 1).numpy().astype(bool)  # (P, steps, blocks)
    return t.numpy(), c.numpy(), routes


def _table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _plan_table(prune_record: dict) -> str:
    r = prune_record.get("report", {})
    rows = [[b, s, c, f] for b, (s, c, f) in enumerate(zip(r.get("self_heads", []), r.get("cross_heads", []),
                                                          r.get("ffn_dims", [])))]  # fmt: skip
    note = (f"<p>Parameters {r['params_before']:,} &rarr; {r['params_after']:,} "
            f"({r['params_after'] / r['params_before']:.3f}).</p>") if "params_before" in r else ""  # fmt: skip
    return _table(["block", "self-attention heads kept", "cross-attention heads kept", "FFN width kept"], rows) + note


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}
th{background:#f3f3f3}td:not(:first-child){text-align:right}img{max-width:100%}figure{margin:1em 0}
figcaption{font-size:13px;color:#555}code{background:#f6f6f6;padding:1px 3px;font-size:12px}
.videos{display:flex;flex-wrap:wrap;gap:1.2em}pre{white-space:pre-wrap;overflow-wrap:anywhere;font-size:12px}"""


def build_html(*, title: str, summary: str, videos: list[tuple[str, str]], routes_png: str | None,
               quality: tuple[list[str], list[list]] | None, plan_html: str, heads_png: str | None,
               pareto_png: str | None, bench_md: str | None, commands: list[str]) -> str:  # fmt: skip
    """The page from its parts (data URIs and tables); every part but the title may be empty."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>{summary}"]  # fmt: skip
    if videos:
        parts.append("<h2>Teacher (left) and compressed model (right), same prompts and seeds</h2><div class='videos'>")
        parts += [f"<figure><img src='{uri}' alt='{html.escape(p)}'><figcaption>{html.escape(p)}</figcaption></figure>"
                  for p, uri in videos]  # fmt: skip
        parts.append("</div>")
    if routes_png:
        parts.append("<h2>The router's decisions</h2><p>Blocks (rows) run at each sampling step (columns) for the "
                     "prompts above, conditional pass; the last panel: the share of these prompts running each "
                     f"block, where it is neither 0 nor 1 the route depends on the input.</p><img src='{routes_png}' "
                     "alt='routes'>")  # fmt: skip
    if quality:
        parts.append("<h2>Quality and compute</h2>" + _table(*quality))
    if plan_html:
        parts.append("<h2>Pruning plan</h2>" + plan_html)
    if heads_png:
        parts.append("<h2>Head roles (profile)</h2><p>Each block's self-attention heads: attention mass on the own "
                     f"frame (S spatial, T temporal, M mixed), importance and role-aware score.</p><img src='{heads_png}' "
                     "alt='head roles'>")  # fmt: skip
    if pareto_png:
        parts.append(f"<h2>Against the baselines</h2><img src='{pareto_png}' alt='Pareto plot'>")
    if bench_md:
        parts.append(f"<pre>{html.escape(bench_md)}</pre>")
    if commands:
        parts.append("<h2>The stage commands</h2><p>Each stage is this command; run by hand with the same settings, "
                     "it gives the same numbers.</p><pre>" + html.escape("\n".join(commands)) + "</pre>")  # fmt: skip
    return "".join(parts) + "</body></html>\n"


def write_report(out: Path, model: str, config, progress: bool = True) -> Path:
    """Write `out/report.html` from the stage folders of a `pare compress` run in `out`."""
    from .evaluation import table_rows
    from .loading import load_bundle, weights_dtype
    from .sampling import SamplerConfig

    out = Path(out)
    kwargs = {"device": torch.device(config.device), "dtype": weights_dtype(config.dtype, config.device)}
    teacher, compressed = load_bundle(model, **kwargs), load_bundle(str(out / "model"), **kwargs)
    prompts_file, teacher.images_dir = config.held_out  # the eval stage's prompts and first frames (I2V)
    compressed.images_dir = teacher.images_dir
    prompts = report_prompts(teacher, prompts_file, config.report_prompts)
    chosen = {"steps": config.sample_steps} if config.sample_steps else {}
    sampler = SamplerConfig(**{**teacher.sampler_defaults, **chosen, "seed": config.seed})
    t, c, routes = side_by_side(teacher, compressed, prompts, sampler, progress)
    videos = [(p, _data_uri(side_by_side_gif(a, b), "image/gif")) for p, a, b in zip(prompts, t, c)]
    routes_png = _data_uri(routes_figure(routes, prompts), "image/png") if routes is not None else None
    quality = None
    results = out / "eval" / "results.json"
    if results.is_file():
        result = json.loads(results.read_text())
        quality = (["metric", "compressed", "teacher"], [[n, a, "" if b is None else b] for n, a, b in table_rows(result)])
    prune_json = out / "prune" / "pare.json"
    plan_html = _plan_table(json.loads(prune_json.read_text())) if prune_json.is_file() else ""
    stages = json.loads((out / "stages.json").read_text())["stages"] if (out / "stages.json").is_file() else {}
    commands = [s["command"] for s in stages.values() if s.get("argv")]
    bench_md = (out / "bench" / "results.md").read_text() if (out / "bench" / "results.md").is_file() else None
    summary = (f"<p>Model <code>{html.escape(model)}</code>, preset <code>{html.escape(config.preset)}</code>: "
               f"{config.heads:.0%} of heads and {config.ffn:.0%} of FFN channels removed, a {config.router} router at "
               f"budget {config.budget}. The compressed model is <code>{html.escape(str((out / 'model').resolve()))}</code> "
               "(pass it as <code>--model</code>).</p>")  # fmt: skip
    if quality:
        m, r = result["model_scores"], result["reference_scores"]
        key = (f"<p><b>{m['flops_ratio']:.2f}x the teacher's FLOPs per step</b> ({m['flops_per_step'] / 1e9:.3g} against "
               f"{r['flops_per_step'] / 1e9:.3g} GFLOP per video), {m['seconds_per_video']:.3g} s per video against "
               f"{r['seconds_per_video']:.3g} s (measured here, {len(result['prompts'])} prompts)")  # fmt: skip
        if "shapes" in m:
            key += "; compressed / teacher: " + ", ".join(f"{k} {m['shapes'][k]:.1f} / {r['shapes'][k]:.1f}"
                                                         for k in ("colour", "shape", "direction", "count"))  # fmt: skip
        summary += key + ".</p>"
    page = build_html(title=f"PARE: {model} compressed", summary=summary, videos=videos, routes_png=routes_png,
                      quality=quality, plan_html=plan_html, heads_png=_png_file(out / "profile" / "heads.png"),
                      pareto_png=_png_file(out / "bench" / "pareto.png"), bench_md=bench_md, commands=commands)  # fmt: skip
    path = out / "report.html"
    with atomic_path(path) as tmp:
        tmp.write_text(page)
    return path
