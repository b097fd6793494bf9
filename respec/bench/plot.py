"""Plots: numeric metrics of a JSONL log (one panel per key) and the engine benchmark figure.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no display needed) and saved atomically.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from respec.engine.checkpoint import atomic_write_bytes
from respec.errors import DataError
from respec.world.tasks.jsonl import read_jsonl


def save_figure(fig: Figure, png: str | os.PathLike) -> Path:
    """Writes `fig` to `png` atomically (`atomic_write_bytes`) and returns the path."""
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    return atomic_write_bytes(png, buffer.getvalue())


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Returns the JSON objects of a JSONL metrics log, one per non-empty line (`read_jsonl`: a bad line is a
    DataError naming PATH:LINE)."""
    return [record for _, record in read_jsonl(path)]


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def plot_metrics(path: str | os.PathLike, png: str | os.PathLike | None = None) -> Path:
    """Returns the PNG (default: beside the JSONL) plotting each numeric key against "step" or the line index."""
    path = Path(path)
    records = read_metrics(path)
    keys = [k for k in dict.fromkeys(k for r in records for k in r) if k != "step"
            and any(_is_number(r.get(k)) for r in records)]
    if not keys:
        raise DataError(f"{path}: no numeric metrics to plot")
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(4.5 * cols, 3 * rows), layout="constrained")
    for i, key in enumerate(keys):
        ax = fig.add_subplot(rows, cols, i + 1)
        points = [(r.get("step", j), r[key]) for j, r in enumerate(records) if _is_number(r.get(key))]
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="." if len(xs) < 50 else None)
        ax.set_title(key)
        ax.set_xlabel("step" if any("step" in r for r in records) else "line")
        ax.grid(alpha=0.3)
    return save_figure(fig, Path(png) if png is not None else path.with_suffix(".png"))


def plot_sd_bound(data: dict, png: str | os.PathLike) -> Path:
    """Returns the PNG of `benchmarks/sd_bound.py`: each mode's decode step split into target, drafter and the
    rest, with its speedup over plain decoding and the bounds."""
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    rows = data["rows"]
    xs = range(len(rows))
    bottom = [0.0] * len(rows)
    for part in ("target", "drafter", "other"):
        heights = [r[f"{part}_ms"] for r in rows]
        ax.bar(list(xs), heights, 0.6, bottom=bottom, label=part)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    for x, r, top in zip(xs, rows, bottom, strict=True):
        label = f"{r['speedup']:.2f}x, {r['tokens_per_step']:.2f} tok"
        if "profiled_bound" in r:
            label += f"\nbound {r['profiled_bound']:.2f}x"
        ax.annotate(label, (x, top), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(xs), [r["mode"] for r in rows])
    ax.set_ylim(0, 1.18 * max(bottom))  # room for the labels
    ax.set_ylabel("ms per decode step, batch 1")
    ax.set_title("What a speculative step costs (speedup vs plain, tokens per step)")
    ax.legend()
    return save_figure(fig, Path(png))


def plot_bench_engine(data: dict, png: str | os.PathLike) -> Path:
    """Returns the PNG of `bench_engine` results: tokens/s ours vs transformers, and verify cost vs n."""
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax = fig.add_subplot(1, 2, 1)
    rows = data["engine_vs_hf"]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["ours_tokens_per_s"] for r in rows], 0.4, label="respec Engine")
    ax.bar([x + 0.2 for x in xs], [r["hf_tokens_per_s"] for r in rows], 0.4, label="transformers generate")
    for x, r in zip(xs, rows, strict=True):
        ax.annotate(f"{r['ratio']:.2f}x", (x - 0.2, r["ours_tokens_per_s"]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), [str(r["batch"]) for r in rows])
    ax.set_xlabel("batch size")
    ax.set_ylabel("generated tokens / s")
    ax.set_title("Plain greedy decoding")
    ax.legend()
    ax = fig.add_subplot(1, 2, 2)
    curve = data["verify_cost"]
    for batch in sorted({c["batch"] for c in curve}):
        pts = sorted((c["n"], c["ratio_to_n1"]) for c in curve if c["batch"] == batch)
        ax.plot(*zip(*pts, strict=True), marker="o", label=f"batch {batch}")
    ax.set_xlabel("tokens per row in one target forward (n = k + 1)")
    ax.set_ylabel("time / time at n = 1")
    ax.set_title("Verification cost")
    ax.grid(alpha=0.3)
    ax.legend()
    device = data.get("machine", {}).get("device_name", "")
    if device:
        fig.suptitle(device, fontsize=9)
    return save_figure(fig, Path(png))


