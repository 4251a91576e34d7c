"""Compare models of the shapes domain with the teacher on held-out prompts, paired, and test claims about them.

    python scripts/compare_models.py --prompts 256 --work runs/claims/scores --out docs/claims/width_experiment \
        --model "teacher=builtin:shapes-t2v" --model "role-aware=runs/aware/distill/model" \
        --model "role-agnostic=runs/agnostic/distill/model" --claim "role-aware>role-agnostic" \
        [--sweep "multiplier:1=NAME,2=NAME,..."]

The first --model is the reference. Every model samples from the same seeds with the reference's sampler (steps,
guidance), a few-step model with its own (its K steps, no guidance), through `pare bench` (FLOPs per step counted,
seconds measured, videos kept in WORK, so a re-run only generates for models it has not seen). For each model: its
scores, and their change from the reference with a 95% paired bootstrap interval (`paired_difference`; the Frechet
distance is a set statistic and has no interval).
Each claim "A>B" (A scores higher than B) is tested metric by metric (supported / refuted / inconclusive) and as
a whole on the domain's accuracies: supported when A is ahead on at least one and behind on none, refuted the other
way round, mixed when ahead on some and behind on others, else inconclusive. (Motion smoothness and the Frechet
distance are reported beside them, not counted: a video that is broken can be smoother than a good one.) A sweep names the models of one knob's values; its
values are drawn against the scores and the one with the best mean accuracy is named. Writes OUT.json, OUT.md and
OUT.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from pare.errors import PareError, require, script_exit
from pare.evaluation import EvalConfig
from pare.evaluation.bench import Method, bench
from pare.generate import heldout_images
from pare.io import save_figure, write_result
from pare.loading import load_bundle
from pare.routing import RoutedWanTransformer3DModel, route_statistics
from pare.shapes.domain import heldout_prompts
from pare.shapes.evaluate import evaluate_videos, paired_difference, verdict

ACCURACIES = ("colour", "shape", "count", "direction", "speed")
ROUTE_PROMPTS = 64  # distinct routes of a routed model: over its first 64 prompts x every sampling step
METRICS = (*ACCURACIES, "motion_smoothness", "fd")


def named(text: str, what: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    require(sep and name and value, f"{what} {text!r}: expected NAME=VALUE")
    return name, value


def parse_claim(text: str, names: list[str] | None = None) -> tuple[str, str]:
    """"A>B" -> (A, B); with `names`, both must be among them."""
    left, sep, right = text.partition(">")
    known = left and right and (names is None or (left in names and right in names))
    require(sep and known, f"--claim {text!r}: expected A>B with A, B names of " + ("--model" if names else "rows"))
    return left, right


def parse_sweep(text: str, names: list[str]) -> dict:
    label, sep, rest = text.partition(":")
    require(sep and label and rest, f"--sweep {text!r}: expected LABEL:VALUE=NAME,VALUE=NAME,...")
    points = []
    for part in rest.split(","):
        value, name = named(part, "--sweep point")
        require(name in names, f"--sweep: {name!r} is not the name of a --model")
        try:
            points.append((float(value), name))
        except ValueError:
            raise PareError(f"--sweep point {part!r}: expected a number before '='") from None
    return {"label": label, "points": sorted(points)}


def run(models: list[tuple[str, str]], claims: list[tuple[str, str]], sweeps: list[dict], n: int, seed: int,
        batch_size: int, work: Path) -> dict:  # fmt: skip
    names = [name for name, _ in models]
    prompts = heldout_prompts(n)  # refuses more than the split has
    bundles = [load_bundle(spec) for _, spec in models]
    work.mkdir(parents=True, exist_ok=True)
    methods = [Method(name, "model", "", bundle) for (name, _), bundle in zip(models[1:], bundles[1:])]
    result = bench(bundles[0], methods, prompts, EvalConfig(seed=seed, batch_size=batch_size), store=work,
                   keep_videos=True)  # fmt: skip
    images = heldout_images(bundles[0], prompts)  # an I2V reference's first frames (every model got the same)
    rows = {}
    for (name, spec), row, bundle in zip(models, result["rows"], bundles):
        require("why_not" not in row, f"{name} could not run: {row.get('why_not')}")
        scores = evaluate_videos(row.pop("videos"), prompts, per_video=True, images=images)
        training = bundle.manifest.get("training") or {}
        rows[name] = {"model": spec, "flops_ratio": row["flops_ratio"], "seconds_per_video": row["seconds_per_video"],
                      "steps": row["steps"], "passes": row["passes"], "video_flops_ratio": row["video_flops_ratio"],
                      "psnr_to_reference": row["psnr"] if name != names[0] else None,
                      # the training run's own error to the teacher on its data's held-out shard
                      "held_out_error": (training.get("val_end") or {}).get("error"),
                      **{m: scores[m] for m in (*METRICS, "subject_consistency", "first_frame_psnr") if m in scores},
                      "per_video": scores["per_video"]}  # fmt: skip
        if isinstance(bundle.transformer, RoutedWanTransformer3DModel):
            routes = route_statistics(bundle, prompts[:ROUTE_PROMPTS], seed)
            rows[name]["distinct_routes"] = routes["distinct_routes_overall"]
    return {"prompts": n, "seed": seed, "sampler": result["sampler"], **summarize(rows, claims, sweeps)}


def summarize(rows: dict, claims: list[tuple[str, str]], sweeps: list[dict]) -> dict:
    """From each model's row (its scores and `per_video` rows; the first model is the reference): the changes
    from the reference, the claims' tests and the sweeps' best values. The rows lose their `per_video`."""
    names = list(rows)
    ref = rows[names[0]]["per_video"]
    changes = {name: paired_difference(ref, row["per_video"]) for name, row in rows.items() if name != names[0]}
    tests = []
    for a, b in claims:
        diff = paired_difference(rows[b]["per_video"], rows[a]["per_video"])  # A - B
        metrics = {m: {**d, "verdict": verdict(d, +1)} for m, d in diff.items()}
        metrics["fd"] = {"a": rows[b]["fd"], "b": rows[a]["fd"], "diff": rows[a]["fd"] - rows[b]["fd"]}
        said = [metrics[m]["verdict"] for m in ACCURACIES if m in metrics]
        ahead, behind = "supported" in said, "refuted" in said
        overall = ("supported" if ahead and not behind else "refuted" if behind and not ahead
                   else "mixed" if ahead else "inconclusive")  # fmt: skip
        tests.append({"claim": f"{a} > {b}", "a": a, "b": b, "metrics": metrics, "verdict": overall})
    for sweep in sweeps:
        means = {name: float(np.mean([rows[name][m] for m in ACCURACIES])) for _, name in sweep["points"]}
        sweep["mean_accuracy"] = means
        sweep["best"] = max(sweep["points"], key=lambda p: means[p[1]])
    for row in rows.values():
        row.pop("per_video")
    return {"reference": names[0], "rows": rows, "changes": changes, "claims": tests, "sweeps": sweeps}


def _cell(m: str, v: float) -> str:
    return f"{v:.3f}" if m == "motion_smoothness" else f"{v:.1f}"


def table_metrics(result: dict) -> tuple[str, ...]:
    """The table's metrics: an image-to-video comparison's add the first frame's PSNR to the given frame."""
    i2v = any("first_frame_psnr" in row for row in result["rows"].values())
    return (*METRICS, "first_frame_psnr") if i2v else METRICS