def plot_bench_spec(data: dict, png: str | os.PathLike) -> Path:
    """Returns the PNG of `bench_spec` results: speedup vs k, one panel per temperature, one line per batch over
    the fixed k (plain and static), and the per-step choosers as markers at their mean k in the batch's colour."""
    markers = {"adaptive": "*", "table": "s", "bandit": "^"}
    cells = data["cells"]
    temps = sorted({c["temperature"] for c in cells})
    fig = Figure(figsize=(4.5 * len(temps), 4), layout="constrained")
    for i, temperature in enumerate(temps):
        ax = fig.add_subplot(1, len(temps), i + 1)
        for j, batch in enumerate(sorted({c["batch"] for c in cells})):
            here = [c for c in cells if c["batch"] == batch and c["temperature"] == temperature]
            color = f"C{j % 10}"
            pts = sorted((c["k"], c["speedup_vs_plain"]) for c in here if c["mode"] in ("plain", "static"))
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", color=color, label=f"batch {batch}")
            for c in here:
                if c["mode"] in markers:
                    ax.scatter(c["k"], c["speedup_vs_plain"], marker=markers[c["mode"]], s=70, color=color,
                               edgecolors="black", linewidths=0.5, zorder=3)
        for mode, marker in markers.items():  # one legend entry per chooser present
            if any(c["mode"] == mode and c["temperature"] == temperature for c in cells):
                ax.scatter([], [], marker=marker, color="white", edgecolors="black", label=f"{mode} (mean k)")
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xlabel("draft length k (0 = plain)")
        ax.set_ylabel("tokens/s vs plain decoding")
        ax.set_title(f"temperature {temperature:g}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    device = data.get("machine", {}).get("device_name", "")
    if device:
        fig.suptitle(f"Speculative decoding speedup ({device})", fontsize=9)
    return save_figure(fig, Path(png))


def plot_bench_rollout(data: dict, png: str | os.PathLike) -> Path:
    """Returns the PNG of `bench_rollout`: wall seconds per mode, the adaptive decision trace (live batch and
    chosen k per decode step, beside the oracle's k), and (in results that have it) the plain rollout's share of
    decode time per live-batch range, beside the drain of the task's worked solutions (`worked_shape`)."""
    from respec.bench.rollout import bench_shapes

    panels = 3 if "shape" in data else 2
    fig = Figure(figsize=(6 * panels, 4.2), layout="constrained")
    ax = fig.add_subplot(1, panels, 1)
    names = ["plain", *(f"k={k}" for k in data["static_s"]), "table", "bandit", "adaptive", "oracle"]
    secs = [data["plain_s"], *data["static_s"].values(), data["table_s"], data["bandit_s"], data["adaptive_s"],
            data["oracle_s"]]
    colors = ["gray"] + ["tab:blue"] * len(data["static_s"]) + ["tab:orange", "tab:purple", "tab:green", "black"]
    ax.bar(range(len(secs)), secs, color=colors)
    ax.set_xticks(range(len(secs)), names, rotation=45, fontsize=8)
    ax.set_ylabel("rollout wall seconds (median)")
    ax.set_title("GRPO-shaped rollout, same prompts and seeds")
    ax.grid(alpha=0.3, axis="y")
    trace = data["trace"]
    ax = fig.add_subplot(1, panels, 2)
    steps = range(len(trace["k"]))
    ax.step(steps, trace["k"], where="post", color="tab:green", label="adaptive k")
    ax.step(steps, trace["oracle_k"], where="post", color="black", ls="--", lw=0.9, label="oracle k")
    ax.set_xlabel("decode step")
    ax.set_ylabel("draft length k (0 = plain)")
    twin = ax.twinx()
    twin.plot(steps, trace["batch"], color="tab:red", alpha=0.6, label="live batch")
    twin.set_ylabel("live batch")
    twin.set_yscale("log", base=2)
    ax.set_title("decision trace")
    lines = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="upper left")
    if "shape" in data:
        _plot_shapes(fig.add_subplot(1, panels, 3), bench_shapes(data))
    device = data.get("machine", {}).get("device_name", "")
    if device:
        fig.suptitle(f"Adaptive speculative decoding on a draining rollout ({device})", fontsize=9)
    return save_figure(fig, Path(png))


def _plot_shapes(ax, shapes: dict[str, dict]) -> None:
    """Draws the share of decode time per live-batch range of each rollout shape (`rollout_shape` layouts by
    name) as grouped bars, with its response-length quantiles in the legend."""
    labels = list(next(iter(shapes.values()))["batch_share"])
    width = 0.8 / len(shapes)
    for i, (name, shape) in enumerate(shapes.items()):
        length = shape["length"]
        xs = [j + (i - (len(shapes) - 1) / 2) * width for j in range(len(labels))]
        ax.bar(xs, [shape["batch_share"][label] for label in labels], width, color=f"C{i % 10}",
               label=f"{name}: length median {length['median']:.0f}, p99 {length['p99']:.0f}, max "
                     f"{length['max']:.0f}")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel("live batch (rows still generating)")
    ax.set_ylabel("share of decode time")
    ax.set_title("where the rollout's decode time goes", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)


def plot_runs(run_dirs: list[str | os.PathLike], png: str | os.PathLike) -> Path:
    """Returns the PNG overlaying RL runs (directories with a metrics.jsonl): training reward, held-out reward
    (solid at the rollout temperature, dashed greedy) and share of right answers (dotted), mean response length,
    and seconds per step split into rollout (solid) and update (dashed); one colour per run, labelled by its
    directory name."""
    runs = []
    for d in run_dirs:
        d = Path(d)
        path = d / "metrics.jsonl" if d.is_dir() else d
        runs.append((d.name if d.is_dir() else d.stem, read_metrics(path)))
    panels = [("reward (critic/score/mean)", [("critic/score/mean", "-")]),
              ("held-out reward (T=1 solid, greedy dashed), right answers (dotted)",
               [("val/accuracy", "-"), ("val/accuracy_greedy", "--"), ("val/correct", ":")]),
              ("response length (tokens)", [("response_length/mean", "-")]),
              ("seconds per step", [("timing/rollout_s", "-"), ("timing/update_s", "--")])]
    fig = Figure(figsize=(11, 7.5), layout="constrained")
    for i, (title, series) in enumerate(panels):
        ax = fig.add_subplot(2, 2, i + 1)
        for j, (name, records) in enumerate(runs):
            for key, style in series:
                points = [(r.get("step", n), r[key]) for n, r in enumerate(records) if _is_number(r.get(key))]
                if points:
                    label = name if len(series) == 1 else f"{name} {key.rsplit('/', 1)[-1]}"
                    ax.plot(*zip(*points, strict=True), style, color=f"C{j % 10}", label=label,
                            marker="." if len(points) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return save_figure(fig, Path(png))


def plot_experiment(report: dict, png: str | os.PathLike) -> Path:
    """Returns the PNG of `respec experiment`'s curves (seed means): the drafter's tokens per verify step
    against RL step (ReSpec's Figure 4: a frozen drafter goes stale), training reward and held-out accuracy
    (Figure 5: speculative rollouts must not change the learning curve), and the rollout's tokens per verify step."""
    from respec.bench.experiment import run_shape

    curves = report["curves"]
    shapes = {name: shape for name, r in report.get("runs", {}).items() if (shape := run_shape(r)) is not None}
    fig = Figure(figsize=(20 if shapes else 16, 4))
    panels = fig.subplots(1, 5 if shapes else 4)
    for i, (name, c) in enumerate(curves.items()):
        style = {"label": name, "color": f"C{i % 10}"}  # one colour per configuration in every panel
        if c["accept_k4"]:
            frozen = name in ("no_sd", "naive_sd", "adaptive_frozen")  # these runs measure the offline drafter
            panels[0].plot(c["accept_k4_step"], c["accept_k4"], marker="o",
                           **{**style, "label": f"{name} (frozen drafter)" if frozen else name})
        if name != "no_sd":
            panels[1].plot(c["emitted_step"], _smooth(c["emitted"]), **style)
        panels[2].plot(c["reward_step"], _smooth(c["reward"]), **style)
        panels[3].plot(c["accuracy_step"], c["accuracy"], marker="o", **style)
    titles = ("drafter tokens / verify step (k=4, held out)", "rollout tokens / verify step (smoothed)",
              "training reward (smoothed)", "held-out reward, val/accuracy (T=1)")
    for ax, title in zip(panels, titles, strict=False):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if shapes:
        _plot_shapes(panels[4], shapes)
    fig.suptitle(f"respec experiment: {report['steps']} steps, seeds {report['seeds']}", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, png)


def _smooth(values: list[float], window: int = 5) -> list[float]:
    """Returns the trailing moving average of `values` over `window` points."""
    out = []
    for i in range(len(values)):
        part = values[max(0, i - window + 1): i + 1]
        out.append(sum(part) / len(part))
    return out


def plot_bench_serve(data: dict, png: str | os.PathLike) -> Path:
    """Returns the PNG of `respec bench serve`: throughput and p99 latency against concurrent clients, one line
    per spec setting."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    specs = list(dict.fromkeys(lv["spec"] for lv in data["levels"]))
    panels = (("tokens_per_s", "generated tokens/s"), ("latency_p99_s", "p99 request latency (s)"))
    for i, (key, label) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        for spec in specs:
            pts = sorted((lv["clients"], lv[key]) for lv in data["levels"] if lv["spec"] == spec)
            ax.plot([c for c, _ in pts], [y for _, y in pts], marker="o", label=f"spec {spec}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    device = data.get("machine", {}).get("device_name", "")
    fig.suptitle(f"Rollout server under load{f' ({device})' if device else ''}", fontsize=9)
    return save_figure(fig, Path(png))