def markdown(result: dict) -> str:
    s = result["sampler"]
    metrics = table_metrics(result)
    lines = [f"{result['prompts']} held-out prompts, seeds {result['seed']}..{result['seed'] + result['prompts'] - 1}, "
             f"{s['steps']} steps at guidance {s['guidance_scale']} (a few-step model: its own steps, no guidance); "
             f"reference: {result['reference']}.", "",
             "| model | steps x passes | FLOPs per step vs reference | FLOPs per video vs reference | s per video | "
             + " | ".join(metrics) + " | PSNR to reference (dB) | held-out error | distinct routes |",
             "|---|---|---|---|---|" + "---|" * (len(metrics) + 3)]  # fmt: skip
    for name, row in result["rows"].items():
        cells = []
        for m in metrics:
            d = result["changes"].get(name, {}).get(m)
            cells.append(_cell(m, row[m]) + (f" ({d['diff']:+.{3 if m == 'motion_smoothness' else 1}f} "
                                             f"[{_cell(m, d['low'])}, {_cell(m, d['high'])}])" if d else ""))  # fmt: skip
        extra = [f"{row['psnr_to_reference']:.1f}" if row.get("psnr_to_reference") is not None else "",
                 f"{row['held_out_error']:.4f}" if row.get("held_out_error") is not None else "",
                 str(row.get("distinct_routes", ""))]  # fmt: skip
        cost = [f"{row['steps']} x {row['passes']}", f"{row['flops_ratio']:.3f}", f"{row['video_flops_ratio']:.3f}",
                f"{row['seconds_per_video']:.3f}"]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cost + cells + extra) + " |")
    lines += ["", "In brackets: the change from the reference with its 95% paired bootstrap interval (accuracies in "
              "points; fd: Frechet distance to real videos, lower is better, no interval). PSNR: of each video to "
              "the reference's from the same seed" + ("; first_frame_psnr: dB of the generated frame 0 to the frame "
              "the model was given" if "first_frame_psnr" in metrics else "") + ". Held-out error: the model's training run's relative error to the "
              f"teacher on its data's held-out shard. Distinct routes: over the first {ROUTE_PROMPTS} prompts x every "
              "sampling step (routed models)."]  # fmt: skip
    if result["claims"]:
        lines += ["", "Claims: A - B, paired, with its 95% interval and the verdict on \"A > B\".", "",
                  "| claim | " + " | ".join(metrics) + " | verdict |", "|---|" + "---|" * (len(metrics) + 1)]  # fmt: skip
        for t in result["claims"]:
            cells = []
            for m in metrics:
                d = t["metrics"].get(m)
                if d is None:
                    cells.append("")
                elif m == "fd":
                    cells.append(f"{d['diff']:+.1f}")
                else:
                    cells.append(f"{d['diff']:+.{3 if m == 'motion_smoothness' else 1}f} [{_cell(m, d['low'])}, "
                                 f"{_cell(m, d['high'])}] {d['verdict']}")  # fmt: skip
            lines.append(f"| {t['claim']} | " + " | ".join(cells) + f" | **{t['verdict']}** |")
    for sweep in result["sweeps"]:
        lines += ["", f"Sweep of {sweep['label']}: mean accuracy ({', '.join(ACCURACIES)}) "
                  + ", ".join(f"{v:g}: {sweep['mean_accuracy'][n]:.1f}" for v, n in sweep["points"])
                  + f"; best {sweep['best'][0]:g} ({sweep['best'][1]})."]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["rows"])
    panels = 1 + len(result["sweeps"])
    fig, axes = plt.subplots(1, panels, figsize=(max(5.0, 1.2 * len(names) + 2) + 4 * (panels - 1), 3.6),
                             gridspec_kw={"width_ratios": [max(3, len(names))] + [3] * (panels - 1)}, squeeze=False)  # fmt: skip
    ax = axes[0][0]
    width = 0.8 / len(ACCURACIES)
    for i, m in enumerate(ACCURACIES):
        xs = [j + i * width for j in range(len(names))]
        d = [result["changes"].get(n, {}).get(m) for n in names]
        err = [[(r["diff"] - r["low"]) if r else 0 for r in d], [(r["high"] - r["diff"]) if r else 0 for r in d]]
        ax.bar(xs, [result["rows"][n][m] for n in names], width, label=m, yerr=err, capsize=1.5, error_kw={"lw": 0.6})
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, fontsize=7, rotation=20, ha="right")
    ax.set_ylabel(f"accuracy on {result['prompts']} held-out prompts (%)")
    ax.set_ylim(0, 105)
    ax.set_title("bars: 95% paired interval of the change from the reference", fontsize=8)
    ax.legend(fontsize=7, ncols=len(ACCURACIES) if len(names) > 3 else 3, loc="lower left")  # inside narrow axes
    for ax, sweep in zip(axes[0][1:], result["sweeps"]):
        values = [v for v, _ in sweep["points"]]
        for m in ACCURACIES:
            ax.plot(values, [result["rows"][n][m] for _, n in sweep["points"]], marker="o", label=m)
        ax.axvline(sweep["best"][0], color="grey", lw=0.8, ls="--")
        ax.set_xlabel(sweep["label"])
        ax.set_ylabel("accuracy (%)")
        ax.legend(fontsize=7)
    save_figure(fig, path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, help="NAME=SPEC; the first is the reference")
    p.add_argument("--claim", action="append", default=[], help="A>B: model A scores higher than model B")
    p.add_argument("--sweep", action="append", default=[], help="LABEL:VALUE=NAME,VALUE=NAME,...")
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--work", type=Path, required=True, help="folder of each model's videos (a re-run reuses them)")
    p.add_argument("--out", type=Path, required=True, help="OUT.json, OUT.md, OUT.png")
    a = p.parse_args()
    torch.set_grad_enabled(False)

    def body():
        models = [named(m, "--model") for m in a.model]
        names = [n for n, _ in models]
        require(len(set(names)) == len(names), "--model: every NAME must differ")
        claims = [parse_claim(c, names) for c in a.claim]
        sweeps = [parse_sweep(s, names) for s in a.sweep]
        result = run(models, claims, sweeps, a.prompts, a.seed, a.batch_size, a.work)
        write_result(a.out, result, markdown(result), plot)

    return script_exit(body)


if __name__ == "__main__":
    sys.exit(main())
